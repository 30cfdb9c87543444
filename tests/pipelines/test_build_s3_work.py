"""A build whose work state is on object storage (the loopback S3 server, tests/s3server.py): `--out s3://...`
with its default work (OUT/work on the same store) writes the same shard bytes as the same build on local disk,
and nothing under the working directory or $HOME; a `pmd build` killed with SIGKILL in each phase and run again
writes the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.build import load_config, run_build
from pmd import storage
from tests.httpserver import LoopbackServer
from tests.pipelines.build_fixtures import make_cc12m, make_coco, two_source_config
from tests.s3server import Traffic, s3_environment

pytestmark = pytest.mark.slow

# The slow URLs of tests/pipelines/test_build_s3.py are left out: every run here must be short.
CONFIG = two_source_config(shard_rows=20, chunk_rows=16, seed=3, image_size=24, timeout=2.0, thread_count=8,
                           executor="local")


TRAFFIC = Traffic()


@pytest.fixture(scope="module")
def s3():
    with s3_environment(traffic=TRAFFIC) as env:
        yield env


@pytest.fixture(scope="module")
def reference(tmp_path_factory, s3):
    """The inputs and the same build on local disk (work under OUT/work)."""
    server = LoopbackServer(image_size=(64, 48)).start()
    root = tmp_path_factory.mktemp("s3-work")
    make_cc12m(root / "in", server, n_good=24)
    make_coco(root / "in", n_images=8)
    (root / "build.toml").write_text(CONFIG)
    config = load_config(root / "build.toml", {"out": str(root / "local")})
    config.progress = False
    manifest = run_build(config)
    assert len(manifest["shards"]) >= 3
    yield root, manifest
    server.stop()


def corpus(out) -> tuple[dict[str, bytes], dict[str, list[dict]]]:
    """(shard name -> bytes, failures file -> rows without `detail`)."""
    shards = {storage.basename(p): storage.read_bytes(p)
              for p in storage.list_files(storage.join(out, "shards"), ".parquet")}
    failures = {storage.basename(p): pq.read_table(storage.open_input(p)).drop_columns(["detail"]).to_pylist()
                for p in storage.list_files(storage.join(out, "failures"), ".parquet")}
    return shards, failures


def pmd_build(root: Path, out: str, *, kill_at: tuple[str, int] | None = None, home: Path | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`pmd build --config ... --out OUT` in a fresh process (killed with SIGKILL at `kill_at`: MODULE:ATTR, N)."""
    prefix = ["-m", "tests.pipelines.kill_at", kill_at[0], str(kill_at[1]), "--"] if kill_at else \
        ["-c", "import sys; from pmd_cli.pmd import main; sys.exit(main(sys.argv[1:]))"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    if home is not None:
        env["HOME"] = str(home)
        # matplotlib's font cache is a tool's cache, not the build's state: it goes to its own folder, outside the
        # $HOME this test watches (on a machine without one, matplotlib builds it under $HOME/.cache).
        env["MPLCONFIGDIR"] = str(home.parent / "matplotlib-cache")
    return subprocess.run([sys.executable, *prefix, "build", "--config", str(root / "build.toml"), "--out", out, "-q"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_build_with_its_work_on_s3_equals_the_local_build_and_writes_nothing_locally(reference, tmp_path):
    root, local = reference
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    out = "s3://pmd/all-remote"
    result = pmd_build(root, out, home=home, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["shards"] == local["shards"]  # names, rows, bytes, sha256
    assert manifest["accounting"] == local["accounting"]
    assert corpus(out) == corpus(root / "local")
    # The work state is beside the corpus on the store, and no file was written on this machine's cwd or $HOME.
    work = storage.list_files(storage.join(out, "work"), recursive=True)
    assert storage.join(out, "work", "build.json") in work
    assert any("/work/final/groups/" in p for p in work) and any("/work/ingest/" in p for p in work)
    assert list(home.rglob("*")) == [] and list(cwd.rglob("*")) == []


def test_on_s3_a_group_is_one_pack_each_piece_read_once_and_each_bucket_written_from_one_object(reference):
    """Scatter (A) uploads each group's pieces as one object, its pack, with every bucket's byte range in the
    group's marker; dedup (B1) fetches each bucket's range of each pack once (one ranged GET) and writes the
    bucket's kept rows in corpus order as one object; the bucket's write (B2) reads that object, not the ranges
    again. Once every bucket is written the packs are recorded as consumed and deleted."""
    root, local = reference
    out = "s3://pmd/reads"
    TRAFFIC.reset()
    result = pmd_build(root, out)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["shards"] == local["shards"]
    work = "/pmd/reads/work/final"
    markers = [json.loads(storage.read_text(p))
               for p in storage.list_files(storage.join(out, "work", "final", "groups"), ".json", recursive=True)]
    packs = {f"{work}/packs/{m['source']}/group-{m['group']:05d}.pack": m["pack"] for m in markers if m["pack"]}
    assert len(packs) >= 2 and any(len(ranges) >= 2 for ranges in packs.values())  # groups spanning buckets
    for m in markers:
        assert sum(rows for _, _, rows in m["pack"].values()) == m["ok"]
    requests = TRAFFIC.requests
    assert {p: n for (method, p), n in requests.items() if method == "PUT" and "/packs/" in p} == \
        {p: 1 for p in packs}
    assert not [p for (method, p), n in requests.items() if method == "PUT" and "/final/pieces/" in p]
    assert {p: n for (method, p), n in requests.items() if method == "GET" and "/packs/" in p} == \
        {p: len(ranges) for p, ranges in packs.items()}  # one ranged GET per (pack, bucket)
    ordered = {p: n for (method, p), n in requests.items() if method == "GET" and "/final/ordered/" in p}
    assert len(ordered) == manifest["layout"]["n_buckets"] and set(ordered.values()) == {1}
    assert not storage.list_files(storage.join(out, "work", "final", "ordered"))  # deleted once written
    assert not storage.list_files(storage.join(out, "work", "final", "packs"), recursive=True)
    consumed = json.loads(storage.read_text(storage.join(out, "work", "final", "packs-consumed.json")))
    assert consumed["packs"] == sorted(f"{m['source']}/group-{m['group']:05d}" for m in markers if m["pack"])


# One SIGKILL in each phase of the build: (function, calls it returns before the kill; 0 = before its first).
PHASES = {
    "ingest": ("pmd.ingest:process_chunk", 2),  # the second source's part written, its summary not
    "urls": ("pmd.urls:owners_bucket", 1),
    "images": ("pmd.build_plan:run_chunk", 3),
    "scatter": ("pmd.final:scatter_group", 2),
    "dedup": ("pmd.final:dedup_bucket", 0),
    "shards": ("pmd.final:_write_shard", 1),  # one shard uploaded, the next not
    "failures": ("pmd.final:write_failures", 1),
    "manifest": ("pmd.manifest:Manifest.write", 0),
}


def test_a_build_on_s3_killed_in_each_phase_resumes_to_the_same_bytes(reference):
    """One run per phase, each killed there and the next resuming what it left (then killed in the next phase);
    the last run finishes. Every phase's work is thus resumed from a kill -9 once."""
    root, local = reference
    out = "s3://pmd/killed-in-each-phase"  # moto's state is per process: test_build_s3 uses pmd/killed
    for phase, kill_at in PHASES.items():
        killed = pmd_build(root, out, kill_at=kill_at)
        assert killed.returncode == -9, (phase, killed.returncode, killed.stderr[-3000:])
        assert not storage.exists(storage.join(out, "manifest.json"))
        assert storage.exists(storage.join(out, "work", "build.json"))
    result = pmd_build(root, out)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["shards"] == local["shards"] and manifest["accounting"] == local["accounting"]
    assert corpus(out) == corpus(root / "local")
