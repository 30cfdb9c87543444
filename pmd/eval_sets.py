"""The standard retrieval test sets in their own formats: Karpathy's split files (`dataset_coco.json`,
`dataset_flickr30k.json`, or PMD's `caption_datasets.zip` holding both) plus the image archive or folder.

A plain reader with no Ray and no torch, so that `flava eval retrieval` (which may not import pmd.sources) reads
COCO's and Flickr30k's Karpathy test splits through the same JSON and archive readers the build uses.

Image refs: COCO's records name `filepath/filename` (`val2014/COCO_val2014_000000391895.jpg`, a member of
`val2014.zip`); Flickr30k's name only `filename` (`1000092795.jpg`), stored as `flickr30k-images/1000092795.jpg`
in the usual archive, so a bare file name also resolves to the one member of that base name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pmd.archives import ArchiveIndex
from pmd.sources.base import InputError
from pmd.sources.inputs import iter_json_items
from pmd.sources.karpathy import KARPATHY_ZIP, karpathy_dataset

log = logging.getLogger(__name__)

#: Karpathy's split file of each dataset (member names inside caption_datasets.zip too).
KARPATHY_FILES = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json",
                  "flickr8k": "dataset_flickr8k.json"}
KARPATHY_SPLITS = ("train", "restval", "val", "test")


class EvalSetError(ValueError):
    """An evaluation set that cannot be read (the message names the file); callers outside pmd catch this, not
    pmd.sources' InputError."""


@dataclass(frozen=True, slots=True)
class KarpathyImage:
    ref: str  # the image's member path as the split file names it
    captions: tuple[str, ...]


def karpathy_images(path: Path | str, split: str = "test", dataset: str | None = None) -> list[KarpathyImage]:
    try:
        return _karpathy_images(path, split, dataset)
    except InputError as e:
        raise EvalSetError(str(e)) from None


def _karpathy_images(path: Path | str, split: str = "test", dataset: str | None = None) -> list[KarpathyImage]:
    """The images of one split of a Karpathy split file, in file order, each with its raw captions.

    ``dataset`` picks the member of `caption_datasets.zip` (coco, flickr30k, flickr8k); for a plain JSON file it is
    read from the file and, when given, must agree. Records without a file name or without captions are skipped
    and logged (they cannot be evaluated)."""
    path = Path(path)
    if split not in KARPATHY_SPLITS:
        raise InputError(path, f"unknown Karpathy split {split!r}; one of {', '.join(KARPATHY_SPLITS)}")
    member = None
    if path.suffix.lower() == ".zip":
        if dataset is None:
            raise InputError(path, f"a zip of Karpathy split files ({KARPATHY_ZIP}): say which dataset "
                                   f"({', '.join(KARPATHY_FILES)})")
        if dataset not in KARPATHY_FILES:
            raise InputError(path, f"unknown Karpathy dataset {dataset!r}; one of {', '.join(KARPATHY_FILES)}")
        member = f"*{KARPATHY_FILES[dataset]}"
    else:
        found = karpathy_dataset(path)
        if found is None:
            raise InputError(path, "not a Karpathy split file (expected {\"images\": [...], \"dataset\": NAME})")
        if dataset is not None and found != dataset:
            raise InputError(path, f"a Karpathy split file of {found!r}, not {dataset!r}")
    out: list[KarpathyImage] = []
    skipped = 0
    for record in iter_json_items(path, "images.item", member_pattern=member):
        item = record.raw
        if not isinstance(item, dict) or item.get("split") != split:
            continue
        filename = item.get("filename")
        captions = tuple(s["raw"] for s in item.get("sentences") or ()
                         if isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip())
        if not isinstance(filename, str) or not filename or not captions:
            skipped += 1
            continue
        filepath = item.get("filepath")
        ref = f"{filepath}/{filename}" if isinstance(filepath, str) and filepath else filename
        out.append(KarpathyImage(ref, captions))
    if skipped:
        log.warning("%s: %d %s-split record(s) without a file name or captions skipped", path, skipped, split)
    if not out:
        raise InputError(path, f"no images in split {split!r}")
    return out


def iter_karpathy_split(
    path: Path | str, images: Sequence[Path | str], split: str = "test", dataset: str | None = None,
    max_bytes: int | None = None,
) -> Iterator[tuple[KarpathyImage, bytes | None, str | None]]:
    """``(image, bytes, error)`` for each image of the split, in file order, its bytes read from ``images`` (zips,
    tars, folders: pmd.archives). ``error`` (``missing_member: ...`` etc.) when an image cannot be read; the
    caller counts it."""
    entries = karpathy_images(path, split, dataset)
    missing = [str(p) for p in images if not Path(p).exists()]
    if missing:
        raise EvalSetError(f"image archive(s) or folder(s) not found: {missing}")
    index = ArchiveIndex.build([Path(p) for p in images])
    try:
        by_base: dict[str, str | None] = {}
        for name in index.refs():  # bare file names (Flickr30k's) -> the one member of that base name
            base = name.rsplit("/", 1)[-1]
            by_base[base] = None if base in by_base else name
        refs = []
        for e in entries:
            ref = e.ref
            if ref not in index and "/" not in ref and by_base.get(ref):
                ref = by_base[ref]
            refs.append(ref)
        kw = {} if max_bytes is None else {"max_bytes": max_bytes}
        got: dict[str, tuple[bytes | None, str | None]] = {}
        # read_many groups by archive; yield back in split order, holding at most one batch of bytes
        batch = 256
        for s in range(0, len(refs), batch):
            chunk = refs[s : s + batch]
            got.clear()
            for ref, data, error in index.read_many(dict.fromkeys(chunk), **kw):
                got[ref] = (data, error)
            for e, ref in zip(entries[s : s + batch], chunk):
                data, error = got[ref]
                yield e, data, error
    finally:
        index.close()


__all__ = ["EvalSetError", "KARPATHY_FILES", "KARPATHY_SPLITS", "KarpathyImage", "iter_karpathy_split",
           "karpathy_images"]
