"""`pmd build`: chooses and starts the executor, then runs the library's plan of the build on it.

The build itself is library code: pmd.build_config (BuildConfig, load_config), pmd.build_plan (the phases, their
tasks with deterministic names, what is done or invalidated, the manifest), pmd.build / pmd.urls / pmd.final (what
each task does). This module decides only where the tasks run (pipelines.executors) and overlaps the executors'
start with the driver's ingest:
- `auto`: the process pool's workers start beside the driver's ingest, whose candidate count then decides
  (POOL_MAX_CANDIDATES); a named cluster, or an ingest that needs Ray, means Ray;
- `ray`: Ray starts in the main thread while a driver-side ingest (and the URL pass of a small build) runs in a
  thread beside it; one Ray session for the ingest and the rest;
- `pool`, `local`: the process pool, or the driver itself.
Every download process of the build shares one host budget service (pipelines.politeness.budget_service).
The names other code imports from here (BuildConfig, load_config, BuildError, ...) are the library's.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from pmd import build_plan
from pmd.build_config import (EXECUTORS, WORK_DIR, BuildConfig, SourceSpec, config_to_toml, default_work_dir,
                              load_config)
from pmd.build_plan import BuildError, code_version
from pmd.build_plan import candidates as _candidates
from pipelines.executors import Executor, LocalExecutor, PoolExecutor, RayExecutor
from pipelines.politeness import budget_service
from pipelines.ray_runtime import ray_session, resolve_address

__all__ = ["EXECUTORS", "POOL_MAX_CANDIDATES", "WORK_DIR", "BuildConfig", "BuildError", "SourceSpec",
           "code_version", "config_to_toml", "default_work_dir", "load_config", "make_executor", "pool_workers",
           "run_build"]

log = logging.getLogger(__name__)

# executor "auto": a build of at most this many candidates (after ingest; no `ray_address`) runs on the "pool"
# executor, a larger one on Ray. PLACEHOLDER
POOL_MAX_CANDIDATES = 100_000
# What a pool worker imports at its start (while the driver ingests): every task function's module.
_TASK_MODULES = ("pmd.build_plan",)


def make_executor(config: BuildConfig, kind: str | None = None) -> Executor:
    """The executor of `kind` (default config.executor, not "auto"); a pool's workers start here, Ray's session
    must already be up."""
    kind = kind or config.executor
    if kind == "local":
        return LocalExecutor()
    if kind == "pool":
        return PoolExecutor(pool_workers(config), preload=_TASK_MODULES)
    if kind == "ray":
        return RayExecutor(config.task_cpus)
    raise ValueError(f"no executor {kind!r}")


def pool_workers(config: BuildConfig) -> int:
    """Tasks the "pool" executor runs at once: the CPUs given (`num_cpus`, default this machine's) over `task_cpus`."""
    return max(1, int((config.num_cpus or os.cpu_count() or 1) / config.task_cpus))


# ------------------------------------------------------------------------------------------------------ ingest
def _ingest(config: BuildConfig, spec: SourceSpec) -> dict:
    """One source's ingest (pipelines.ingest: in the driver, or on Ray for large inputs and named clusters)."""
    from pipelines.ingest import run_ingest

    return run_ingest(_ingest_config(config, spec))


def _ingest_config(config: BuildConfig, spec: SourceSpec):  # -> pipelines.ingest.IngestConfig
    from pipelines.ingest import IngestConfig

    return IngestConfig(source=spec.name, inputs=spec.inputs, out=config.work / "ingest",
                        options=spec.options, executor="local" if config.executor in ("local", "pool") else "auto",
                        ray_address=config.ray_address, num_cpus=config.num_cpus, progress=config.progress)


def _ingests_in_driver(config: BuildConfig) -> bool:
    """Whether every source's ingest runs in this process (reused, or small enough for the local executor)."""
    return all(build_plan.reusable_ingest(config, spec) is not None
               or _ingest_config(config, spec).choose_executor() == "local" for spec in config.sources)


def _ingest_all(config: BuildConfig, timings: dict) -> dict[str, dict]:
    return build_plan.ingest_all(config, timings, _ingest)


def _driver_side_start(config: BuildConfig, timings: dict) -> tuple[dict, dict | None]:
    return build_plan.driver_side_start(config, timings, _ingest)


def _with_driver_side_urls(config: BuildConfig, summaries: dict, timings: dict) -> tuple[dict, dict | None]:
    return summaries, build_plan.driver_side_urls(config, summaries, timings)


# --------------------------------------------------------------------------------------------------------- run
def run_build(config: BuildConfig) -> dict:
    """Build (or resume) the corpus in config.out; returns the manifest, also written to OUT/manifest.json."""
    with budget_service(config) as config:  # host budgets for every download process of the build
        return _run_build(config)


def _run_build(config: BuildConfig) -> dict:
    started = time.perf_counter()
    build_plan.start(config)
    timings: dict[str, float] = {}
    kind = config.executor
    summaries: dict | None = None
    pool: Executor | None = None
    if kind == "auto":
        kind = "ray"
        if resolve_address(config.ray_address) is None and _ingests_in_driver(config):
            # The pool's workers start (speculatively: ~0.3 s of imports each) beside the driver's ingest, whose
            # candidate count then decides; a build above POOL_MAX_CANDIDATES starts Ray after its ingest.
            pool = make_executor(config, "pool")
            try:
                summaries = _ingest_all(config, timings)
            except BaseException:
                pool.cancel()
                raise
            kind = "pool" if _candidates(config, summaries) <= POOL_MAX_CANDIDATES else "ray"
            if kind == "ray":
                pool.cancel()
        log.info("executor auto: %s", kind)
    if kind in ("local", "pool"):
        executor = pool or make_executor(config, kind)  # a pool's workers start here
        try:
            if summaries is None:
                summaries, url_counts = _driver_side_start(config, timings)
            else:
                url_counts = build_plan.driver_side_urls(config, summaries, timings)
            manifest = build_plan.run_plan(config, summaries, executor, timings, url_counts)
        except BaseException:
            executor.cancel()
            raise
        executor.close()
    else:
        # Ray starts in this thread (ray.init sets a SIGTERM handler, main thread only) while a driver-side ingest
        # runs beside it: Ray's start is mostly waiting on its own processes (~2-3 s), a small build's ingest is
        # then free. An ingest that uses Ray itself (large inputs, a cluster) runs after, in the same session
        # (one Ray start per build, not one for the ingest and one for the rest).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmd-ingest") as threads:
            if summaries is not None:  # "auto" above POOL_MAX_CANDIDATES: ingested, the URL pass is left
                start = threads.submit(_with_driver_side_urls, config, summaries, timings)
            else:
                start = threads.submit(_driver_side_start, config, timings) if _ingests_in_driver(config) else None
            with ray_session(config.ray_address, config.num_cpus):
                summaries, url_counts = start.result() if start is not None else (_ingest_all(config, timings), None)
                executor = make_executor(config, "ray")
                try:
                    manifest = build_plan.run_plan(config, summaries, executor, timings, url_counts)
                except BaseException:
                    executor.cancel()
                    raise
    return build_plan.finish(config, manifest, kind, started)
