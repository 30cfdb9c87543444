"""Stage and reason names have one owner, pmd.reasons; being StrEnums they are written as the same strings the
files held when they were literals, and every reason the library emits is a member."""

from __future__ import annotations

import json

import pyarrow as pa

from pmd import archives, decontaminate, images, takedown
from pmd.http_client import TRANSIENT_REASONS
from pmd.reasons import HTTP_PREFIX, IMAGE_STAGES, Reason, Stage, http_reason
from pmd.sources import base


def test_the_seven_stages_and_their_strings():
    assert [s.value for s in Stage] == ["read", "download", "decode", "check", "decontaminate", "dedup", "takedown"]
    assert IMAGE_STAGES == ("read", "download", "decode", "check")
    assert decontaminate.STAGE == "decontaminate" and takedown.TAKEDOWN == "takedown" == Reason.TAKEDOWN


def test_members_are_their_strings_on_disk():
    table = pa.table({"stage": pa.array([Stage.READ, Stage.DEDUP], pa.string()),
                      "reason": pa.array([Reason.MISSING_MEMBER, http_reason(404)], pa.string())})
    assert table.column("stage").to_pylist() == ["read", "dedup"]
    assert table.column("reason").to_pylist() == ["missing_member", "http_404"]
    assert json.dumps({Reason.DUPLICATE: Stage.DEDUP}) == '{"duplicate": "dedup"}'
    assert f"{Reason.EVAL_OVERLAP}: x" == "eval_overlap: x"


def test_reason_names_are_unique_snake_case_and_cover_what_the_library_emits():
    values = [r.value for r in Reason]
    assert len(values) == len(set(values)) and all(v.isascii() and v == v.lower() and " " not in v for v in values)
    assert not any(v.startswith(HTTP_PREFIX) for v in values)  # a family: http_reason(status)
    assert base.Reason is Reason
    assert set(images.REASONS) <= set(Reason)
    assert {archives.MISSING, archives.ARCHIVE_ERROR, archives.TOO_LARGE, decontaminate.EVAL_OVERLAP} <= set(Reason)
    assert {r for r in TRANSIENT_REASONS if not r.startswith(HTTP_PREFIX)} <= set(Reason)
