"""benchmarks/gpu_check.sh --dry-run on CPU: every part of the GPU check but the GPU (a one-process gloo group,
FSDP2, each step kind, FLOP counting, sync and async DCP saves, loads and resumes, every collective's tensors
checked against its group's device) runs and writes one JSON with every figure present and finite; the resumes
reproduce the step after each checkpoint exactly (CPU)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check import KIND_KEYS, KINDS, RESULT_KEYS  # noqa: E402


@pytest.mark.slow
def test_gpu_check_dry_run_cpu_writes_one_json_with_finite_figures(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    t = time.perf_counter()
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path),
                        "--", "run.activation_checkpointing=true"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.perf_counter() - t < 60
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert json.loads(r.stdout.strip().splitlines()[-1]) == res  # the same JSON on stdout
    assert set(RESULT_KEYS) <= set(res) and res["process_group"].startswith("gloo, 1 process, FSDP2")
    assert res["config"]["activation_checkpointing"] is True and res["config"]["collective_device_check"] is True
    for kind in KINDS:
        rec = res["kinds"][kind]
        for key in KIND_KEYS:
            assert isinstance(rec[key], (int, float)) and math.isfinite(rec[key]), (kind, key, rec[key])
        assert rec["samples_per_s"] > 0 and 0 <= rec["loader_wait_share"] < 1 and rec["model_flops"] > 0
        assert rec["recompute_flops"] > 0  # activation checkpointing re-runs the layers' forward
        assert (rec["codebook_flops"] > 0) == (kind != "text")
        assert rec["mfu"] < rec["hfu"]
    ck = res["checkpoint"]
    for key in ("save_s", "async_block_s", "async_total_s", "load_sync_s", "load_async_s", "size_gib"):
        assert math.isfinite(ck[key]) and ck[key] > 0, key
    assert ck["resume_sync_loss_diff"] == 0.0 and ck["resume_async_loss_diff"] == 0.0
