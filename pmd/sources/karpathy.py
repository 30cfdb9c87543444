"""Karpathy's COCO split file `dataset_coco.json`, shared by COCO, LN-COCO and Visual Genome.

Published on its own, or as member `dataset_coco.json` of PMD's `caption_datasets.zip` (which also holds the
Flickr8k/Flickr30k split files, never read here). Layout:
`{"images": [{"filepath", "sentids", "filename", "imgid", "split", "sentences": [{"tokens", "raw", "imgid",
"sentid"}], "cocoid"}], "dataset": "coco"}`; `split` is one of train, restval, val, test.

COCO trains on train+restval; the val and test images (5,000 each, the COCO retrieval/captioning test images) are
the decontamination set that LN-COCO and Visual Genome drop.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pmd.sources import limits
from pmd.sources.base import InputError, Record
from pmd.sources.inputs import (_READ_ERRORS, input_location, input_name, is_compressed, iter_json_items, iter_streams,
                                strip_compression_suffix)

KARPATHY_JSON = "dataset_coco.json"
KARPATHY_ZIP = "caption_datasets.zip"
#: What to tell a user who forgot the file.
KARPATHY_HELP = f"Karpathy's {KARPATHY_JSON} (or PMD's {KARPATHY_ZIP}, which contains it)"

#: Karpathy splits whose images must not be trained on.
EVAL_SPLITS = frozenset({"val", "test"})
#: Karpathy split -> PMD split (COCO trains on train + restval).
SPLIT_MAP = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


@dataclass(frozen=True, slots=True)
class DecontaminationOptions:
    """`-o decontaminate=false` builds the source without dropping Karpathy val/test images (and without the file)."""

    decontaminate: bool = True


_HEAD = re.compile(rb'\s*\{\s*"images"\s*:\s*\[')
_DATASET_AT_END = re.compile(rb'"dataset"\s*:\s*"(?P<dataset>[A-Za-z0-9_]+)"\s*\}\s*$')
_TAIL_BYTES = 4096


def karpathy_dataset(path: Path | str) -> str | None:
    """`"coco"`, `"flickr30k"`, ...: the `dataset` a Karpathy split file names, read from its content; None for a
    file that is not one (or that cannot be read: the adapter reading it reports that).

    Karpathy's files are `{"images": [...], "dataset": "coco"}`, the name last: the head is checked first (a few
    bytes, so other JSON inputs are let go at once), then the end of the file is read for the name.
    """
    path = input_location(path)
    name = input_name(path)
    if name.lower().endswith(".zip") or not strip_compression_suffix(name).lower().endswith(".json"):
        return None
    try:
        for _, stream in iter_streams(path):
            head = stream.read(256)
            if not _HEAD.match(head):
                return None
            if not is_compressed(path):
                stream.seek(0, io.SEEK_END)
                stream.seek(max(0, stream.tell() - _TAIL_BYTES))
                tail = stream.read()
            else:
                tail = head
                while block := stream.read(1 << 20):
                    tail = (tail + block)[-_TAIL_BYTES:]
            match = _DATASET_AT_END.search(tail)
            return match.group("dataset").decode() if match else None
    except (InputError, *_READ_ERRORS):
        return None
    return None


def is_karpathy_input(path: Path | str) -> bool:
    """`dataset_coco.json` (possibly .gz/.bz2/.zip-compressed), `caption_datasets.zip`, or a JSON file of any name
    whose content is Karpathy's COCO split file (`"dataset": "coco"`)."""
    name = input_name(path)
    if name == KARPATHY_ZIP or strip_compression_suffix(name) == KARPATHY_JSON:
        return True
    return karpathy_dataset(path) == "coco"


def iter_karpathy_images(path: Path) -> Iterator[Record]:
    """The image records of `dataset_coco.json`, streamed, each with its 0-based index in `images`."""
    # In a zip (caption_datasets.zip, or a zipped dataset_coco.json) read only the COCO member, at any depth.
    return iter_json_items(input_location(path), "images.item", member_pattern=f"*{KARPATHY_JSON}")


def as_int(value: object) -> int | None:
    """An id as int: ints, integral floats and ASCII digit strings; anything else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    return None


def eval_cocoids(path: Path) -> frozenset[int]:
    """Cocoids of the images in Karpathy's val and test splits: the decontamination set.

    Records that do not say which image they are (no usable `cocoid`) cannot be decontaminated against and are
    skipped; a file that is not readable at all is an `InputError` from the reader.
    """
    ids: set[int] = set()
    for record in iter_karpathy_images(path):
        item = record.raw
        if not isinstance(item, dict) or item.get("split") not in EVAL_SPLITS:
            continue
        cocoid = as_int(item.get("cocoid"))
        if cocoid is not None:
            ids.add(cocoid)
            if len(ids) > limits.MAX_LOOKUP_ENTRIES:
                raise InputError(record.input_file, f"more than {limits.MAX_LOOKUP_ENTRIES:,} val/test images "
                                                    "(Karpathy's split has 10,000): refused rather than held in memory")
    return frozenset(ids)


def partition_inputs(inputs: Sequence[Path]) -> tuple[Path | None, list[Path]]:
    """(the Karpathy input or None, every other input). Two Karpathy inputs are an error."""
    karpathy: Path | None = None
    others: list[Path] = []
    for path in inputs:
        path = input_location(path)
        if is_karpathy_input(path):
            if karpathy is not None:
                raise InputError(path, f"Karpathy split file given twice (also {karpathy}); pass one {KARPATHY_HELP}")
            karpathy = path
        else:
            others.append(path)
    return karpathy, others


def require_karpathy(karpathy: Path | None, source: str, purpose: str = "decontamination") -> Path:
    """The Karpathy input, or an `InputError` saying which input to add (and how to opt out)."""
    if karpathy is None:
        opt_out = " or pass -o decontaminate=false to build without it" if purpose == "decontamination" else ""
        raise InputError(
            KARPATHY_JSON,
            f"missing input for {source}: add {KARPATHY_HELP} to the inputs ({purpose}){opt_out}",
        )
    return karpathy


__all__ = [
    "DecontaminationOptions",
    "EVAL_SPLITS",
    "KARPATHY_HELP",
    "KARPATHY_JSON",
    "KARPATHY_ZIP",
    "as_int",
    "SPLIT_MAP",
    "eval_cocoids",
    "is_karpathy_input",
    "karpathy_dataset",
    "iter_karpathy_images",
    "partition_inputs",
    "require_karpathy",
]
