"""Generated PMD-format shards for the trainer tests: small JPEGs of coloured shapes with captions that describe
them ("a red circle"), written as a build directory (manifest.json + shards/*.parquet, pmd.schema.SHARD_SCHEMA)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pmd.manifest import Manifest
from pmd.schema import SHARD_SCHEMA
from pmd.shards import describe_file
from pmd_demo.drawings import SHAPES, Drawing, draw, jpeg

CLASSES = [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in SHAPES]


def make_rows(n: int, seed: int = 0, size: int = 48, split: str = "train", bad: int = 0) -> list[dict]:
    """``n`` rows cycling through the 12 classes; ``bad`` of them get undecodable bytes or an empty caption."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour, shape = CLASSES[i % len(CLASSES)].split()
        img = jpeg(draw(Drawing(colour, shape, rng.getrandbits(32)), size))
        text = rng.choice(["a {} {}", "a photo of a {} {}", "{} {} on a plain background"]).format(colour, shape)
        if i < bad:
            if i % 2 == 0:
                img = b"not a jpeg" + img[:20]
            else:
                text = "   "
        rows.append(
            dict(
                key=f"{split}-{seed}-{i:06d}", source="coco", text=text, image_url=None, image_ref=f"gen/{i}.jpg",
                split=split, meta=json.dumps({"label": f"{colour} {shape}"}), lang="en", lang_score=1.0, image=img,
                image_sha256=hashlib.sha256(img).hexdigest(), width=size, height=size, original_width=size,
                original_height=size,
            )
        )
    return rows


def write_build(out: Path, rows: list[dict], shards: int = 2, row_group_size: int = 32) -> Path:
    """A build directory in docs/build-format.md's layout; returns it."""
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    entries = []
    per = -(-len(rows) // shards)
    for s in range(shards):
        part = rows[s * per : (s + 1) * per]
        if not part:
            continue
        name = f"shards/shard-{s:05d}.parquet"
        table = pa.Table.from_pylist(part, schema=SHARD_SCHEMA)
        pq.write_table(table, out / name, row_group_size=row_group_size)
        entries.append(describe_file(out, name))
    Manifest.new(out, entries, totals={"pairs": len(rows)}).write()
    return out


def make_build(out: Path, n: int = 96, seed: int = 0, size: int = 48, split: str = "train", bad: int = 0,
               shards: int = 2, row_group_size: int = 32) -> Path:
    return write_build(out, make_rows(n, seed, size, split, bad), shards, row_group_size)
