"""`pmd build` end to end vs img2dataset alone, on the same loopback URL list, in one run.

    python benchmarks/bench_build.py --images 5000 --size 320x240 --image-size 128

A loopback server (tests/httpserver.py, its own process) serves N generated JPEGs. Both tools run as child
processes with the same settings (2 processes/tasks, the same threads per process, timeout, shorter side resized to
--image-size without upscaling, JPEG quality 95, Parquet output), and each is timed from start to exit:
- img2dataset.download(...) on a Parquet URL list, multiprocessing distributor;
- `pmd build conceptual_12m cc12m.tsv`: ingest + Ray start + download (img2dataset's downloader per chunk) + decode
  and checks + resize/encode + dedup + shards + failures + manifest.
Peak memory is the largest summed RSS of each child's whole process tree (sampled every 0.1 s: Ray workers and
img2dataset's pool processes included; Ray's object store shared memory counted per process that maps it).
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_measured(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """(wall seconds, peak tree RSS bytes, output tail)."""
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
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{output[-4000:]}")
    return wall, peak, output[-3000:]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", default="320x240", help="served image size")
    parser.add_argument("--image-size", type=int, default=128, help="shorter side after resize (both tools)")
    parser.add_argument("--threads", type=int, default=64, help="download threads per process/task")
    parser.add_argument("--procs", type=int, default=2, help="img2dataset processes = Ray CPUs for pmd")
    parser.add_argument("--chunk-rows", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="pmd-bench-build-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([PYTHON, str(ROOT / "tests" / "httpserver.py"), "--size", args.size], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(args.images)]
        captions = [f"generated image number {i}" for i in range(args.images)]
        pq.write_table(pa.table({"url": urls, "caption": captions}), work / "urls.parquet")
        (work / "cc12m.tsv").write_text("".join(f"{u}\t{c}\n" for u, c in zip(urls, captions)))
        (work / "i2d.py").write_text(I2D_SCRIPT)

        i2d_wall, i2d_peak, _ = run_measured(
            [PYTHON, str(work / "i2d.py"), str(work / "urls.parquet"), str(work / "i2d"), str(args.image_size),
             str(args.threads), str(args.procs), str(args.timeout)], env)
        i2d_ok = sum(pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
                     for p in (work / "i2d").glob("*.parquet"))

        pmd_wall, pmd_peak, _ = run_measured(
            [PMD, "build", "conceptual_12m", str(work / "cc12m.tsv"), "--out", str(work / "pmd"),
             "--image-size", str(args.image_size), "--threads", str(args.threads), "--num-cpus", str(args.procs),
             "--chunk-rows", str(args.chunk_rows), "--timeout", str(args.timeout), "--json", "-q"], env)
        manifest = json.loads((work / "pmd" / "manifest.json").read_text())
    finally:
        server.terminate()
        server.wait()

    pairs = manifest["totals"]["pairs"]
    t = manifest["timings"]
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    figures = {
        "images": args.images, "served_size": args.size, "image_size": args.image_size, "threads": args.threads,
        "procs": args.procs, "chunk_rows": args.chunk_rows,
        "img2dataset": {"wall_s": round(i2d_wall, 2), "ok": i2d_ok, "images_per_s": round(i2d_ok / i2d_wall, 1),
                        "peak_rss_mb": round(i2d_peak / 2**20)},
        "pmd_build": {"wall_s": round(pmd_wall, 2), "ok": pairs, "images_per_s": round(pairs / pmd_wall, 1),
                      "peak_rss_mb": round(pmd_peak / 2**20), "stages_s": t,
                      "shard_bytes": shard_bytes, "shards": len(manifest["shards"])},
    }
    figures["ratio"] = round(figures["pmd_build"]["images_per_s"] / figures["img2dataset"]["images_per_s"], 3)
    print(json.dumps(figures, indent=2))
    print(f"\nimg2dataset alone : {i2d_ok} images in {i2d_wall:.1f}s = {i2d_ok / i2d_wall:.0f} img/s, "
          f"peak RSS {i2d_peak / 2**20:.0f} MiB")
    print(f"pmd build         : {pairs} images in {pmd_wall:.1f}s = {pairs / pmd_wall:.0f} img/s, "
          f"peak RSS {pmd_peak / 2**20:.0f} MiB")
    print(f"ratio pmd/img2dataset: {figures['ratio']:.2f} (target >= 0.80)")
    print(f"shard writing: {t.get('shard_rows_per_s')} rows/s, {t.get('shard_mb_per_s')} MB/s "
          f"({len(manifest['shards'])} shards, {shard_bytes / 1e6:.1f} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
