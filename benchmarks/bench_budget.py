"""The cost of the build's host budget per request (pmd.politeness), where it does not bind.

    python benchmarks/bench_budget.py --requests 20000 --threads 16 --rounds 3

One process, `--threads` threads, each taking a lease, giving it back at once, `--requests` in all, over 8 keys
with room for every thread (max_per_host = threads: the budget never makes anyone wait): through the build's
budget server (a subprocess, loopback TCP) and through a process's own budget (no server). Reports per request the
wall time, this process's CPU and the server's CPU (psutil), medians over rounds alternating the two. What a
request costs beside an image's download and processing (milliseconds of CPU, docs/benchmarks.md) is the figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmd import politeness


def run(budget, requests: int, threads: int) -> tuple[float, float]:
    per = requests // threads

    def work(i: int) -> None:
        key = f"host{i % 8}"
        for _ in range(per):
            budget.release(budget.acquire(key))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    wall, cpu = time.perf_counter(), time.process_time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.requests // args.threads * args.threads
    service = politeness.start_service(args.threads, 0.0, 30.0, 10.0)
    server = psutil.Process(service.process.pid)
    figures: dict[str, list[dict]] = {"server": [], "local": []}
    try:
        remote = politeness.RemoteBudget(service.address)
        local = politeness.LocalBudget(politeness.HostBudgets(args.threads))
        for r in range(args.rounds):
            for name in (["server", "local"] if r % 2 == 0 else ["local", "server"]):
                before = sum(server.cpu_times()[:2])
                wall, cpu = run(remote if name == "server" else local, n, args.threads)
                served = sum(server.cpu_times()[:2]) - before if name == "server" else 0.0
                figures[name].append({"wall_us": wall / n * 1e6, "client_cpu_us": cpu / n * 1e6,
                                      "server_cpu_us": served / n * 1e6})
    finally:
        service.stop()
    out = {name: {k: round(statistics.median(r[k] for r in rs), 1) for k in rs[0]} for name, rs in figures.items()}
    out["requests"], out["threads"], out["rounds"] = n, args.threads, args.rounds
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
