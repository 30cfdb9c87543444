"""The executors behind the library's one interface (pmd.executor.Executor): in-process, a process pool, Ray.

The library's plans (pmd.build_plan for `pmd build`, pmd.ingest.ingest_source for `pmd ingest` and the build's
ingest) submit tasks to one of these; what a task writes does not depend on which ran it. One retry policy for all
of them: Ray re-runs a task whose worker or node died up to TASK_RETRIES times (every task is idempotent: outputs
whole under deterministic names, marker last); the pool cannot re-run a task whose process died and stops with
an error naming it (rerunning the command resumes); in-process, a task's exception is the run's.
"""

from __future__ import annotations

import importlib
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from pmd.executor import BuildError, Executor, InProcessExecutor, _ignore
from pipelines.ray_runtime import TASK_RETRIES

__all__ = ["TASK_RETRIES", "Executor", "LocalExecutor", "PoolExecutor", "RayExecutor"]


class LocalExecutor(InProcessExecutor):
    """In the driver, one task at a time (`--executor local`: debugging)."""


class _Bounded:
    """A bounded number of tasks in flight; `on_done` runs in the driver's thread as each finishes."""

    kind = ""

    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self.in_flight: dict = {}

    def submit(self, fn: Callable, *args: object, on_done: Callable[[Any], None] = _ignore,
               limit: int | None = None, name: str | None = None) -> None:
        cap = min(self.max_in_flight, limit) if limit else self.max_in_flight
        while len(self.in_flight) >= max(1, cap):
            self._wait_one()
        self.in_flight[self._start(fn, args)] = on_done

    def drain(self) -> None:
        while self.in_flight:
            self._wait_one()

    def _start(self, fn: Callable, args: tuple) -> object:
        raise NotImplementedError

    def _wait_one(self) -> None:
        raise NotImplementedError


def _preload(modules: Sequence[str]) -> None:
    """A pool worker's start: the task functions' modules (and with them pyarrow, polars) imported once."""
    for name in modules:
        importlib.import_module(name)


class PoolExecutor(_Bounded):
    """A pool of `workers` processes on this machine (no Ray), two tasks per worker in flight."""

    kind = "pool"

    def __init__(self, workers: int, preload: Sequence[str] = ()):
        # Processes, not threads: a chunk's decode/resize/encode release the GIL but its download client and
        # row handling do not; 2 threads in one process took 8.7 s for the image stage of 10,000 images where
        # two Ray workers took 6.8 s (docs/benchmarks.md). Spawned (not forked: the driver has threads), each
        # importing the task modules once at start while the driver ingests.
        super().__init__(2 * workers)  # as for Ray: one queued per worker while the driver prepares the next
        self.pool = futures.ProcessPoolExecutor(max_workers=workers, initializer=_preload, initargs=(tuple(preload),),
                                                mp_context=multiprocessing.get_context("spawn"))
        self.pool.submit(int)  # launches every worker now

    def put(self, value: object) -> object:
        return value

    def _start(self, fn: Callable, args: tuple) -> object:
        return self.pool.submit(fn, *args)

    def _wait_one(self) -> None:
        done, _ = futures.wait(list(self.in_flight), return_when=futures.FIRST_COMPLETED)
        for future in done:
            try:
                result = future.result()
            except BrokenProcessPool as e:
                # Unlike Ray, the pool does not re-run a task whose process died; the finished work stays.
                raise BuildError(f"a worker process of the pool died ({e}); rerun the same command to resume, "
                                 "or use --executor ray, which re-runs lost tasks") from e
            self.in_flight.pop(future)(result)

    def cancel(self) -> None:
        for future in self.in_flight:
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)  # running tasks finish: their outputs stay whole
        self.in_flight.clear()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class RayExecutor(_Bounded):
    """Ray tasks of `task_cpus` CPUs each, in the Ray session already started (pipelines.ray_runtime.ray_session),
    each re-run up to TASK_RETRIES times when its worker or node dies."""

    kind = "ray"

    def __init__(self, task_cpus: float = 1.0):
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        # Two tasks queued per slot keeps every CPU busy while the driver prepares the next chunk.
        super().__init__(max(2, int(2 * cpus / task_cpus)))
        self.task_cpus = task_cpus
        self._remote: dict = {}

    def put(self, value: object) -> object:
        import ray

        return ray.put(value)

    def _start(self, fn: Callable, args: tuple) -> object:
        import ray

        if fn not in self._remote:
            self._remote[fn] = ray.remote(num_cpus=self.task_cpus, max_retries=TASK_RETRIES)(fn)
        return self._remote[fn].remote(*args)

    def _wait_one(self) -> None:
        import ray

        ready, _ = ray.wait(list(self.in_flight), num_returns=1)
        for ref in ready:
            self.in_flight.pop(ref)(ray.get(ref))

    def cancel(self) -> None:
        import ray

        for ref in self.in_flight:
            ray.cancel(ref, force=True)
        self.in_flight.clear()

    def close(self) -> None:
        pass
