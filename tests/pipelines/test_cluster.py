"""A build on a real three-node Ray cluster survives losing a worker node mid image stage, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_node_removed_mid_image_stage_gives_the_single_node_shards(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([sys.executable, "-m", "tests.pipelines.cluster_build", str(tmp_path)], capture_output=True,
                       text=True, timeout=900, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["removed_before_end"], report  # the node died while the URL source was still downloading
    assert 0 < report["removed_after_requests"] < report["url_requests_per_build"], report
    assert report["shards"] > 1 and report["identical"], report
    for reason, rows in report["expected_url_failures"].items():
        assert report["failures_by_reason"].get(reason, 0) >= rows, (reason, report)


def test_no_shared_disk_work_on_s3_node_removed_mid_image_stage_gives_the_single_node_shards(tmp_path):
    """OUT and the work state on the loopback S3 server, a TMPDIR per node, the removed node's deleted with it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([sys.executable, "-m", "tests.pipelines.cluster_build", str(tmp_path), "--s3"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["s3"] and report["work_objects"] > 0, report  # the work state was on the store
    assert report["removed_before_end"], report
    assert 0 < report["removed_after_requests"] < report["url_requests_per_build"], report
    assert report["shards"] > 1 and report["identical"], report
    assert not (tmp_path / "out-cluster").exists()
