"""The build's budget server (pmd.politeness): started before any download process, stopped after the build."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import urllib.parse
from contextlib import contextmanager

from pmd.politeness import start_service
from pipelines.ray_runtime import resolve_address

log = logging.getLogger(__name__)


@contextmanager
def budget_service(config):  # type: ignore[no-untyped-def]
    """`config` (a pipelines.build.BuildConfig) for a build with one budget server for all its download processes.

    The server's address goes to them in the configuration's `download.budget_address` (every chunk task carries
    its DownloadOptions; the address is not part of the build's identity: pmd.download.DownloadOptions.to_dict).
    On a cluster it listens on the driver's node address, else on loopback. A build without URL sources, with the
    img2dataset backend, or with an address given already, starts none."""
    if config.download.budget_address or config.download.backend != "http" or \
            not any(s.mode == "url" for s in config.sources):
        yield config
        return
    bind = _bind_address(resolve_address(config.ray_address))
    d = config.download
    service = start_service(d.max_per_host, d.max_rate_per_host, d.max_retry_after, d.timeout, bind)
    try:
        yield dataclasses.replace(config, download=dataclasses.replace(d, budget_address=service.address))
    finally:
        service.stop()


def _bind_address(ray_address: str | None) -> str:
    """Loopback for a local build or a cluster whose head is on loopback (every node on this machine), else this
    node's address as Ray sees it (the other nodes reach the driver there)."""
    if ray_address is None:
        return "127.0.0.1"
    host = urllib.parse.urlsplit(ray_address if "://" in ray_address else f"ray://{ray_address}").hostname or ""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        if host == "localhost":
            return "127.0.0.1"
    import ray.util

    return ray.util.get_node_ip_address()
