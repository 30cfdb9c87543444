"""The build's budget server (pmd.politeness): started before any download process, stopped after the build."""

from __future__ import annotations

import dataclasses
import logging
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
    bind = "127.0.0.1"
    if resolve_address(config.ray_address) is not None:
        import ray.util

        bind = ray.util.get_node_ip_address()
    d = config.download
    service = start_service(d.max_per_host, d.max_rate_per_host, d.max_retry_after, d.timeout, bind)
    try:
        yield dataclasses.replace(config, download=dataclasses.replace(d, budget_address=service.address))
    finally:
        service.stop()
