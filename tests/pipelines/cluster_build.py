"""A build on a three-node Ray cluster (one machine) losing a worker node mid image stage, against a local build.

Run by tests/pipelines/test_cluster.py in a fresh interpreter: the cluster needs a driver of its own, apart from
the test session's embedded Ray. Prints one JSON line: what happened, and whether the shards are identical.

    python -m tests.pipelines.cluster_build WORKDIR [--s3]

`--s3`: no disk shared between the nodes. The cluster build's OUT and work state are on the loopback S3 server
(tests/s3server.py), each node's processes get a TMPDIR of their own, and the removed node's is deleted with it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

# Every node and the driver use loopback only (Ray otherwise advertises the machine's network address): the test
# talks to nothing beyond 127.0.0.1. Read by Ray at import.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from pipelines.build import load_config, run_build
from pmd import storage
from tests.httpserver import LoopbackServer, _Handler
from tests.pipelines.build_fixtures import make_cc12m, make_coco, two_source_config
from tests.s3server import s3_server

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


def shard_bytes(out: Path | str) -> list[bytes]:
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    return [storage.read_bytes(storage.join(out, s["file"])) for s in manifest["shards"]]


def _add_node(cluster, tmpdir: Path | None, **args):
    """A node whose processes (raylet, workers) see `tmpdir` as TMPDIR: they inherit this process's environment
    when the node starts."""
    if tmpdir is None:
        return cluster.add_node(**args)
    saved = os.environ.get("TMPDIR")
    (tmpdir / "ray").mkdir(parents=True)  # the head writes its address there (ray_current_cluster)
    os.environ["TMPDIR"] = str(tmpdir)
    try:
        return cluster.add_node(**args)
    finally:
        if saved is None:
            os.environ.pop("TMPDIR")
        else:
            os.environ["TMPDIR"] = saved


def main(workdir: Path, s3: bool = False) -> dict:
    if s3:
        with s3_server() as env:
            os.environ.update(env)  # the nodes inherit the endpoint and the (dummy) credentials
            return _main(workdir, s3)
    return _main(workdir, s3)


def _main(workdir: Path, s3: bool) -> dict:
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
    tmpdirs = [workdir / f"node-{i}-tmp" for i in range(3)] if s3 else [None] * 3
    if s3:
        cluster = Cluster(initialize_head=False)
        _add_node(cluster, tmpdirs[0], **node, include_dashboard=False)
    else:
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    _add_node(cluster, tmpdirs[1], **node)
    doomed = _add_node(cluster, tmpdirs[2], **node)
    cluster.wait_for_nodes()
    cluster_out = "s3://pmd/out-cluster" if s3 else str(workdir / "out-cluster")
    report: dict = {"nodes": 3, "url_requests_per_build": url_requests, "s3": s3}
    try:
        start = server.requests
        server.delay_s = REQUEST_DELAY_S

        def remove_midway() -> None:
            # A third of the way through the URL source's downloads the worker node is killed without warning.
            while server.requests - start < url_requests // 3:
                time.sleep(0.01)
            report["removed_after_requests"] = server.requests - start
            cluster.remove_node(doomed, allow_graceful=False)
            if tmpdirs[2] is not None:  # the node's disk goes with it
                shutil.rmtree(tmpdirs[2], ignore_errors=True)
            report["removed"] = True

        killer = threading.Thread(target=remove_midway, daemon=True)
        killer.start()
        on_cluster = load_config(config_file, {"out": cluster_out, "ray_address": cluster.address})
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
    report["work_objects"] = len(storage.list_files(storage.join(cluster_out, "work"), recursive=True))
    report["identical"] = shard_bytes(cluster_out) == shard_bytes(workdir / "out-local")
    report["shards"] = len(shard_bytes(workdir / "out-local"))
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), "--s3" in sys.argv[2:])))
