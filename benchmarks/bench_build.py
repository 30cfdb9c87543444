"""`pmd build` end to end vs img2dataset alone, on the same loopback URL list, in one run.

    python benchmarks/bench_build.py --images 5000 --size 320x240 --image-size 128

A loopback server (tests/httpserver.py, its own process) serves N generated JPEGs. Both tools run as child
processes with the same settings (2 processes/tasks, the same threads per process, timeout, shorter side resized to
--image-size without upscaling, JPEG quality 95, Parquet output), and each is timed from start to exit:
- img2dataset.download(...) on a Parquet URL list, multiprocessing distributor;
- `pmd build conceptual_12m cc12m.tsv`: ingest + Ray start + download (per chunk, each `--backends` in turn) + decode
  and checks + resize/encode + dedup + shards + failures + manifest.
Peak memory is the largest summed RSS of each child's whole process tree (sampled every 0.1 s: Ray workers and
img2dataset's pool processes included; Ray's object store shared memory counted per process that maps it).
CPU is each child's whole tree (getrusage of the reaped processes: pmd's pool workers and budget service,
img2dataset's pool), per stored image, beside the CPU the loopback servers spent meanwhile: on a shared or small
machine it says more than the wall time (both tools share the cores with the servers and with whatever else runs).

Latency mode (issue 18): each new connection costs a delay, a stand-in for the TCP/TLS handshakes to a remote CDN,
and the URLs are spread over several hosts the way PMD's are (one host serving ~half, a long tail):

    python benchmarks/bench_build.py --images 2000 --connect-delay-ms 50 --hosts 8 --rounds 3

With `--host-mix pmd` (issue 25) the hosts and their shares are those of PMD's URL sources in the catalog
(`pmd_host_weights`: Flickr ~49%, i.redd.it ~18%, Wikimedia ~8%, the Open Images bucket ~2%, the long tail ~22%
over `--tail-hosts`), and `pmd build` runs with its build-wide host budgets (pmd.politeness) on.

Each host is its own server process on its own loopback port. Every round runs img2dataset alone, then `pmd build`
with each download backend (`--backends`), the order rotated round to round, then the download alone with each
backend (`download_chunk` in this process, threads x procs threads, no decode); medians over rounds are reported,
with the machine's 1-minute load average at the end of each run. Before round 0 every URL is fetched once, untimed,
so that no tool pays the servers' generation of the JPEGs. `--server asyncio` runs benchmarks/loopback_asyncio.py
per host instead of tests/httpserver.py: the same images, less of the measured machine's CPU per request.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
# The address guard refuses loopback unless allowed: the benchmark's servers listen on 127.0.0.1 only.
LOOPBACK_NETWORKS = ("127.0.0.1/32",)
ALLOW_LOOPBACK = [a for n in LOOPBACK_NETWORKS for a in ("--allow-network", n)]
PYTHON = sys.executable
PMD = str(Path(sys.executable).with_name("pmd"))


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


# The loopback servers' processes (main sets them): the CPU they spend serving a run is that run's too.
SERVER_PROCESSES: list[psutil.Process] = []


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def run_measured(cmd: list[str], env: dict) -> tuple[float, int, str, dict]:
    """(wall seconds, peak tree RSS bytes, output tail, CPU seconds by part): the command's whole process tree
    (getrusage of the reaped children: pool workers and services included; a daemon that is not reaped, as some of
    Ray's, is not counted) and of the servers while it ran."""
    servers_before = sum(_cpu_s(p) for p in SERVER_PROCESSES)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, tree_rss(ps))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{output[-4000:]}")
    tree_cpu = children.ru_utime + children.ru_stime - children_before.ru_utime - children_before.ru_stime
    cpu = {"cpu_s": round(tree_cpu, 2),
           "servers_cpu_s": round(sum(_cpu_s(p) for p in SERVER_PROCESSES) - servers_before, 2)}
    return wall, peak, output[-3000:], cpu


I2D_SCRIPT = """
import sys, img2dataset
if __name__ == "__main__":
    url_list, out, size, threads, procs, timeout = sys.argv[1:7]
    img2dataset.download(url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
                         output_folder=out, output_format="parquet", processes_count=int(procs),
                         thread_count=int(threads), image_size=int(size), resize_mode="keep_ratio",
                         resize_only_if_bigger=True, encode_quality=95, encode_format="jpg", timeout=float(timeout),
                         retries=0, number_sample_per_shard=1000, distributor="multiprocessing",
                         compute_hash="sha256", extract_exif=False, enable_wandb=False)
"""


# The loopback server run per host (its own process). Both serve the same JPEGs; `asyncio` spends less of the measured
# machine's CPU per request (a remote CDN spends none of it).
SERVERS = {"httpserver": "tests/httpserver.py", "asyncio": "benchmarks/loopback_asyncio.py"}

# Share of the URLs per host, largest first: roughly PMD's (YFCC on Flickr's CDN ~half, WIT, Open Images, a tail).
HOST_WEIGHTS = (0.45, 0.2, 0.12, 0.08, 0.06, 0.04, 0.03, 0.02)


# `--host-mix pmd` (issue 25): the hosts of PMD's URL sources, weighted by their Table 2 pairs in the catalog
# (manifests/sources.toml). Which host serves a source's images is read off its adapter's URLs: YFCC100M and SBU
# are Flickr's (static/farm hosts: one budget), WIT Wikimedia's upload host, RedCaps i.redd.it (one host here; some
# of its URLs are imgur's), Localized Narratives' Open Images the open-images-dataset S3 bucket; Conceptual
# Captions 3M and 12M are the long tail of the web (`--tail-hosts` hosts here, equal shares). No image of the
# catalog is on Google storage (only metadata files are).
PMD_HOSTS = {"yfcc100m": "flickr", "sbu_captions": "flickr", "wit": "wikimedia", "red_caps": "reddit",
             "localized_narratives__openimages": "open_images_s3", "conceptual_captions": "tail",
             "conceptual_12m": "tail"}


def pmd_host_weights(tail_hosts: int) -> list[tuple[str, float]]:
    """(host, share of PMD's URL pairs), largest first; the tail's share split over `tail_hosts` hosts."""
    sys.path.insert(0, str(ROOT))
    from pmd.catalog import load_catalog

    pairs: dict[str, int] = {}
    for entry in load_catalog():
        if entry.images == "url":
            host = PMD_HOSTS[entry.name]
            pairs[host] = pairs.get(host, 0) + entry.table2_pairs
    total = sum(pairs.values())
    named = sorted(((h, n / total) for h, n in pairs.items() if h != "tail"), key=lambda hw: -hw[1])
    return named + [(f"tail{i}", pairs.get("tail", 0) / total / tail_hosts) for i in range(tail_hosts)]


def host_mix(n_images: int, ports: list[int], seed: int = 0, weights: list[float] | None = None) -> list[str]:
    """n URLs over the hosts (ports) by `weights` (default HOST_WEIGHTS, cycled and renormalised past 8 hosts),
    shuffled."""
    weights = weights or [HOST_WEIGHTS[i % len(HOST_WEIGHTS)] for i in range(len(ports))]
    rng = random.Random(seed)
    picks = rng.choices(range(len(ports)), weights=weights, k=n_images)
    return [f"http://127.0.0.1:{ports[h]}/img/{i}.jpg" for i, h in enumerate(picks)]


def _cpu_figures(cpu: dict, images: int) -> dict:
    return {**cpu, "cpu_ms_per_image": round(1000 * cpu["cpu_s"] / max(images, 1), 2)}


def run_img2dataset(args, work: Path, env: dict, tag: str) -> dict:
    out = work / f"i2d-{tag}"
    wall, peak, _, cpu = run_measured(
        [PYTHON, str(work / "i2d.py"), str(work / "urls.parquet"), str(out), str(args.image_size),
         str(args.threads), str(args.procs), str(args.timeout)], env)
    ok = sum(pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
             for p in out.glob("*.parquet"))
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": round(wall, 2), "ok": ok, "images_per_s": round(ok / wall, 1), "peak_rss_mb": round(peak / 2**20),
            **_cpu_figures(cpu, ok)}


def run_pmd(args, work: Path, env: dict, backend: str, tag: str, executor: str = "ray") -> dict:
    out = work / f"pmd-{backend}-{executor}-{tag}"
    wall, peak, _, cpu = run_measured(
        [PMD, "build", "conceptual_12m", str(work / "cc12m.tsv"), "--out", str(out),
         "--image-size", str(args.image_size), "--threads", str(args.threads), "--num-cpus", str(args.procs),
         "--chunk-rows", str(args.chunk_rows), "--timeout", str(args.timeout), "--download-backend", backend,
         "--executor", executor, "--json", "-q", *ALLOW_LOOPBACK,
         *(["--max-per-host", str(args.max_per_host)] if args.max_per_host else []),
         *(["--max-rate-per-host", str(args.max_rate_per_host)] if args.max_rate_per_host else [])], env)
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    pairs = manifest["totals"]["pairs"]
    return {"wall_s": round(wall, 2), "ok": pairs, "images_per_s": round(pairs / wall, 1),
            "peak_rss_mb": round(peak / 2**20), "stages_s": manifest["timings"],
            "shard_bytes": sum(s["bytes"] for s in manifest["shards"]), "shards": len(manifest["shards"]),
            **_cpu_figures(cpu, pairs)}


def run_download_only(args, urls: list[str], work: Path, backend: str) -> dict:
    """The download alone, in this process: `download_chunk` over every URL, threads x procs threads, no decode."""
    sys.path.insert(0, str(ROOT))
    from pmd.download import DownloadOptions, download_chunk

    options = DownloadOptions(timeout=args.timeout, thread_count=args.threads * args.procs, backend=backend,
                              allow_networks=list(LOOPBACK_NETWORKS))
    if backend == "img2dataset":
        import img2dataset.downloader  # noqa: F401 - its imports (cv2, albumentations) take seconds: not timed
    from pmd.http_client import close_clients

    close_clients()  # every round starts without open connections, as a fresh `pmd build` process does
    started = time.perf_counter()
    ok = sum(d.reason is None for d in download_chunk(urls, urls, options, work / f"dl-{backend}"))
    wall = time.perf_counter() - started
    return {"wall_s": round(wall, 2), "ok": ok, "images_per_s": round(ok / wall, 1), "peak_rss_mb": 0}


def warm_servers(urls: list[str], timeout: float) -> None:
    """Fetch every URL once, untimed: the servers generate each JPEG on its first request (~0.2 ms of CPU on the
    measured cores), which a remote CDN would not; without this the first tool of round 0 pays it for the others."""
    sys.path.insert(0, str(ROOT))
    from pmd.download import DownloadOptions, download_chunk
    from pmd.http_client import close_clients

    started = time.perf_counter()
    ok = sum(d.reason is None for d in download_chunk(urls, urls, DownloadOptions(timeout=timeout, thread_count=32,
                                                                                      allow_networks=list(LOOPBACK_NETWORKS)),
                                                      Path(tempfile.gettempdir())))
    close_clients()
    if ok != len(urls):
        raise RuntimeError(f"warm-up: {len(urls) - ok} of {len(urls)} URLs failed")
    print(f"servers warmed: {ok} images in {time.perf_counter() - started:.1f}s (untimed)", file=sys.stderr, flush=True)


def median_run(runs: list[dict]) -> dict:
    """The figures of each key as the median over rounds (images/s, wall, RSS), plus every round's rate."""
    mid = sorted(runs, key=lambda r: r["images_per_s"])[(len(runs) - 1) // 2]
    return {**({"median_round_stages_s": mid["stages_s"]} if "stages_s" in mid else {}),
            "images_per_s": round(statistics.median(r["images_per_s"] for r in runs), 1),
            "wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
            "ok": min(r["ok"] for r in runs),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs)),
            **{k: statistics.median(r[k] for r in runs) for k in ("cpu_s", "servers_cpu_s", "cpu_ms_per_image")
               if all(k in r for r in runs)},
            "rounds_images_per_s": [r["images_per_s"] for r in runs],
            **({"rounds_load_1min": [r["load_1min"] for r in runs]} if all("load_1min" in r for r in runs) else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", default="320x240", help="served image size")
    parser.add_argument("--image-size", type=int, default=128, help="shorter side after resize (both tools)")
    parser.add_argument("--threads", type=int, default=64, help="download threads per process/task")
    parser.add_argument("--procs", type=int, default=2, help="img2dataset processes = Ray CPUs for pmd")
    parser.add_argument("--chunk-rows", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--connect-delay-ms", type=float, default=0.0, help="server delay per new connection")
    parser.add_argument("--hosts", type=int, default=1, help="loopback hosts (ports) the URLs are spread over")
    parser.add_argument("--host-mix", choices=("default", "pmd"), default="default",
                        help="pmd: the hosts of PMD's URL sources by their catalog pairs (PMD_HOSTS; --hosts is "
                             "then 4 + --tail-hosts)")
    parser.add_argument("--tail-hosts", type=int, default=4, help="--host-mix pmd: hosts of the long tail")
    parser.add_argument("--max-per-host", type=int, default=None, help="pmd build --max-per-host (default pmd's)")
    parser.add_argument("--max-rate-per-host", type=float, default=None,
                        help="pmd build --max-rate-per-host (default pmd's)")
    parser.add_argument("--backends", default="http,img2dataset", help="pmd build download backends to run")
    parser.add_argument("--executors", default="ray",
                        help="pmd build executors to run (ray, auto, local, pool): each but ray is named "
                             "pmd_build_BACKEND_EXECUTOR")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (order rotated), medians reported")
    parser.add_argument("--download-only", action="store_true", help="only the download-alone figures")
    parser.add_argument("--no-download-only", action="store_true", help="skip the download-alone figures")
    parser.add_argument("--baseline-root", default=None,
                        help="a checkout of other pmd code (e.g. `git worktree add /tmp/base COMMIT`): its `pmd build "
                             "--download-backend http` (the first of --executors) runs in the same rounds as "
                             "pmd_build_http_baseline")
    parser.add_argument("--server", choices=sorted(SERVERS), default="httpserver",
                        help="loopback server per host: tests/httpserver.py, or the lean "
                             "benchmarks/loopback_asyncio.py")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()
    mix = pmd_host_weights(args.tail_hosts) if args.host_mix == "pmd" else None
    if mix:
        args.hosts = len(mix)
        print("host mix: " + ", ".join(f"{h} {w:.3f}" for h, w in mix), file=sys.stderr, flush=True)
    backends = [b for b in args.backends.split(",") if b]
    executors = [e for e in args.executors.split(",") if e]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="pmd-bench-build-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    server_script = SERVERS[args.server]
    servers = [subprocess.Popen([PYTHON, str(ROOT / server_script), "--size", args.size,
                                 "--connect-delay", str(args.connect_delay_ms / 1000)], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(args.hosts)]
    runs: dict[str, list[dict]] = {"img2dataset": [], **{f"pmd_build_{b}" + ("" if e == "ray" else f"_{e}"): []
                                                           for b in backends for e in executors}}
    if args.baseline_root:
        runs["pmd_build_http_baseline"] = []
    downloads: dict[str, list[dict]] = {} if args.no_download_only else \
        {f"download_only_{b}": [] for b in ("http", "img2dataset")}
    SERVER_PROCESSES[:] = [psutil.Process(server.pid) for server in servers]
    try:
        ports = [int(server.stdout.readline()) for server in servers]
        urls = host_mix(args.images, ports, weights=[w for _, w in mix] if mix else None)
        captions = [f"generated image number {i}" for i in range(args.images)]
        pq.write_table(pa.table({"url": urls, "caption": captions}), work / "urls.parquet")
        (work / "cc12m.tsv").write_text("".join(f"{u}\t{c}\n" for u, c in zip(urls, captions)))
        (work / "i2d.py").write_text(I2D_SCRIPT)
        warm_servers(urls, args.timeout)
        if args.download_only:
            runs = {}
        names = list(runs)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)] if names else []
            for name in order:
                if name == "img2dataset":
                    result = run_img2dataset(args, work, env, str(r))
                elif name == "pmd_build_http_baseline":
                    result = run_pmd(args, work, {**env, "PYTHONPATH": args.baseline_root}, "http", f"b{r}",
                                     executors[0])
                else:
                    backend, _, executor = name.removeprefix("pmd_build_").partition("_")
                    result = run_pmd(args, work, env, backend, str(r), executor or "ray")
                result["load_1min"] = round(os.getloadavg()[0], 1)  # the machine's load as the run ended
                runs[name].append(result)
                print(f"round {r}: {name}: {result['ok']} images in {result['wall_s']}s = "
                      f"{result['images_per_s']} img/s (load {result['load_1min']})", file=sys.stderr, flush=True)
            for name in (list(downloads) if r % 2 == 0 else list(downloads)[::-1]):
                result = run_download_only(args, urls, work, name.removeprefix("download_only_"))
                downloads[name].append(result)
                print(f"round {r}: {name}: {result['ok']} images in {result['wall_s']}s = "
                      f"{result['images_per_s']} img/s", file=sys.stderr, flush=True)
    finally:
        for server in servers:
            server.terminate()
            server.wait()

    figures = {
        "images": args.images, "served_size": args.size, "image_size": args.image_size, "threads": args.threads,
        "procs": args.procs, "chunk_rows": args.chunk_rows, "connect_delay_ms": args.connect_delay_ms,
        "hosts": args.hosts, "rounds": args.rounds, "server": args.server,
        **({"host_mix": {h: round(w, 4) for h, w in mix}} if mix else {}),
        "max_per_host": args.max_per_host, "max_rate_per_host": args.max_rate_per_host,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **{name: median_run(rs) for name, rs in runs.items()},
    }
    figures.update({name: median_run(rs) for name, rs in downloads.items()})
    if args.rounds == 1:
        for name, rs in runs.items():
            figures[name] = rs[0] | {"rounds_images_per_s": [rs[0]["images_per_s"]]}
    figures["ratio"] = {name: round(figures[name]["images_per_s"] / figures["img2dataset"]["images_per_s"], 3)
                        for name in runs if name != "img2dataset"}
    print(json.dumps(figures, indent=2))
    print(f"\n{args.images} images, {args.hosts} host(s), {args.connect_delay_ms:g} ms per new connection, "
          f"medians of {args.rounds} round(s):")
    if downloads:
        figures["download_only_ratio"] = round(figures["download_only_http"]["images_per_s"]
                                               / figures["download_only_img2dataset"]["images_per_s"], 3)
    for name in [*runs, *downloads]:
        f = figures[name]
        ratio = f"  ratio {figures['ratio'][name]:.2f}" if name in figures["ratio"] else ""
        cpu = f", CPU {f['cpu_ms_per_image']:.2f} ms/image (+ servers {f['servers_cpu_s']:.1f} s)" \
            if "cpu_ms_per_image" in f else ""
        print(f"{name:22s}: {f['ok']} images in {f['wall_s']:.1f}s = {f['images_per_s']:.0f} img/s, "
              f"peak RSS {f['peak_rss_mb']} MiB{cpu}{ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
