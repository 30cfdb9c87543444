"""The build's resume decisions (pmd.plan) on crafted work states, without any scheduler."""

from __future__ import annotations

import copy

from pmd import atomic, plan
from pmd.layout import OutLayout, WorkLayout
from pmd.plan import FinalAction


def test_a_changed_option_is_named_and_an_unchanged_state_is_reusable():
    recorded = {"seed": 0, "chunk_rows": 16, "image": {"image_size": 24}, "sources": []}
    assert plan.configuration_changes(None, recorded) == []  # a new work state
    assert plan.configuration_changes(recorded, copy.deepcopy(recorded)) == []
    changed = copy.deepcopy(recorded)
    changed["image"]["image_size"] = 32
    changed["seed"] = 1
    assert plan.configuration_changes(recorded, changed) == ["image", "seed"]
    assert plan.configuration_changes(recorded, {**recorded, "work_format": 3}) == ["work_format"]


def test_done_chunks_are_the_written_ones_and_those_of_scattered_groups(tmp_path):
    work = WorkLayout.of(tmp_path / "work")
    groups = [range(0, 3), range(3, 6), range(6, 7)]
    assert plan.done_chunks(work, "coco", 7, groups) == set()
    atomic.write_bytes(b"x", work.chunk("coco", 4))
    atomic.write_bytes(b"x", work.chunk("coco", 6))
    atomic.write_bytes(b"x", work.chunk("cc12m", 0))  # another source's chunk
    atomic.write_json({}, work.final.group_marker("coco", 0))  # group 0 scattered: its chunks were consumed
    atomic.write_bytes(b"partial", atomic.temp_path(work.chunk("coco", 5)))  # a killed writer's temp file
    assert plan.done_chunks(work, "coco", 7, groups) == {0, 1, 2, 4, 6}


def test_the_final_phase_is_kept_retried_resumed_or_redecided_for_a_takedown(tmp_path):
    work, out = WorkLayout.of(tmp_path / "out" / "work"), OutLayout.of(tmp_path / "out")
    assert plan.final_action(work, out, [], retry=False) is FinalAction.KEEP
    assert plan.final_action(work, out, [], retry=True) is FinalAction.RETRY
    atomic.write_json({"takedown_requests": ["r1"]}, work.final.dedup(0))
    atomic.write_json({"takedown_requests": []}, work.final.dedup(1))
    # Decided buckets, nothing written yet: a new request is decided when the buckets are (not an unbuild).
    assert plan.final_action(work, out, ["r1"], retry=False) is FinalAction.KEEP
    atomic.write_json({"bucket": 0}, work.final.written(0))
    assert plan.final_written(work, out)
    # Bucket 1 was decided without r1, recorded since: the shards must be taken back and decided again.
    assert plan.final_action(work, out, ["r1"], retry=False) is FinalAction.TAKEDOWN
    atomic.write_json({"takedown_requests": ["r1"]}, work.final.dedup(1))
    assert plan.final_action(work, out, ["r1"], retry=False) is FinalAction.KEEP
    assert plan.final_action(work, out, ["r1", "r2"], retry=False) is FinalAction.TAKEDOWN
    atomic.write_json({"phase": "shards", "buckets": []}, work.final.unbuild_state)
    assert plan.final_action(work, out, ["r1"], retry=False) is FinalAction.RESUME_UNBUILD
    assert plan.final_action(work, out, ["r1"], retry=True) is FinalAction.RETRY


def test_a_shard_in_out_counts_as_written(tmp_path):
    work, out = WorkLayout.of(tmp_path / "w"), OutLayout.of(tmp_path / "out")
    assert not plan.final_written(work, out)
    atomic.write_bytes(b"PAR1", out.shard(0))
    assert plan.final_written(work, out)


def test_the_decided_buckets_are_those_with_a_dedup_summary(tmp_path):
    """What a retry round forgets when no bucket is written yet (pmd.final.forget_decided)."""
    work = WorkLayout.of(tmp_path / "work")
    assert plan.decided_buckets(work) == []
    for b in (12, 0, 3):
        atomic.write_json({"bucket": b}, work.final.dedup(b))
    atomic.write_bytes(b"x", work.final.duplicates(5))  # outputs without their summary: not decided
    atomic.write_bytes(b"{}", atomic.temp_path(work.final.dedup(7)))  # a killed writer's temp file
    assert plan.decided_buckets(work) == [0, 3, 12]
