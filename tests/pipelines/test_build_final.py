"""The final phase (pmd.final scheduled by pipelines.build): equal to a global sort of the finished chunks, and
interrupted at any pass then rerun, byte-identical to an uninterrupted build; no image copy left in work/."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.build import BuildConfig, SourceSpec, run_build
from pmd import final
from pmd.final import image_bucket
from tests.pipelines.build_fixtures import make_coco
from tests.pipelines.test_build_retry import image_bytes_in_work

pytestmark = pytest.mark.slow

SHARD_ROWS = 8


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco") / "in", n_images=60)


def config(coco, out: Path) -> BuildConfig:
    return BuildConfig(sources=[SourceSpec("coco", [coco.karpathy], coco.zips)], out=out, shard_rows=SHARD_ROWS,
                       chunk_rows=16, row_group_rows=4, seed=5, executor="local", progress=False)


def files(out: Path) -> list[tuple[str, bytes]]:
    return [(str(p.relative_to(out)), p.read_bytes()) for p in sorted([*out.glob("shards/*.parquet"),
                                                                        *out.glob("failures/*.parquet")])]


@pytest.fixture(scope="module")
def reference(coco, tmp_path_factory):
    """An uninterrupted build, plus a copy of every chunk file taken just before the final phase consumed it."""
    root = tmp_path_factory.mktemp("final")
    snapshot = root / "chunks"
    snapshot.mkdir()
    real = final.scatter_group

    def copying(*args):
        for p in args[4]:  # the group's chunk files
            if Path(p).exists():
                shutil.copy(p, snapshot / Path(p).name)
        return real(*args)

    final.scatter_group = copying
    try:
        manifest = run_build(config(coco, root / "out"))
    finally:
        final.scatter_group = real
    return root / "out", snapshot, manifest


def test_final_phase_equals_a_global_sort(reference):
    out, snapshot, manifest = reference
    layout = final.Layout(**manifest["layout"])
    assert layout.n_buckets > 3 and len(manifest["shards"]) > 2 * layout.n_buckets  # buckets share shards
    chunks = pl.concat([pl.from_arrow(pa.ipc.open_file(pa.memory_map(str(p))).read_all().drop_columns(["image"]))
                        for p in sorted(snapshot.glob("chunk-*.arrow"))])
    ok = chunks.filter(pl.col("reason").is_null()).sort("source_index", "candidate_index")
    first = ok.unique(subset=["image_sha256", "text_hash"], keep="first", maintain_order=True)
    expected = first.with_columns(
        pl.col("image_sha256").map_elements(lambda s: image_bucket(s, layout.n_buckets), return_dtype=pl.Int64)
        .alias("bucket")).sort("bucket", "shuffle_hash", "key")["key"].to_list()
    got = [k for s in manifest["shards"] for k in pq.read_table(out / s["file"], columns=["key"])["key"].to_pylist()]
    assert got == expected
    assert [s["rows"] for s in manifest["shards"]] == [SHARD_ROWS] * (len(expected) // SHARD_ROWS) + (
        [len(expected) % SHARD_ROWS] if len(expected) % SHARD_ROWS else [])
    dups = set(ok["key"].to_list()) - set(expected)
    failures = pl.read_parquet(out / "failures")
    assert set(failures.filter(pl.col("reason") == "duplicate")["key"].to_list()) == dups
    assert failures.height == chunks.height - len(expected)
    assert image_bytes_in_work(out) == 0
    assert not list((out / "work").rglob("chunk-*.arrow"))


@pytest.mark.parametrize("target, calls", [("scatter_group", 2), ("dedup_bucket", 3), ("write_bucket", 2),
                                           ("merge_shard", 1), ("write_failures", 0)])
def test_interrupted_final_phase_resumes_to_identical_bytes(reference, coco, tmp_path, target, calls):
    out = tmp_path / "out"
    real = getattr(final, target)
    count = 0

    def dying(*args):
        nonlocal count
        count += 1
        if count > calls:
            raise KeyboardInterrupt(f"killed in {target}")
        return real(*args)

    setattr(final, target, dying)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_build(config(coco, out))
    finally:
        setattr(final, target, real)
    assert not (out / "manifest.json").exists()
    run_build(config(coco, out))
    assert files(out) == files(reference[0])
    assert image_bytes_in_work(out) == 0


def test_a_chunk_task_rerun_after_it_finished_elsewhere_returns_its_summary(tmp_path):
    """Ray re-runs a task whose node died after the task had written its chunk (and deleted its input): the rerun
    must report the chunk, not fail on the missing input or redo the downloads."""
    from pmd.build_plan import _run_url_chunk
    from pmd.build import CHUNK_SCHEMA, ChunkTask, write_ipc_atomic
    from pmd.images import ImageOptions

    rows = {name: [None] * 3 for name in CHUNK_SCHEMA.names}
    rows.update(key=["a", "b", "c"], reason=[None, "http_404", "timeout"])
    path = tmp_path / "images" / "s" / "chunk-00000.arrow"
    write_ipc_atomic(pa.table(rows, schema=CHUNK_SCHEMA), path)
    task = ChunkTask(source="s", index=0, candidates=pa.table({}), path=path, image_options=ImageOptions(), seed=0,
                     mode="url")
    summary = _run_url_chunk(task, str(tmp_path / "gone.arrow"))
    assert summary == {"source": "s", "index": 0, "rows": 3, "ok": 1,
                       "failures_by_reason": {"http_404": 1, "timeout": 1}}
