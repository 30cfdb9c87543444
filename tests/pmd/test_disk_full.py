"""Disk full (issue 24 item 5): a build that meets ENOSPC stops with one line naming the file and the phase, keeps
what it had finished, and its rerun after space is freed writes the bytes of an uninterrupted build. Through the
fault-injection point of pmd.atomic (PMD_FAULT_ENOSPC, inherited by the pool's spawned workers), and on a real
small tmpfs where this user may mount one."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from pmd import atomic
from pmd_cli.pmd import main
from tests.pipelines.build_fixtures import make_coco

pytestmark = pytest.mark.slow


def _argv(coco, out: Path, *extra: str) -> list[str]:
    return ["build", "coco", str(coco.karpathy), "--images", str(coco.zips[0]), "--images", str(coco.zips[1]),
            "--out", str(out), "--shard-rows", "16", "--chunk-rows", "8", "--row-group-rows", "4", "--seed", "2",
            "--executor", "pool", "--num-cpus", "2", "-q", *extra]


def _outputs(out: Path) -> list[tuple[str, bytes]]:
    return [(str(p.relative_to(out)), p.read_bytes())
            for p in sorted([*out.glob("shards/*.parquet"), *out.glob("failures/*.parquet")])]


def _chunks(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in sorted(out.glob("work/images/*/chunk-*.arrow"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    coco = make_coco(root / "in", n_images=12)  # 60 candidates: 8 image chunks, 4 shards
    assert main(_argv(coco, root / "reference")) == 0
    return coco, root, _outputs(root / "reference")


@pytest.mark.parametrize("target, phase", [("*/work/images/coco/chunk-00003.arrow", "images"),  # in a worker
                                           ("*/shards/shard-00002.parquet", "shards"),
                                           ("*/manifest.json", "manifest")])
def test_enospc_stops_with_one_line_and_the_rerun_writes_the_same_bytes(reference, monkeypatch, capsys, target,
                                                                        phase):
    """`kept`: a file finished before the fault, which the rerun must reuse, not write again."""
    coco, root, expected = reference
    out = root / f"out-{phase}"
    monkeypatch.setenv(atomic.FAULT_ENV, target)
    atomic._fault_counts.clear()  # the hook counts per process; this one runs several builds
    capsys.readouterr()
    assert main(_argv(coco, out)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("pmd build: error: No space left on device (PMD_FAULT_ENOSPC) writing ")
    assert f"(phase {phase}); what was finished is kept" in err and str(out) in err
    written = err.split(" writing ", 1)[1].split(" (phase")[0]
    assert Path(written).match(target.lstrip("*/")) and not Path(written).exists()
    assert not list(out.rglob(f".*{atomic.TEMP_MARK}*")), "the partial file is removed"
    assert not (out / "manifest.json").exists()
    kept = _chunks(out)[:1] if phase == "images" else ["shards/shard-00000.parquet"]
    assert kept and (out / kept[0]).is_file(), "what was finished before the fault is kept"

    # Space freed. The hook now fails a rewrite of that finished file: the rerun must reuse it.
    monkeypatch.setenv(atomic.FAULT_ENV, f"*/{kept[0]}")
    atomic._fault_counts.clear()
    assert main(_argv(coco, out)) == 0, capsys.readouterr().err
    assert _outputs(out) == expected


def test_quota_errors_of_stores_count_as_disk_full():
    s3_full = OSError("When uploading part for key 'pmd/shards/shard-00001.parquet' in bucket 'pmd': AWS Error "
                      "UNKNOWN (HTTP status 507) during UploadPart operation: XMinioStorageFull")
    for exc in (s3_full, OSError("AWS Error ACCESS_DENIED during PutObject operation: QuotaExceeded"),
                OSError(errno.EDQUOT, "Disk quota exceeded"), OSError(errno.ENOSPC, "No space left on device")):
        assert atomic.is_out_of_space(exc), exc
    for exc in (OSError(errno.EACCES, "Permission denied"), OSError("AWS Error NETWORK_CONNECTION"),
                ValueError("no space left")):
        assert not atomic.is_out_of_space(exc), exc
    wrapped = RuntimeError("task failed")
    wrapped.cause = atomic.OutOfSpace("/o/shards/x.parquet")  # as a RayTaskError carries its task's exception
    assert atomic.out_of_space(wrapped).filename == "/o/shards/x.parquet"


def test_the_hook_fails_the_nth_matching_write_only(tmp_path, monkeypatch):
    monkeypatch.setenv(atomic.FAULT_ENV, "*/b-*.json@2")
    atomic._fault_counts.clear()
    atomic.write_json({"a": 1}, tmp_path / "a-1.json")
    atomic.write_json({"b": 1}, tmp_path / "b-1.json")
    with pytest.raises(atomic.OutOfSpace, match=r"writing .*b-2\.json; what was finished is kept") as caught:
        atomic.write_json({"b": 2}, tmp_path / "b-2.json")
    assert caught.value.errno == errno.ENOSPC
    atomic.write_json({"b": 3}, tmp_path / "b-3.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-1.json", "b-1.json", "b-3.json"]


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_a_real_full_filesystem(reference, capsys):
    """OUT (and its work directory) on a tmpfs too small for the build; the tmpfs then grows (remount keeps the
    files): the rerun finishes with the reference's bytes."""
    coco, root, expected = reference
    mount = root / "tmpfs"
    if not _mount_tmpfs(mount, "200k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mount / "out"
        capsys.readouterr()
        assert main(_argv(coco, out)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "No space left on device writing " + str(out) in err, err
        assert "(phase " in err
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True, timeout=10)
        assert main(_argv(coco, out)) == 0
        assert _outputs(out) == expected
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)
