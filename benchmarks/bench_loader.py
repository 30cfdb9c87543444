"""Loader throughput per worker vs a plain loop decoding and cropping the same images (the limit).

Generates PMD-format shards of noisy 512x384 JPEGs (so decode cost is realistic), then measures:
  * plain/naive : one process, full-size PIL decode + random resized crop to 224 and 112 (what a simple loop does)
  * plain/same  : one process, flava.data.decode_train (same reduced-size decode + two-way crop) on the same bytes
  * loader      : flava.data.SourceLoader (Parquet row groups, shuffle window, decode, crop, block masks, BERT
                  tokenisation + masking, ITM negatives, collation, IPC) with W workers -> samples/s / W
The ratio loader-per-worker / plain/same is the loader's efficiency (target >= 0.8).

    python benchmarks/bench_loader.py --rows 1024 --workers 1 2 --batch 32
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from flava.data import DataSpec, Source, SourceLoader, crop_box, decode_train, iter_texts
from flava.tokenizer import train_wordpiece
from pmd.manifest import Manifest
from pmd.schema import SHARD_SCHEMA
from pmd.shards import describe_file


def make_shards(out: Path, rows: int, w: int = 512, h: int = 384, shards: int = 2) -> None:
    rng = np.random.default_rng(0)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    entries = []
    per = rows // shards
    for s in range(shards):
        recs = []
        for i in range(per):
            base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
            im = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(im).astype(np.int16) + rng.integers(-12, 12, (h, w, 3))
            buf = io.BytesIO()
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            img = buf.getvalue()
            recs.append(dict(key=f"{s}-{i}", source="coco", text=f"a photo of thing number {i % 50} on a table",
                             image_url=None, image_ref=None, split="train", meta="{}", lang="en", lang_score=1.0,
                             image=img, image_sha256=hashlib.sha256(img).hexdigest(), width=w, height=h,
                             original_width=w, original_height=h))
        name = f"shards/shard-{s:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(recs, schema=SHARD_SCHEMA), out / name, row_group_size=256)
        entries.append(describe_file(out, name))
    Manifest.new(out, entries).write()


def plain_naive(images: list[bytes], size: int = 224, cb: int = 112) -> float:
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for data in images:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        box = crop_box(*im.size, rng, (0.9, 1.0), (0.75, 4 / 3))
        np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=box))
        np.asarray(im.resize((cb, cb), Image.Resampling.LANCZOS, box=box))
    return len(images) / (time.perf_counter() - t)


def plain_same(images: list[bytes], size: int = 224, cb: int = 112) -> float:
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for data in images:
        decode_train(data, size, cb, rng, (0.9, 1.0), (0.75, 4 / 3))
    return len(images) / (time.perf_counter() - t)


def loader_rate(build: Path, tok, workers: int, batch: int, batches: int) -> float:
    spec = DataSpec(kind="pairs", batch_size=batch, image_size=224, codebook_size=112, grid_size=14,
                    text_max_length=77, seed=0, shuffle_buffer=512)
    loader = SourceLoader(dict(source=Source("pairs", [str(build)]), spec=spec, tokenizer=tok, rank=0,
                               world_size=1), workers, 4)
    for _ in range(max(2, workers * 2)):  # warm up: worker start, first window read
        next(loader)
    t = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * batch / (time.perf_counter() - t)
    loader.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        build = Path(d) / "build"
        make_shards(build, args.rows)
        tok = train_wordpiece(iter_texts([str(build)]), Path(d) / "tok", vocab_size=500)
        images = pq.read_table(build / "shards" / "shard-00000.parquet", columns=["image"]).column("image").to_pylist()
        images = images[:256]
        res = {"cpu_count": os.cpu_count(), "plain_naive_sps": plain_naive(images),
               "plain_same_sps": plain_same(images)}
        for w in args.workers:
            rate = loader_rate(build, tok, w, args.batch, args.batches)
            res[f"loader_w{w}_sps"] = rate
            res[f"loader_w{w}_per_worker_sps"] = rate / max(1, w)
            res[f"ratio_w{w}_vs_same"] = rate / max(1, w) / res["plain_same_sps"]
            res[f"ratio_w{w}_vs_naive"] = rate / max(1, w) / res["plain_naive_sps"]
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>26}: {v:.3f}" if isinstance(v, float) else f"{k:>26}: {v}")


if __name__ == "__main__":
    main()
