"""The build's resume decisions, from the work state alone (no scheduler): which tasks are done, and what a changed
option, a takedown request or `--retry-failures` invalidates. pmd.build_plan asks these and submits the rest to
its executor; tests/pmd/test_plan.py checks each decision on crafted work states, tests/pmd/test_build_plan.py on
whole builds.

A task is done when its marker exists (written last, after every output): an image chunk when its chunk file
exists or its scatter group's marker does (the chunk was consumed), a final-phase pass by its per-group or
per-bucket marker (pmd.final)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from enum import Enum

from pmd import schema, storage
from pmd.final import WORK_FORMAT
from pmd.ingest import input_fingerprint
from pmd.layout import OutLayout, WorkLayout


class FinalAction(str, Enum):
    """What the final phase must do to an existing work state before deciding the buckets again."""

    KEEP = "keep"  # nothing decided is stale: resume where the last run stopped
    RETRY = "retry"  # --retry-failures: a retry round, after taking finished shards back to pieces
    RESUME_UNBUILD = "resume_unbuild"  # a run killed while taking shards back to pieces: finish that first
    TAKEDOWN = "takedown"  # a takedown request recorded after the buckets were decided: decide them again


def fingerprint(config) -> dict:
    """What the work files depend on (a pmd.build_config.BuildConfig): a rerun with another one must not reuse them."""
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "work_format": WORK_FORMAT,
        "sources": [{"name": s.name, "inputs": input_fingerprint(s.inputs), "options": s.options,
                     "images": input_fingerprint(s.images)} for s in config.sources],
        "chunk_rows": config.chunk_rows, "shard_rows": config.shard_rows, "row_group_rows": config.row_group_rows,
        "seed": config.seed, "image": dataclasses.asdict(config.image),
        # to_dict leaves out what the build sets itself (the budget service's address)
        "download": {k: v for k, v in config.download.to_dict().items() if k != "thread_count"},
        "decontaminate": {**config.decontaminate.to_dict(),
                          "files": input_fingerprint(config.decontaminate.paths)},
    }


def configuration_changes(recorded: dict | None, current: dict) -> list[str]:
    """The top-level keys of the fingerprint that changed since the work state was started (none: reusable)."""
    if recorded is None:
        return []
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def recorded_fingerprint(work: WorkLayout) -> dict | None:
    path = work.build_state
    return json.loads(path.read_text()) if path.is_file() else None


def done_chunks(work: WorkLayout, source: str, n_chunks: int, groups: Sequence[range]) -> set[int]:
    """The image chunks of a source that need no task: written, or consumed by a scattered group. One listing per
    directory, not one request per chunk (on object storage each is a request)."""
    final = work.final
    scattered_markers = {p.name for p in (final.root / "groups" / source).glob("group-*.json")}
    done = {i for g, chunks in enumerate(groups) if final.group_marker(source, g).name in scattered_markers
            for i in chunks}
    written = {p.name for p in work.images(source).glob("chunk-*.arrow")}
    done.update(i for i in range(n_chunks) if work.chunk(source, i).name in written)
    return done


def final_written(work: WorkLayout, out: OutLayout) -> bool:
    """Whether pass B2 has begun (shards or their bucket summaries exist)."""
    return any((work.final.root / "written").glob("*.json")) or bool(storage.list_files(out.shards, ".parquet"))


def decided_buckets(work: WorkLayout) -> list[int]:
    """The buckets whose dedup decision exists. A retry round adds the rows that now succeed to their buckets, so
    a decision made before it is stale: with no bucket written yet these are decided again (`final.forget_decided`);
    once one is, the whole final phase is taken back first (an unbuild), which forgets them too."""
    return sorted(int(p.name[len("bucket-"):-len(".json")])
                  for p in (work.final.root / "dedup").glob("bucket-*[0-9].json"))


def takedowns_changed(work: WorkLayout, request_ids: Sequence[str]) -> bool:
    """Whether a bucket was decided without a takedown request recorded since (`pmd takedown` on a finished build)."""
    for path in sorted((work.final.root / "dedup").glob("bucket-*[0-9].json")):
        if json.loads(path.read_text()).get("takedown_requests", []) != list(request_ids):
            return True
    return False


def final_action(work: WorkLayout, out: OutLayout, request_ids: Sequence[str], retry: bool) -> FinalAction:
    if retry:
        return FinalAction.RETRY
    if work.final.unbuild_state.is_file():
        return FinalAction.RESUME_UNBUILD
    if final_written(work, out) and takedowns_changed(work, request_ids):
        return FinalAction.TAKEDOWN
    return FinalAction.KEEP
