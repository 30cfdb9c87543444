"""What a redirect hop costs the `http` backend: CPU and wall time per image, this tree against another one.

    python benchmarks/bench_redirect_hops.py --baseline-root /tmp/base --images 2000 --rounds 5

One loopback server (tests/httpserver.py, its own process, keep-alive) and one download thread (`download_chunk`,
thread_count 1), so the figure is the client's own cost per image, not concurrency: `plain` fetches /img/N.jpg,
`redirect` /redirect/301/N.jpg (a same-host 301 to /img/N.jpg: two requests per image). Each round runs this tree
and the baseline (`--baseline-root`: a checkout of other pmd code, e.g. `git worktree add /tmp/base COMMIT`) in
fresh child processes, the order alternated; the first 100 URLs of each run (imports, robots.txt, the server's
JPEG generation) are not timed. CPU is the child's process time (its threads), so a loaded machine moves it less
than the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, sys, time
from pmd.download import DownloadOptions, download_chunk
port, mode, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
path = "/redirect/301/{}.jpg" if mode == "redirect" else "/img/{}.jpg"
urls = [f"http://127.0.0.1:{port}" + path.format(i % 200) for i in range(n)]
opts = DownloadOptions(timeout=10.0, thread_count=1, allow_networks=["127.0.0.1/32"])
list(download_chunk(urls[:100], urls[:100], opts, sys.argv[4]))
wall, cpu = time.perf_counter(), time.process_time()
got = list(download_chunk(urls, urls, opts, sys.argv[4]))
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
assert all(d.reason is None for d in got), [d for d in got if d.reason][:3]
print(json.dumps({"wall_us": wall / n * 1e6, "cpu_us": cpu / n * 1e6}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-root", required=True, help="a checkout of the pmd code to compare with")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/pmd-bench-redirects")
    args = parser.parse_args()
    trees = {"this": str(ROOT), "baseline": str(Path(args.baseline_root).resolve())}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, str(ROOT / "tests/httpserver.py"), "--size", "64x48"],
                              stdout=subprocess.PIPE, text=True, env=env)
    figures: dict[str, dict[str, list[dict]]] = {}
    try:
        port = server.stdout.readline().strip() if server.stdout else ""
        for mode in ("plain", "redirect"):
            for r in range(args.rounds):
                for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                    out = subprocess.run([sys.executable, "-c", CHILD, port, mode, str(args.images), args.workdir],
                                         env={**os.environ, "PYTHONPATH": trees[name]}, cwd=trees[name],
                                         check=True, capture_output=True, text=True).stdout
                    figures.setdefault(mode, {}).setdefault(name, []).append(json.loads(out))
                print(f"{mode} round {r} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait()
    summary = {mode: {name: {k: round(statistics.median(run[k] for run in runs)) for k in ("wall_us", "cpu_us")}
                      | {"rounds_cpu_us": [round(run["cpu_us"]) for run in runs]}
                      for name, runs in by_tree.items()} for mode, by_tree in figures.items()}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
