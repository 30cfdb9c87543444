"""The executor "auto" (issue 18): the process pool up to POOL_MAX_CANDIDATES candidates, Ray above, and a pool
whose worker dies stops the build with a clear error (the byte-for-byte comparison with Ray, and kill + resume of a
pool build, are in test_build.py beside the Ray build they compare with)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipelines import build
from pipelines.build import BuildConfig, BuildError, SourceSpec, run_build
from tests.pipelines.build_fixtures import make_coco

pytestmark = pytest.mark.slow


def _config(coco, out: Path, **kw) -> BuildConfig:
    return BuildConfig(sources=[SourceSpec("coco", [coco.karpathy], coco.zips)], out=out, shard_rows=16,
                       chunk_rows=8, row_group_rows=4, seed=2, num_cpus=2, progress=False, **kw)


def _outputs(out: Path) -> list[tuple[str, bytes]]:
    return [(str(p.relative_to(out)), p.read_bytes()) for p in sorted([*out.glob("shards/*.parquet"),
                                                                        *out.glob("failures/*.parquet")])]


def test_auto_takes_the_pool_up_to_the_threshold_and_ray_above(tmp_path, ray_local, monkeypatch, caplog):
    coco = make_coco(tmp_path / "in", n_images=12)  # 60 candidates
    chosen = {}
    for name, threshold in (("at", coco.pairs), ("above", coco.pairs - 1)):
        monkeypatch.setattr(build, "POOL_MAX_CANDIDATES", threshold)
        caplog.clear()
        with caplog.at_level("INFO", logger="pipelines.build"):
            run_build(_config(coco, tmp_path / name))
        chosen[name] = [m for m in caplog.messages if m.startswith("executor auto")]
    assert chosen == {"at": ["executor auto: pool"], "above": ["executor auto: ray"]}
    assert [json.loads((tmp_path / name / "manifest.json").read_text())["executor"] for name in chosen] == ["pool",
                                                                                                          "ray"]
    assert _outputs(tmp_path / "at") and _outputs(tmp_path / "at") == _outputs(tmp_path / "above")
    # A named cluster always means Ray, whatever the size (the session's Ray stands in for the cluster here).
    monkeypatch.setattr(build, "POOL_MAX_CANDIDATES", coco.pairs)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    caplog.clear()
    with caplog.at_level("INFO", logger="pipelines.build"):
        run_build(_config(coco, tmp_path / "cluster"))
    assert [m for m in caplog.messages if m.startswith("executor auto")] == ["executor auto: ray"]
    assert _outputs(tmp_path / "cluster") == _outputs(tmp_path / "at")


def test_a_dead_pool_worker_is_a_build_error(tmp_path):
    coco = make_coco(tmp_path / "in", n_images=4)
    executor = build.make_executor(_config(coco, tmp_path / "out", executor="pool"))
    try:
        executor.submit(os._exit, 3)
        with pytest.raises(BuildError, match="worker process of the pool died.*rerun the same command"):
            executor.drain()
    finally:
        executor.cancel()
