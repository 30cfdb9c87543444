"""A build on a three-node Ray cluster (one machine) losing a worker node mid image stage, against a local build.

Run by tests/pipelines/test_cluster.py in a fresh interpreter: the cluster needs a driver of its own, apart from
the test session's embedded Ray. Prints one JSON line: what happened, and whether the shards are identical.

    python -m tests.pipelines.cluster_build WORKDIR
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

# Every node and the driver use loopback only (Ray otherwise advertises the machine's network address): the test
# talks to nothing beyond 127.0.0.1. Read by Ray at import.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from pipelines.build import load_config, run_build
from tests.httpserver import LoopbackServer, _Handler
from tests.pipelines.build_fixtures import make_cc12m, make_coco, two_source_config

CONFIG = two_source_config(shard_rows=50, chunk_rows=20, seed=11, image_size=32, timeout=20.0,
                            thread_count=4)

REQUEST_DELAY_S = 0.15  # on the cluster each image answers slowly, so chunk tasks are running when a node dies


class _CountingHandler(_Handler):
    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests += 1
        time.sleep(self.server.delay_s)
        super().do_GET()


class _CountingServer(LoopbackServer):
    def __init__(self) -> None:
        super().__init__(image_size=(64, 48), sleep_s=60.0)
        self.RequestHandlerClass = _CountingHandler
        self.lock = threading.Lock()
        self.requests = 0
        self.delay_s = 0.0


def shard_bytes(out: Path) -> list[bytes]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(out / s["file"]).read_bytes() for s in manifest["shards"]]


def main(workdir: Path) -> dict:
    from ray.cluster_utils import Cluster

    server = _CountingServer().start()
    # Only good images, redirects, permanent failures and duplicates: no row whose outcome depends on timing.
    url = make_cc12m(workdir / "in", server, n_good=240)
    make_coco(workdir / "in", n_images=30)
    config_file = workdir / "build.toml"
    config_file.write_text(CONFIG)

    local = load_config(config_file, {"out": str(workdir / "out-local"), "executor": "local"})
    local.progress = False
    run_build(local)
    url_requests = server.requests

    node = {"num_cpus": 1, "temp_dir": tempfile.mkdtemp(prefix="pmdcluster")}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    doomed = cluster.add_node(**node)
    cluster.wait_for_nodes()
    report: dict = {"nodes": 3, "url_requests_per_build": url_requests}
    try:
        start = server.requests
        server.delay_s = REQUEST_DELAY_S

        def remove_midway() -> None:
            # A third of the way through the URL source's downloads the worker node is killed without warning.
            while server.requests - start < url_requests // 3:
                time.sleep(0.01)
            report["removed_after_requests"] = server.requests - start
            cluster.remove_node(doomed, allow_graceful=False)
            report["removed"] = True

        killer = threading.Thread(target=remove_midway, daemon=True)
        killer.start()
        on_cluster = load_config(config_file, {"out": str(workdir / "out-cluster"), "ray_address": cluster.address})
        on_cluster.progress = False
        manifest = run_build(on_cluster)
        killer.join(timeout=5)
        report["removed_before_end"] = report.get("removed", False)
        report["url_requests_on_cluster"] = server.requests - start
        report["pairs"] = manifest["totals"]["pairs"]
        report["failures_by_reason"] = manifest["totals"]["failures_by_reason"]
        report["expected_url_failures"] = url.expected_failures
    finally:
        cluster.shutdown()
        server.stop()
        # Cluster() records its address for `ray.init("auto")`; a stale one would make a later bare init hang.
        Path(tempfile.gettempdir(), "ray", "ray_current_cluster").unlink(missing_ok=True)
    report["identical"] = shard_bytes(workdir / "out-cluster") == shard_bytes(workdir / "out-local")
    report["shards"] = len(shard_bytes(workdir / "out-local"))
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
