"""`pmd build`'s start and end around Ray (issue 18): the driver-side ingest and URL pass that run while Ray starts
write the same bytes as the URL pass on Ray, and a session's early stop of Ray's autoscaler monitor leaves no Ray
process behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from pmd import build_plan
from pipelines.build import load_config, run_build
from tests.httpserver import LoopbackServer
from tests.pipelines.build_fixtures import make_cc12m

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
shard_rows = 32
chunk_rows = 16
seed = 3
[image]
image_size = 32
[download]
timeout = 2.0
thread_count = 8
allow_networks = ["127.0.0.1/32"]
[[sources]]
name = "conceptual_12m"
inputs = ["in/cc12m.tsv"]
"""


def _outputs(out: Path) -> dict[str, bytes]:
    """Every shard and failures file of a finished build, by its path under OUT."""
    return {str(p.relative_to(out)): p.read_bytes()
            for d in ("shards", "failures") for p in sorted((out / d).glob("*.parquet"))}


def test_url_pass_in_the_driver_writes_what_the_url_pass_on_ray_writes(tmp_path, ray_local, monkeypatch):
    server = LoopbackServer(image_size=(64, 48), sleep_s=2.5).start()
    try:
        make_cc12m(tmp_path / "in", server, n_good=40)
        (tmp_path / "build.toml").write_text(CONFIG)
        seen: list[bool] = []
        url_pass = build_plan.url_pass

        def spy(plan, executor):
            seen.append(executor.kind == "local")
            return url_pass(plan, executor)

        monkeypatch.setattr(build_plan, "url_pass", spy)
        manifests = {}
        for name, limit in (("driver", build_plan.LOCAL_URL_PASS_ROWS), ("ray", 0)):
            monkeypatch.setattr(build_plan, "LOCAL_URL_PASS_ROWS", limit)
            config = load_config(tmp_path / "build.toml", {"out": str(tmp_path / f"out-{name}"), "executor": "ray"})
            config.progress = False
            manifests[name] = run_build(config)
    finally:
        server.stop()
    # The small build's URL pass ran in the driver (local executor), the other on Ray: both paths were taken.
    assert seen == [True, False]
    driver, ray_ = _outputs(tmp_path / "out-driver"), _outputs(tmp_path / "out-ray")
    assert driver and driver == ray_
    assert manifests["driver"]["accounting"] == manifests["ray"]["accounting"]
    assert manifests["driver"]["totals"]["pairs"] == 40 + len(("redirect 301", "redirect 302")) + 3
    assert manifests["driver"]["sources"]["conceptual_12m"]["downloads"] == \
        manifests["ray"]["sources"]["conceptual_12m"]["downloads"]


SESSION = textwrap.dedent("""
    import json, sys, time
    import psutil
    import ray
    from ray._private import worker
    from pipelines.ray_runtime import _stop_autoscaler_monitor, ray_session

    with ray_session(num_cpus=1, temp_dir=sys.argv[1]):
        node = worker._global_node
        pids = {kind: [info.process.pid for info in infos] for kind, infos in node.all_processes.items()}
        monitor = psutil.Process(pids["monitor"][0])
        _stop_autoscaler_monitor()
        monitor.wait(timeout=10)  # raises if it is still running
        assert "monitor" not in node.all_processes
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42  # the node works on without it
    print(json.dumps(pids))
""")


def test_local_session_stops_the_monitor_first_and_leaves_no_process():
    import psutil

    temp_dir = tempfile.mkdtemp(prefix="pmdray")  # short: Ray's socket paths must fit in 107 bytes
    try:
        proc = subprocess.run([sys.executable, "-c", SESSION, temp_dir], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, check=False,
                              env={"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "PATH": "/usr/bin:/bin"})
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pids = json.loads(proc.stdout.strip().splitlines()[-1])
    assert pids.get("monitor") and pids.get("gcs_server"), pids
    for kind, kind_pids in pids.items():
        for pid in kind_pids:
            alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            assert not alive, f"Ray's {kind} (pid {pid}) outlived the session"
    assert "autoscaler failed" not in proc.stderr.lower()
