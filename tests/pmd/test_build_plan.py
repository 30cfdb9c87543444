"""The build's plan (pmd.build_plan) driven whole through an in-process executor (no Ray, no pool): its phases
and task names are deterministic, a rerun of a finished build submits no task, deleting one chunk's marker reruns
exactly that task, and a takedown, --retry-failures or a changed option invalidate what pmd.plan says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pmd import build_plan
from pmd import plan as pmd_plan
from pmd.build_config import BuildConfig, SourceSpec
from pmd.build_plan import PHASES, BuildError
from pmd.executor import Executor, InProcessExecutor
from pmd.images import ImageOptions
from pmd.layout import OutLayout, WorkLayout
from pmd.shards import verify
from pmd.takedown import apply, load_filter, read_request
from tests.httpserver import LoopbackServer
from tests.loopback import loopback_options
from tests.pipelines.build_fixtures import make_coco, make_mixed_tsv

URL_ROWS = 14  # 12 good, one 404, one naming a good row's URL again (downloaded once)


class Stopped(Exception):
    pass


class Recorder(InProcessExecutor):
    """The in-process executor, recording every task submitted; `stop_at`: raise when a task of that phase is
    submitted (a build killed there, its earlier phases done)."""

    def __init__(self, stop_at: str | None = None):
        self.names: list[str] = []
        self.stop_at = stop_at

    def submit(self, fn, *args, on_done=lambda _: None, limit=None, name=None) -> None:
        assert name, f"{fn.__name__} submitted without a name"
        if self.stop_at and name.startswith(self.stop_at + "/"):
            raise Stopped(name)
        self.names.append(name)
        super().submit(fn, *args, on_done=on_done, limit=limit, name=name)


def phases(names: list[str]) -> list[str]:
    seen: list[str] = []
    for n in names:
        if n.split("/")[0] not in seen:
            seen.append(n.split("/")[0])
    return seen


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    server = LoopbackServer(image_size=(64, 48), sleep_s=2.0).start()
    tsv = make_mixed_tsv(root / "cc12m.tsv", server, first_image=500, word="thing")
    yield tsv, make_coco(root / "coco", n_images=12), root
    server.stop()


def config(inputs, out: Path, **changes) -> BuildConfig:
    tsv, coco, _ = inputs
    return BuildConfig(sources=[SourceSpec("conceptual_12m", [tsv]), SourceSpec("coco", [coco.karpathy], coco.zips)],
                       out=out, **{"shard_rows": 8, "row_group_rows": 4, "chunk_rows": 10, "seed": 1,
                                   "image": ImageOptions(image_size=32),
                                   "download": loopback_options(timeout=2.0, thread_count=4), "executor": "local",
                                   "progress": False, **changes})


def corpus(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes()
            for d in ("shards", "failures") for p in sorted((out / d).glob("*"))}


def build(cfg: BuildConfig, executor: Executor | None = None) -> tuple[dict, list[str]]:
    executor = executor or Recorder()
    return build_plan.run(cfg, executor), executor.names


@pytest.fixture(scope="module")
def reference(inputs):
    out = inputs[2] / "reference"
    manifest, names = build(config(inputs, out))
    return out, manifest, names


def test_phases_and_task_names_are_deterministic_and_follow_the_plan(inputs, reference):
    out, manifest, names = reference
    assert phases(names) == ["ingest", "urls", "images", "scatter", "dedup", "write", "merge", "failures"]
    assert [p for p in PHASES if p in phases(names)] == phases(names)  # in PHASES' order
    assert len(names) == len(set(names))  # one task per unit
    # The units are a pure function of the configuration and the ingest counts.
    summaries = {s: json.loads((out / "work" / "ingest" / s / "ingest.json").read_text())
                 for s in ("conceptual_12m", "coco")}
    assert summaries["conceptual_12m"]["counts"]["pairs"] == URL_ROWS and summaries["coco"]["counts"]["pairs"] == 60
    plan = build_plan.make_plan(config(inputs, out), summaries)
    chunks = {"conceptual_12m": 2, "coco": 6}
    assert [n for n in names if n.startswith("images/")] == [
        f"images/{s}/chunk-{i:05d}" for s in ("conceptual_12m", "coco") for i in range(chunks[s])]
    assert [n for n in names if n.startswith("scatter/")] == [
        f"scatter/{spec.name}/group-{g:05d}" for spec in plan.config.sources for g in range(len(plan.groups(spec)))]
    assert [n for n in names if n.startswith("dedup/")] == [f"dedup/bucket-{b:05d}"
                                                            for b in range(plan.layout.n_buckets)]
    assert [n for n in names if n.startswith("write/")] == [f"write/bucket-{b:05d}"
                                                            for b in range(plan.layout.n_buckets)]
    assert [n for n in names if n.startswith("failures/")] == ["failures/conceptual_12m", "failures/coco"]
    assert plan.layout.n_buckets > 1  # so that shards straddle buckets and the merge pass has work
    assert [n for n in names if n.startswith("ingest/")] == ["ingest/conceptual_12m/part-00000.parquet",
                                                             "ingest/coco/part-00000.parquet"]
    assert manifest["executor"] == "local" and verify(out) == []
    assert manifest["totals"]["pairs"] == 12 + 1 + 45 - 1  # URL: 12 good + the repeated URL; coco: 9 images
    # Another build of the same configuration: the same tasks in the same order, the same bytes.
    again, again_names = build(config(inputs, inputs[2] / "again"))
    assert again_names == names
    assert corpus(inputs[2] / "again") == corpus(out)
    assert again["shards"] == manifest["shards"] and again["accounting"] == manifest["accounting"]


def test_a_rerun_of_a_finished_build_submits_no_task(inputs, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    manifest, names = build(config(inputs, out))
    assert names == []
    assert corpus(out) == corpus(reference[0])
    assert manifest["shards"] == reference[1]["shards"] and manifest["failures"] == reference[1]["failures"]
    assert manifest["accounting"] == reference[1]["accounting"]


def test_deleting_one_chunks_marker_reruns_exactly_that_task(inputs, reference, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Stopped, match="scatter/conceptual_12m/group-00000"):
        build(config(inputs, out), Recorder(stop_at="scatter"))
    work = WorkLayout.of(out / "work")
    chunk = work.chunk("coco", 3)
    assert chunk.exists()
    chunk.unlink()  # a chunk's marker is its file, written last
    groups = build_plan.make_plan(config(inputs, out), {s: json.loads(
        (out / "work" / "ingest" / s / "ingest.json").read_text()) for s in ("conceptual_12m", "coco")}).groups(
        config(inputs, out).sources[1])
    assert pmd_plan.done_chunks(work, "coco", 6, groups) == {0, 1, 2, 4, 5}
    manifest, names = build(config(inputs, out))
    assert [n for n in names if n.split("/")[0] in ("ingest", "urls", "images")] == ["images/coco/chunk-00003"]
    assert corpus(out) == corpus(reference[0])  # killed + resumed == uninterrupted
    assert manifest["shards"] == reference[1]["shards"]


def test_a_takedown_invalidates_the_decided_buckets_and_nothing_before(inputs, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    keys = tmp_path / "keys.txt"
    victims = [k for s in reference[1]["shards"] for k in pq.read_table(out / s["file"], columns=["key"])
               .column("key").to_pylist() if k.startswith("coco/")][::10]
    keys.write_text("\n".join(victims) + "\n")
    assert apply(out, read_request("keys", keys))["rows"] == len(victims) > 1
    work, layout = WorkLayout.of(out / "work"), OutLayout.of(out)
    ids = [r.id for r in load_filter(out).requests]
    assert pmd_plan.final_action(work, layout, ids, retry=False) == pmd_plan.FinalAction.TAKEDOWN
    manifest, names = build(config(inputs, out))
    n_shards, n_buckets = len(reference[1]["shards"]), manifest["layout"]["n_buckets"]
    assert phases(names) == ["unbuild", "dedup", "write", "merge", "failures"]  # no ingest, URL, image or scatter
    assert [n for n in names if n.startswith("unbuild/")] == [
        *(f"unbuild/shard-{s:05d}" for s in range(n_shards)), *(f"unbuild/bucket-{b:05d}" for b in range(n_buckets))]
    assert [n for n in names if n.startswith("dedup/")] == [f"dedup/bucket-{b:05d}" for b in range(n_buckets)]
    assert [n for n in names if n.startswith("failures/")] == ["failures/conceptual_12m", "failures/coco"]
    assert manifest["accounting"]["coco"]["failures_by_reason"]["takedown"] == len(victims)
    assert verify(out) == []
    assert pmd_plan.final_action(work, layout, ids, retry=False) == pmd_plan.FinalAction.KEEP
    assert build(config(inputs, out))[1] == []  # decided again once; a further rerun has nothing to do


def test_retry_failures_retries_every_scattered_group_after_unbuilding(inputs, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    cfg = config(inputs, out, retry_failures=True)
    work, layout = WorkLayout.of(out / "work"), OutLayout.of(out)
    assert pmd_plan.final_action(work, layout, [], retry=True) == pmd_plan.FinalAction.RETRY
    manifest, names = build(cfg)
    groups = [n.split("/", 1)[1] for n in reference[2] if n.startswith("scatter/")]
    assert [n for n in names if n.startswith("retry/")] == [f"retry/{g}" for g in groups]
    # The finished shards go back to pieces first (their dedup and write markers still stand), then the retry round
    # and the final passes again; nothing before the final phase.
    assert phases(names) == ["unbuild", "retry", "dedup", "write", "merge", "failures"]
    assert [p for p in PHASES if p in phases(names)] == phases(names)
    assert not [n for n in names if n.split("/")[0] in ("ingest", "urls", "images", "scatter")]
    # Nothing was transient: the corpus is the same, and every group records its second attempt.
    assert corpus(out) == corpus(reference[0])
    assert manifest["sources"]["coco"]["downloads"]["attempts"] == 2
    assert manifest["accounting"] == reference[1]["accounting"]


def test_a_changed_option_is_refused_before_any_task(inputs, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    changed = config(inputs, out, seed=2)
    recorded = pmd_plan.recorded_fingerprint(WorkLayout.of(out / "work"))
    assert pmd_plan.configuration_changes(recorded, pmd_plan.fingerprint(changed)) == ["seed"]
    recorder = Recorder()
    with pytest.raises(BuildError, match=r"changed: seed"):
        build_plan.run(changed, recorder)
    assert recorder.names == []
    assert corpus(out) == corpus(reference[0]) and (out / "manifest.json").exists()


def test_in_flight_caps_bound_a_local_work_disk_only(inputs, reference):
    """On a local work disk the scatter and write passes keep IN_FLIGHT_SHARE of their tasks in flight (the data
    held twice there); with the work on object storage nothing caps them below the executor's own slots."""
    from pmd import final

    out = reference[0]
    summaries = {s: json.loads((out / "work" / "ingest" / s / "ingest.json").read_text())
                 for s in ("conceptual_12m", "coco")}
    local = build_plan.make_plan(config(inputs, out, shard_rows=2, row_group_rows=1, chunk_rows=2), summaries)
    groups = sum(len(local.groups(s)) for s in local.config.sources)
    assert groups >= 10 and local.layout.n_buckets >= 10, (groups, local.layout.n_buckets)
    assert local.in_flight_groups == int(final.IN_FLIGHT_SHARE * groups) < groups
    assert local.in_flight_buckets == int(final.IN_FLIGHT_SHARE * local.layout.n_buckets) < local.layout.n_buckets
    remote = build_plan.make_plan(config(inputs, out, shard_rows=2, row_group_rows=1, chunk_rows=2,
                                         work="s3://bucket/build/work"), summaries)
    assert remote.work_is_remote and not local.work_is_remote
    assert remote.in_flight_groups == groups and remote.in_flight_buckets == remote.layout.n_buckets
