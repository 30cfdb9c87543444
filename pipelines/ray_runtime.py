"""Starting and joining Ray the same way everywhere: embedded local by default, a cluster when asked."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from pmd import storage

log = logging.getLogger(__name__)


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
        ray.shutdown()
