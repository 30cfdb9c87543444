"""`pmd stats` on a generated corpus of at least 2M rows, with the image column present vs absent.

The audit must read only the metadata columns: with column projection the image bytes are never read, so both
timings should be about equal (target: within 1.3x). Prints rows/s of each and their ratio.
Run: python benchmarks/bench_stats.py [--rows 2000000] [--image-bytes 1024] [--workdir bench-out/stats]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import polars as pl

from pmd import schema
from pmd.manifest import Manifest
from pmd.shards import describe_file

SOURCES = ["coco", "conceptual_12m", "red_caps", "yfcc100m", "visual_genome", "wit"]
WORDS = ["a", "dog", "on", "the", "beach", "with", "red", "ball", "sunset", "over", "city", "man", "riding", "bike"]


def generate(root: Path, rows: int, image_bytes: int, with_images: bool, shard_rows: int = 100_000) -> None:
    rng = np.random.default_rng(0)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    entries, accounting = [], {}
    for shard, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        lengths = rng.integers(3, 25, n)
        vocab = np.array(WORDS)
        texts = [" ".join(vocab[rng.integers(0, len(WORDS), k)]) for k in lengths]
        sources = np.array(SOURCES)[rng.integers(0, len(SOURCES), n)]
        image_ids = rng.integers(0, rows // 2, n)  # about half the images carry two captions
        frame = pl.DataFrame({
            "key": [f"k/{start + i}" for i in range(n)],
            "source": sources,
            "text": texts,
            "image_url": [None] * n,
            "image_ref": [None] * n,
            "split": ["train"] * n,
            "meta": ["{}"] * n,
            "lang": ["en"] * n,
            "lang_score": rng.random(n).astype(np.float32),
            "image_sha256": [hashlib.sha256(int(i).to_bytes(8, "little")).hexdigest() for i in image_ids],
            "width": rng.integers(200, 300, n).astype(np.int32),
            "height": rng.integers(200, 300, n).astype(np.int32),
            "original_width": rng.integers(300, 1200, n).astype(np.int32),
            "original_height": rng.integers(300, 1200, n).astype(np.int32),
        })
        if with_images:
            blob = rng.bytes(n * image_bytes)  # incompressible, like JPEG
            frame = frame.with_columns(image=pl.Series([blob[i * image_bytes:(i + 1) * image_bytes]
                                                        for i in range(n)], dtype=pl.Binary))
            columns = list(schema.SHARD_COLUMNS)
        else:
            columns = [c for c in schema.SHARD_COLUMNS if c != "image"]
        path = root / "shards" / f"shard-{shard:05d}.parquet"
        frame.select(columns).write_parquet(path, row_group_size=1000)
        counts = frame.group_by("source").len().iter_rows()
        per_source = dict(counts)
        for s, c in per_source.items():
            acc = accounting.setdefault(s, {"input_rows": 0, "pairs": 0, "rejects": 0, "failures": 0,
                                            "rejects_by_reason": {}})
            acc["input_rows"] += c
            acc["pairs"] += c
        entries.append(describe_file(root, f"shards/{path.name}"))
    Manifest.new(root, entries, accounting=accounting).write()


def time_audits(roots: list[Path], repeat: int = 5) -> list[float]:
    """Best of `repeat` runs each, interleaved so that a busy neighbour slows both alike."""
    from pmd.stats import audit

    best = [float("inf")] * len(roots)
    for _ in range(repeat):
        for i, root in enumerate(roots):
            start = time.perf_counter()
            result = audit(root)
            best[i] = min(best[i], time.perf_counter() - start)
            assert result["total"]["pairs"] > 0
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--image-bytes", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/stats"))
    args = parser.parse_args()
    with_dir, without_dir = args.workdir / "with-images", args.workdir / "without-images"
    for d, images in ((with_dir, True), (without_dir, False)):
        if not (d / "manifest.json").exists():
            print(f"generating {args.rows:,} rows in {d} ...", flush=True)
            generate(d, args.rows, args.image_bytes, images)
    size = lambda d: sum(p.stat().st_size for p in (d / "shards").glob("*.parquet")) / 1e9  # noqa: E731
    t_with, t_without = time_audits([with_dir, without_dir])
    result = {"rows": args.rows, "cores": os.cpu_count(), "with_images_gb": round(size(with_dir), 2),
              "without_images_gb": round(size(without_dir), 2), "with_images_s": round(t_with, 2),
              "without_images_s": round(t_without, 2), "rows_per_s_with": round(args.rows / t_with),
              "rows_per_s_without": round(args.rows / t_without), "ratio": round(t_with / t_without, 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
