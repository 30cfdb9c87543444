"""`pmd build` at growing size: driver memory, disk and rates from 250k to 4M candidates, no network.

    python benchmarks/bench_scale.py --candidates 250000 1000000 --num-cpus 2

A generated Localized Narratives (Flickr30k) source: N/5 small distinct JPEGs (40x32) in one stored zip, one
narrative of five sentences per image, so N candidates. For each size one `pmd build` child process is run
(`--image-size 0`: stored at their size, re-encoded once; `--shard-rows 10000 --chunk-rows 2000` unless given)
and sampled every 0.2 s:
- driver peak RSS: the `pmd build` process itself (not its Ray workers): what must stay flat as the corpus grows;
- peak disk of OUT (every file under it, summed) against OUT's size at the end and against the shards alone;
- shard-phase rows/s (the manifest's `shard_rows_per_s`: bucket writes + merges), final-phase rows/s (scatter,
  dedup, shards, failures), and end-to-end candidates/s (wall time of the child, ingest and Ray start included).
Prints one JSON object per size.

`--store local s3`: each size is built with OUT (and its work state, OUT/work) on local disk and on moto's S3
server on loopback, in alternating rounds (`--rounds`; each store goes first in every other round); the S3 rows add
the requests the store served per 1,000 candidates (counted from the server's access log) and the ratio of wall
times to the local build of the same round, and those requests by method and kind of object
(`store_requests_by_kind`: pieces, chunks, markers, LISTs ...).
Every row has the build's CPU (`build_cpu_s`: the machine's CPU time during the round less this process's, so
the `pmd build` process and every worker of it, Ray's included); the S3 rows also the store's (`store_cpu_s`: moto
runs in this process's threads, on the same cores as the build), so the wall-time ratio can be read against what
the build itself spent. Run it on an otherwise idle machine: anything else running counts as the build's.
Each S3 round's prefix is deleted after it, as the local round's directory is. `--moto-module-cache` removes a cost of
the stand-in alone (moto lists its own package directory on every request); the result records it.
`--request-checksums when_required` sets the AWS SDKs' standard `AWS_REQUEST_CHECKSUM_CALCULATION` for the build:
PUT bodies then go with a signed SHA-256 instead of `aws-chunked` with a CRC64 trailer, which moto decodes by
concatenating bytes chunk by chunk (quadratic in the object's size); the result records it too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import psutil
from PIL import Image

PMD = str(Path(sys.executable).with_name("pmd"))
SOURCE = "localized_narratives__flickr30k"


def jpeg(n: int) -> bytes:
    image = Image.new("RGB", (40, 32), ((n * 37) % 256, (n * 91) % 256, (n * 13) % 256))
    for bit in range(24):  # distinct images even where colours repeat
        if n >> bit & 1:
            image.putpixel((bit % 40, bit // 40), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def generate(directory: Path, candidates: int) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    images = candidates // 5
    captions = directory / "flickr30k_train_captions.jsonl"
    archive = directory / "flickr30k-images.zip"
    with open(captions, "w") as f:
        for i in range(images):
            text = " ".join(f"Sentence {j} about picture {i} and its {'red green blue'.split()[j % 3]} parts."
                            for j in range(5))
            f.write(json.dumps({"dataset_id": "flickr30k", "image_id": str(i), "annotator_id": 1,
                                "caption": text}) + "\n")
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(images):
            zf.writestr(f"flickr30k-images/{i}.jpg", jpeg(i))
    return captions, archive


def du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def object_kind(target: str) -> str:
    """What a request to the store was for, from its path: `/pmd/out-N-R/work/final/pieces/...` ->
    `work/final/pieces`; a listing (`?list-type`, `?prefix=`) is `list` and the kind of its prefix."""
    path, _, query = target.partition("?")
    if "list-type" in query or "prefix=" in query:
        prefix = next((unquote(v) for k, _, v in (p.partition("=") for p in query.split("&")) if k == "prefix"), "")
        return "list " + object_kind("/pmd/" + prefix).replace("OUT/", "")
    parts = [p for p in path.split("/") if p][2:]  # bucket, the build's prefix
    if not parts:
        return "bucket"
    if parts[0] != "work":
        return parts[0] if len(parts) > 1 else "OUT/" + parts[0].rsplit(".", 1)[-1]
    return "/".join(parts[:3] if len(parts) > 3 and parts[1] == "final" else parts[:2])


_MOTO_MODULE_CACHE = False
_REQUEST_CHECKSUMS = "sdk-default"


class _S3:
    """moto's S3 server on a loopback port, counting the requests it answers."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.ports import free_port

        self.requests = 0
        self.by_kind: Counter = Counter()  # (method, object kind) -> requests
        counter = self

        class Count(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                counter.requests += 1
                try:
                    line = record.args[0]
                    method, target = re.sub(r"\x1b\[[0-9;]*m", "", str(line)).split(" ")[:2]  # werkzeug colours
                except (TypeError, ValueError):
                    return
                counter.by_kind[(method, object_kind(target))] += 1

        log = logging.getLogger("werkzeug")
        log.setLevel(logging.INFO)  # one access-log line per request
        log.propagate = False
        log.addHandler(Count())
        port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
        import pyarrow.fs as pafs

        pafs.S3FileSystem(access_key="bench", secret_key="bench", region="us-east-1",
                          endpoint_override=self.env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("pmd")


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _machine_cpu() -> float:
    times = psutil.cpu_times()
    return times.user + times.system + times.nice


def run(candidates: int, root: Path, num_cpus: int, s3: _S3 | None = None, round_: int = 0,
        shard_rows: int = 10_000, chunk_rows: int = 2_000) -> dict:
    inputs = root / f"in-{candidates}"
    if not inputs.exists():
        generate(inputs, candidates)
    captions, archive = inputs / "flickr30k_train_captions.jsonl", inputs / "flickr30k-images.zip"
    out = f"s3://pmd/out-{candidates}-{round_}" if s3 else root / f"out-{candidates}"
    requests_before = s3.requests if s3 else 0
    kinds_before = Counter(s3.by_kind) if s3 else None
    cmd = [PMD, "build", SOURCE, str(captions), "--images", str(archive), "--out", str(out), "--image-size", "0",
           "--shard-rows", str(shard_rows), "--chunk-rows", str(chunk_rows), "--num-cpus", str(num_cpus), "-q",
           "--json"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1", **(s3.env if s3 else {})}
    started = time.perf_counter()
    machine_before, own_before = _machine_cpu(), _cpu(resource.RUSAGE_SELF)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak_rss = peak_disk = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_disk
        while not stop.is_set():
            try:
                peak_rss = max(peak_rss, ps.memory_info().rss)
            except psutil.Error:
                pass
            if not s3 and out.exists():
                peak_disk = max(peak_disk, du(out))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - started
    stop.set()
    thread.join()
    # The store's CPU: this process's, where moto's server threads run (the 0.2 s sampler beside them costs ~0.1% of
    # a core). The build's: the whole machine's but this process's; rusage of reaped children would miss Ray's
    # workers, which their raylet reaps, or nobody.
    store_cpu = _cpu(resource.RUSAGE_SELF) - own_before
    build_cpu = _machine_cpu() - machine_before - store_cpu
    if proc.returncode != 0:
        raise SystemExit(f"pmd build failed:\n{output[-3000:]}")
    if s3:
        os.environ.update(s3.env)
        from pmd import storage

        manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
        requests = s3.requests - requests_before
        final_size = peak_disk = 1
    else:
        manifest = json.loads((out / "manifest.json").read_text())
        final_size = du(out)
    shards = sum(s["bytes"] for s in manifest["shards"])
    t = manifest["timings"]
    final_s = t.get("scatter_s", 0) + t.get("plan_s", 0) + t.get("shards_s", 0)
    result = {
        "candidates": candidates,
        "store": "s3" if s3 else "local", "moto_module_cache": bool(s3) and _MOTO_MODULE_CACHE,
        "request_checksums": _REQUEST_CHECKSUMS if s3 else None,
        "pairs": manifest["totals"]["pairs"],
        "shards": len(manifest["shards"]),
        "driver_peak_rss_mib": round(peak_rss / 2**20, 1),
        "peak_disk_mib": round(peak_disk / 2**20, 1),
        "final_size_mib": round(final_size / 2**20, 1),
        "shards_mib": round(shards / 2**20, 1),
        "peak_disk_over_final": round(peak_disk / final_size, 3),
        "peak_disk_over_shards": round(peak_disk / shards, 3),
        "shard_phase_rows_per_s": t.get("shard_rows_per_s"),
        "final_phase_rows_per_s": round(candidates / final_s, 1) if final_s else None,
        "end_to_end_candidates_per_s": round(candidates / wall, 1),
        "wall_s": round(wall, 1),
        "build_cpu_s": round(build_cpu, 1),
        "timings": t,
        "layout": manifest.get("layout"),
    }
    if s3:
        result["store_cpu_s"] = round(store_cpu, 1)
        result["store_requests_per_1000_candidates"] = round(requests * 1000 / candidates, 2)
        result["store_requests_by_kind"] = {f"{m} {k}": n for (m, k), n in (s3.by_kind - kinds_before).most_common()}
        for key in ("peak_disk_mib", "final_size_mib", "peak_disk_over_final", "peak_disk_over_shards"):
            result.pop(key)
        # As the local round's rmtree: moto lists a prefix by scanning every key of its bucket, so the objects of
        # earlier rounds left there would slow each later round's LISTs (a real store's do not depend on them).
        storage.remove_tree(out)
    else:
        shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, nargs="+", default=[250_000, 1_000_000])
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    parser.add_argument("--store", nargs="+", choices=("local", "s3"), default=["local"],
                        help="where OUT and its work state go; several: alternating rounds")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--shard-rows", type=int, default=10_000, help="pmd build --shard-rows")
    parser.add_argument("--chunk-rows", type=int, default=2_000,
                        help="pmd build --chunk-rows (with --shard-rows: the layout's chunks, groups and buckets)")
    parser.add_argument("--moto-module-cache", action="store_true",
                        help="list moto's service modules once: its server lists and stats its own package directory "
                             "on every request (a quarter of its CPU here), which no real store does")
    parser.add_argument("--request-checksums", choices=("sdk-default", "when_required"), default="sdk-default",
                        help="AWS_REQUEST_CHECKSUM_CALCULATION for the build's S3 clients (moto decodes the SDKs' "
                             "default aws-chunked PUT bodies in quadratic time)")
    args = parser.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pmd-scale-"))
    if args.moto_module_cache:
        import moto.backends

        global _MOTO_MODULE_CACHE
        _MOTO_MODULE_CACHE = True
        modules = tuple(moto.backends.list_of_moto_modules())
        moto.backends.list_of_moto_modules = lambda: modules
    s3 = _S3() if "s3" in args.store else None
    if s3 and args.request_checksums != "sdk-default":
        global _REQUEST_CHECKSUMS
        _REQUEST_CHECKSUMS = args.request_checksums
        s3.env["AWS_REQUEST_CHECKSUM_CALCULATION"] = args.request_checksums
    try:
        for n in args.candidates:
            walls: dict[str, list[float]] = {}
            cpus: dict[str, list[float]] = {}
            for r in range(args.rounds):
                # ABBA: each store goes first in every other round, so a drift of the machine does not favour one.
                for store in (args.store if r % 2 == 0 else args.store[::-1]):
                    result = run(n, root, args.num_cpus, s3 if store == "s3" else None, r, args.shard_rows,
                                 args.chunk_rows)
                    walls.setdefault(store, []).append(result["wall_s"])
                    cpus.setdefault(store, []).append(result["build_cpu_s"])
                    print(json.dumps(result), flush=True)
            if len(walls) == 2:
                ratios = sorted(s / loc for s, loc in zip(walls["s3"], walls["local"]))
                cpu = sorted(s / loc for s, loc in zip(cpus["s3"], cpus["local"]))
                print(json.dumps({"candidates": n, "s3_over_local_wall_median": round(statistics.median(ratios), 3),
                                  "ratios": [round(x, 3) for x in ratios],
                                  "s3_over_local_build_cpu_median": round(statistics.median(cpu), 3)}), flush=True)
            shutil.rmtree(root / f"in-{n}", ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
