"""`pmd build --out s3://...` against an S3-compatible server on loopback (moto): the corpus written to object
storage equals the same build written to local disk byte for byte; verify, stats and export read it; a build
killed with -9 while writing to it resumes to the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq

import pytest

from pipelines.build import default_work_dir, load_config, run_build
from pmd import atomic, stats, storage
from pmd_cli.pmd import main as pmd_main
from pmd.export import ExportOptions, export
from pmd.shards import verify
from tests.httpserver import LoopbackServer
from tests.pipelines.build_fixtures import kill_build_mid_image_stage, make_cc12m, make_coco, two_source_config
from tests.s3server import s3_environment

pytestmark = pytest.mark.slow

PMD = str(Path(sys.executable).with_name("pmd"))
CONFIG = two_source_config(shard_rows=40, chunk_rows=16, seed=3, image_size=24, timeout=1.0, thread_count=8,
                            executor="local")


@pytest.fixture(scope="module")
def s3():
    with s3_environment() as env:
        yield env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    server = LoopbackServer(image_size=(64, 48), sleep_s=1.5).start()
    root = tmp_path_factory.mktemp("build-s3")
    make_cc12m(root / "in", server, n_good=48, slow_every=12)
    make_coco(root / "in", n_images=16)
    (root / "build.toml").write_text(CONFIG)
    yield root, root / "build.toml"
    server.stop()


def build(config_file: Path, out: str, work: Path | None = None) -> dict:
    config = load_config(config_file, {"out": out, "work": str(work) if work else None})
    config.progress = False
    return run_build(config)


@pytest.fixture(scope="module")
def builds(inputs, s3):
    root, config_file = inputs
    local = build(config_file, str(root / "local"))
    remote = build(config_file, "s3://pmd/corpus", root / "work-s3")
    return root / "local", local, "s3://pmd/corpus", remote


def corpus_files(out) -> dict[str, bytes]:
    """Every shard of the corpus, relative name -> bytes."""
    return {f"shards/{storage.basename(p)}": storage.read_bytes(p)
            for p in storage.list_files(storage.join(out, "shards"), ".parquet")}


def failure_rows(out) -> dict[str, list[dict]]:
    """Every failures file's rows without `detail` (a download timeout's detail quotes the time left, which
    varies from run to run), relative name -> rows."""
    return {f"failures/{storage.basename(p)}": pq.read_table(storage.open_input(p)).drop_columns(["detail"]).to_pylist()
            for p in storage.list_files(storage.join(out, "failures"), ".parquet")}


def same_entries(a: list[dict], b: list[dict]) -> bool:
    return [{k: v for k, v in e.items() if k not in ("bytes", "sha256")} for e in a] == [
        {k: v for k, v in e.items() if k not in ("bytes", "sha256")} for e in b]


def test_a_build_on_s3_equals_the_same_build_on_local_disk(builds):
    local_out, local, remote_out, remote = builds
    assert len(local["shards"]) >= 3 and local["totals"]["pairs"] > 100
    assert remote["shards"] == local["shards"]  # names, rows, bytes, sha256
    assert same_entries(remote["failures"], local["failures"])
    assert remote["accounting"] == local["accounting"] and remote["totals"] == local["totals"]
    files = corpus_files(remote_out)
    assert files == corpus_files(local_out) and len(files) == len(local["shards"])
    failures = failure_rows(remote_out)
    assert failures == failure_rows(local_out) and len(failures) == len(local["failures"])
    # OUT holds the corpus only; the work state stayed in the work directory.
    assert sorted(p.split("/", 4)[-1] for p in storage.list_files(remote_out, recursive=True)) == sorted(
        ["manifest.json", "README.md", "croissant.json", *files, *failures])
    assert json.loads(storage.read_text(storage.join(remote_out, "manifest.json")))["shards"] == local["shards"]


def test_verify_stats_and_export_read_a_build_on_s3(builds, s3, tmp_path, capsys, monkeypatch):
    local_out, _, remote_out, _ = builds
    assert verify(remote_out) == []
    # The command line, with the endpoint given as a storage option instead of the environment.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv(storage.OPTIONS_ENV, "{}")  # recorded: restored after the test
    assert pmd_main(["verify", remote_out, "--storage-option", f"endpoint_override={s3['AWS_ENDPOINT_URL']}"]) == 0
    assert "OK" in capsys.readouterr().out
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["AWS_ENDPOINT_URL"])
    monkeypatch.setenv(storage.OPTIONS_ENV, "{}")

    remote_audit, local_audit = stats.audit(remote_out), stats.audit(local_out)
    assert remote_audit["trusted"] and remote_audit["build"] == remote_out
    assert {k: v for k, v in remote_audit.items() if k != "build"} == {
        k: v for k, v in local_audit.items() if k != "build"}

    to_local = export(remote_out, tmp_path / "wds", ExportOptions(shard_size=50, progress=False))
    to_s3 = export(remote_out, "s3://pmd/wds", ExportOptions(shard_size=50, progress=False))
    reference = export(local_out, tmp_path / "wds-ref", ExportOptions(shard_size=50, progress=False))
    assert to_local["shards"] == to_s3["shards"] == reference["shards"]
    assert storage.read_bytes("s3://pmd/wds/pmd-000001.tar") == (tmp_path / "wds-ref" / "pmd-000001.tar").read_bytes()

    # A shard changed on the object store is caught.
    shard = storage.join(remote_out, "shards", "shard-00001.parquet")
    good = storage.read_bytes(shard)
    atomic.write_bytes(storage.read_bytes(storage.join(remote_out, "shards", "shard-00000.parquet")), shard)
    try:
        assert any("shard-00001.parquet" in p and "sha256" in p for p in verify(remote_out))
    finally:
        atomic.write_bytes(good, shard)
    assert verify(remote_out) == []


def test_a_build_killed_while_writing_to_s3_resumes_to_the_same_bytes(builds, inputs, tmp_path):
    local_out, local, _, _ = builds
    root, config_file = inputs
    out, work = "s3://pmd/killed", tmp_path / "work"
    cmd = [PMD, "build", "--config", str(config_file), "--out", out, "--work", str(work), "-q"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    kill_build_mid_image_stage(cmd, work, env)
    assert not storage.exists(storage.join(out, "manifest.json"))
    done = sorted(p.name for p in (work / "images").glob("*/chunk-*.arrow"))
    assert done
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["shards"] == local["shards"] and same_entries(manifest["failures"], local["failures"])
    assert corpus_files(out) == corpus_files(local_out) and failure_rows(out) == failure_rows(local_out)
    assert verify(out) == []


def test_a_build_stopped_between_two_shard_uploads_resumes_to_the_same_bytes(builds, inputs, tmp_path, monkeypatch):
    """The final phase interrupted once a shard is on the object store and before the next: the rerun keeps
    what is there, writes the rest, and the corpus equals the uninterrupted one."""
    from pmd import final

    local_out, local, _, _ = builds
    _, config_file = inputs
    out, work = "s3://pmd/stopped", tmp_path / "work"
    real, calls, lock = final._write_shard, [], threading.Lock()

    def dying(*args):  # a bucket writes two shards at once on object storage: the second call of all dies
        with lock:
            calls.append(args[1])
            first = len(calls) == 1
        if not first:
            raise KeyboardInterrupt("killed between two shard uploads")
        return real(*args)

    monkeypatch.setattr(final, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build(config_file, out, work)
    monkeypatch.setattr(final, "_write_shard", real)
    assert len(storage.list_files(storage.join(out, "shards"), ".parquet")) == 1
    assert not storage.exists(storage.join(out, "manifest.json"))
    manifest = build(config_file, out, work)
    assert manifest["shards"] == local["shards"]
    assert corpus_files(out) == corpus_files(local_out) and failure_rows(out) == failure_rows(local_out)


def test_the_default_work_directory_is_beside_the_corpus_on_its_store(tmp_path):
    assert default_work_dir("s3://pmd/corpus") == storage.RemotePath("s3://pmd/corpus/work")
    assert default_work_dir("s3://pmd/corpus/") == default_work_dir("s3://pmd/corpus")
    assert default_work_dir(tmp_path / "out") == tmp_path / "out" / "work"
