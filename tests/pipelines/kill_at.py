"""`python -m tests.pipelines.kill_at MODULE:ATTR N -- PMD ARGS...`: run `pmd ARGS` in this process and kill it
with SIGKILL right after the N-th call of MODULE.ATTR returns (N = 0: just before the first call). With the
"local" executor every task runs in this process, so the kill lands exactly in the phase that function belongs to:
no cleanup handler, no finally block runs, as when a node is lost."""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys


def main(argv: list[str]) -> int:
    target, n, sep, *args = argv
    assert sep == "--", "usage: kill_at MODULE:ATTR N -- PMD ARGS..."
    module_name, attr = target.split(":")
    module = importlib.import_module(module_name)
    owner, name = module, attr
    if "." in attr:  # a method: CLASS.METHOD
        cls_name, name = attr.split(".")
        owner = getattr(module, cls_name)
    real = getattr(owner, name)
    calls = [0]

    @functools.wraps(real)
    def dying(*a, **k):
        if int(n) == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*a, **k)
        calls[0] += 1
        if calls[0] >= int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, dying)
    from pmd_cli.pmd import main as pmd_main

    return pmd_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
