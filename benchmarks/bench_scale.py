"""`pmd build` at growing size: driver memory, disk and rates from 250k to 4M candidates, no network.

    python benchmarks/bench_scale.py --candidates 250000 1000000 --num-cpus 2

A generated Localized Narratives (Flickr30k) source: N/5 small distinct JPEGs (40x32) in one stored zip, one
narrative of five sentences per image, so N candidates. For each size one `pmd build` child process is run
(`--image-size 0`: stored at their size, re-encoded once; `--shard-rows 10000 --chunk-rows 2000`) and sampled every
0.2 s:
- driver peak RSS: the `pmd build` process itself (not its Ray workers): what must stay flat as the corpus grows;
- peak disk of OUT (every file under it, summed) against OUT's size at the end and against the shards alone;
- shard-phase rows/s (the manifest's `shard_rows_per_s`: bucket writes + merges), final-phase rows/s (scatter,
  dedup, shards, failures), and end-to-end candidates/s (wall time of the child, ingest and Ray start included).
Prints one JSON object per size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

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


def run(candidates: int, root: Path, num_cpus: int) -> dict:
    captions, archive = generate(root / f"in-{candidates}", candidates)
    out = root / f"out-{candidates}"
    cmd = [PMD, "build", SOURCE, str(captions), "--images", str(archive), "--out", str(out), "--image-size", "0",
           "--shard-rows", "10000", "--chunk-rows", "2000", "--num-cpus", str(num_cpus), "-q", "--json"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    started = time.perf_counter()
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
            if out.exists():
                peak_disk = max(peak_disk, du(out))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - started
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"pmd build failed:\n{output[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    final_size = du(out)
    shards = sum(s["bytes"] for s in manifest["shards"])
    t = manifest["timings"]
    final_s = t.get("scatter_s", 0) + t.get("plan_s", 0) + t.get("shards_s", 0)
    result = {
        "candidates": candidates,
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
        "timings": t,
        "layout": manifest.get("layout"),
    }
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(root / f"in-{candidates}", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, nargs="+", default=[250_000, 1_000_000])
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    args = parser.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pmd-scale-"))
    try:
        for n in args.candidates:
            print(json.dumps(run(n, root, args.num_cpus)), flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
