"""What the library's plans need of an executor (`Executor`), and the one executor the library itself has.

A plan (pmd.build_plan, pmd.ingest.ingest_source) turns a phase into tasks: a library function, its arguments and
a deterministic name (`phase/unit`, e.g. `images/coco/chunk-00003`), and submits the tasks that are not done. It
never knows where they run: `pipelines/executors.py` holds the executors that run them on this machine's process
pool or on Ray (one retry policy, TASK_RETRIES), chosen and started by `pipelines/build.py` and
`pipelines/ingest.py`. The library must not import them (nor Ray), so the interface is a Protocol here, and
`InProcessExecutor` (one task at a time in the calling thread) is the one the library uses by itself (the driver's
URL pass of a small build) and the one tests drive a whole build with.

Completion is not the executor's business: every task writes its outputs whole under deterministic names and its
marker last (pmd.atomic), and the plan asks the markers (pmd.plan) before it submits; an executor may therefore run
a task twice (Ray re-running a task of a lost node) without changing a byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


class BuildError(RuntimeError):
    """A build or ingest that cannot go on (a changed configuration, a dead pool worker, ...): one line for the
    user, exit 1. Defined here, beside the executor interface, so an executor need not import a plan to raise it."""


def _ignore(_: Any) -> None:
    return None


@runtime_checkable
class Executor(Protocol):
    """Runs `fn(*args)` somewhere, at most a bounded number at once (constant driver memory); `on_done(result)`
    runs in the driver's thread, in completion order."""

    kind: str  # "local", "pool" or "ray": what ran (recorded in the manifest)

    def put(self, value: object) -> object:
        """`value` as tasks receive it: shipped once (Ray's object store), not once per task."""

    def submit(self, fn: Callable, *args: object, on_done: Callable[[Any], None] = _ignore,
               limit: int | None = None, name: str | None = None) -> None:
        """Run fn(*args); `limit` caps the tasks in flight below the executor's own cap (disk-bound passes);
        `name`: the task's deterministic name (logs, tests)."""

    def drain(self) -> None:
        """Wait for every submitted task; their `on_done` have run when it returns."""

    def cancel(self) -> None:
        """Stop: forget what is queued, cancel what runs (a task's outputs are whole or absent)."""

    def close(self) -> None:
        """Release the executor's workers after a drain."""


class InProcessExecutor:
    """Every task runs at once in the calling thread, one at a time (the "local" executor: debugging, the driver's
    URL pass, tests)."""

    kind = "local"

    def put(self, value: object) -> object:
        return value

    def submit(self, fn: Callable, *args: object, on_done: Callable[[Any], None] = _ignore,
               limit: int | None = None, name: str | None = None) -> None:
        on_done(fn(*args))

    def drain(self) -> None:
        pass

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass
