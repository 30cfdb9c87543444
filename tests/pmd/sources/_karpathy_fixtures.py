"""Karpathy `dataset_coco.json` files for the COCO, LN-COCO and Visual Genome tests, in the upstream layout.

The real first record of the upstream file (a `test` image, cocoid 391895) comes from tests/fixtures/real/; the
other records are crafted in the same shape.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path
from typing import Any

from tests.real_fixtures import REAL as REAL_FIXTURES

REAL_SAMPLE = REAL_FIXTURES / "karpathy_coco_sample.json"
REAL_COCOID = 391895


def real_document() -> dict[str, Any]:
    return json.loads(REAL_SAMPLE.read_text(encoding="utf-8"))


def image(cocoid: int, split: str, sentences: list[tuple[int, str]], imgid: int = 1,
          filepath: str | None = None) -> dict[str, Any]:
    """A Karpathy image record, key order as upstream."""
    folder = filepath or ("train2014" if split in ("train",) else "val2014")
    return {
        "filepath": folder,
        "sentids": [sentid for sentid, _ in sentences],
        "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
        "imgid": imgid,
        "split": split,
        "sentences": [{"tokens": raw.lower().rstrip(". ").split(), "raw": raw, "imgid": imgid, "sentid": sentid}
                      for sentid, raw in sentences],
        "cocoid": cocoid,
    }


def document(*images: dict[str, Any], with_real: bool = True) -> dict[str, Any]:
    items = (real_document()["images"] if with_real else []) + list(images)
    return {"images": items, "dataset": "coco"}


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode("utf-8")


def write_karpathy(directory: Path, doc: dict[str, Any], variant: str = "plain") -> Path:
    """`dataset_coco.json` as published (`plain`), gzipped (`gz`), or inside PMD's `caption_datasets.zip` (`zip`,
    next to the Flickr split files that must be ignored)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = dumps(doc)
    if variant == "plain":
        path = directory / "dataset_coco.json"
        path.write_bytes(data)
    elif variant == "gz":
        path = directory / "dataset_coco.json.gz"
        path.write_bytes(gzip.compress(data))
    elif variant == "zip":
        path = directory / "caption_datasets.zip"
        flickr = json.dumps({"images": [{"split": "test", "filename": "1000092795.jpg", "imgid": 0,
                                         "sentences": [], "sentids": []}], "dataset": "flickr30k"})
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("dataset_flickr30k.json", flickr)
            archive.writestr("dataset_coco.json", data)
            archive.writestr("dataset_flickr8k.json", flickr.replace("flickr30k", "flickr8k"))
    else:  # pragma: no cover - test helper misuse
        raise ValueError(variant)
    return path


def write_truncated_karpathy(directory: Path, doc: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "dataset_coco.json"
    data = dumps(doc)
    path.write_bytes(data[: len(data) * 2 // 3])
    return path
