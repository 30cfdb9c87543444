"""A small build written by hand in the documented format (docs/build-format.md), for audit tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pmd import schema
from pmd.manifest import Manifest
from pmd.shards import describe_file


def shard_row(key: str, source: str, text: str, image: bytes, width: int = 256, height: int = 192,
              original: tuple[int, int] = (640, 480), split: str = "train", lang: str | None = None,
              lang_score: float | None = None) -> dict:
    return {"key": key, "source": source, "text": text, "image_url": f"http://x/{key}.jpg", "image_ref": None,
            "split": split, "meta": "{}", "lang": lang, "lang_score": lang_score, "image": image,
            "image_sha256": hashlib.sha256(image).hexdigest(), "width": width, "height": height,
            "original_width": original[0], "original_height": original[1]}


def write_build(root: Path, shards: list[list[dict]], failures: list[dict], accounting: dict) -> Path:
    (root / "shards").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, rows in enumerate(shards):
        path = root / "shards" / f"shard-{i:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema.SHARD_SCHEMA), path, row_group_size=2)
        entries.append(describe_file(root, f"shards/{path.name}"))
    (root / "failures").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(failures, schema=schema.FAILURE_SCHEMA),
                   root / "failures" / "part-00000.parquet")
    Manifest.new(root, entries, [describe_file(root, "failures/part-00000.parquet")], accounting=accounting).write()
    return root


def failure(key: str, source: str, stage: str, reason: str) -> dict:
    return {"key": key, "source": source, "image_url": None, "image_ref": None, "stage": stage, "reason": reason,
            "detail": ""}


def known_build(root: Path) -> Path:
    """coco: 5 pairs over 2 images (one image shared by 3 captions); yfcc100m: 3 pairs, 1 image also in coco."""
    img_a, img_b, img_c, img_d = b"A" * 10, b"B" * 10, b"C" * 10, b"D" * 10
    shard0 = [
        shard_row("coco/1", "coco", "a man on a moped", img_a, original=(640, 480)),
        shard_row("coco/2", "coco", "a man riding a motor bike on a dirt road", img_a, original=(640, 480)),
        shard_row("yfcc100m/10", "yfcc100m", "sunset over the harbour tonight", img_c, original=(500, 375),
                  lang="en", lang_score=0.9),
        shard_row("coco/3", "coco", "two dogs", img_b, original=(480, 640), width=192, height=256, split="validation"),
    ]
    shard1 = [
        shard_row("coco/4", "coco", "a motorcycle", img_a, original=(640, 480)),
        shard_row("yfcc100m/11", "yfcc100m", "kids at the beach on a sunny day", img_d, original=(500, 333),
                  lang="en", lang_score=0.7),
        shard_row("coco/5", "coco", "a dog and another dog playing in the park", img_b, original=(480, 640),
                  width=192, height=256),
        shard_row("yfcc100m/12", "yfcc100m", "the same picture as coco", img_b, original=(480, 640), lang="en",
                  lang_score=0.5),
    ]
    failures = [
        failure("yfcc100m/13", "yfcc100m", "download", "http_404"),
        failure("yfcc100m/14", "yfcc100m", "download", "http_404"),
        failure("yfcc100m/15", "yfcc100m", "download", "timeout"),
        failure("yfcc100m/16", "yfcc100m", "check", "too_small"),
        failure("coco/6", "coco", "dedup", "duplicate"),
    ]
    accounting = {
        "coco": {"input_rows": 7, "pairs": 5, "rejects": 1, "failures": 1, "rejects_by_reason": {"empty_text": 1}},
        "yfcc100m": {"input_rows": 10, "pairs": 3, "rejects": 3, "failures": 4,
                     "rejects_by_reason": {"not_english": 2, "too_short": 1}},
    }
    return write_build(root, [shard0, shard1], failures, accounting)
