"""Starting and joining Ray the same way everywhere: embedded local by default, a cluster when asked."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from pmd import storage

log = logging.getLogger(__name__)


# The one retry policy of every Ray task of a build (ingest parts, chunks, final-phase passes): Ray re-runs a task
# whose worker or node died this many times (every task is idempotent); a lost node costs its running tasks, not
# the build.
TASK_RETRIES = 5


def resolve_address(address: str | None) -> str | None:
    """`--ray-address`, else RAY_ADDRESS, else None (a fresh local instance).

    A bare `ray.init()` would silently join whatever cluster was last started on the host; we only join one when
    the user names it.
    """
    return address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None
                ) -> Iterator[None]:
    """Ray for the duration of a stage. Reuses an already initialised Ray (tests, notebooks) and leaves it up."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield
        return
    address = resolve_address(address)
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "ignore_reinit_error": True}
    if address:
        kwargs["address"] = address
        # Workers on other nodes resolve object-storage URLs as the driver does (credentials stay with the nodes).
        env = {k: os.environ[k] for k in storage.PROPAGATED_ENV if k in os.environ}
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        log.info("joining Ray cluster at %s", address)
    else:
        kwargs["address"] = "local"
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
        log.info("starting embedded local Ray with %s CPUs", kwargs["num_cpus"])
    ray.init(**kwargs)
    try:
        yield
    finally:
        if not address:
            _stop_autoscaler_monitor()
        ray.shutdown()


def _stop_autoscaler_monitor() -> None:
    """Kill the autoscaler monitor of the local instance we started, before `ray.shutdown()`.

    A one-node local instance has nothing to autoscale. `ray.shutdown()` stops the GCS before the monitor, whose
    SIGTERM handler then blocks on the GCS until Ray's one-second grace ends: measured 1.3-1.6 s of shutdown
    against 0.3 s with the monitor gone first (docs/benchmarks.md, "Downloads"). Uses Ray's own
    `Node.kill_monitor`; on a Ray without it, shutdown just takes the second.
    """
    try:
        from ray._private import worker

        node = getattr(worker, "_global_node", None)
        if node is not None and hasattr(node, "kill_monitor"):
            node.kill_monitor(check_alive=False)
    except Exception as e:  # noqa: BLE001 - a faster shutdown is an optimisation, never a failure
        log.debug("could not stop Ray's autoscaler monitor early: %s", e)
