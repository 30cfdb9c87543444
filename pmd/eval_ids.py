"""Evaluation images kept out by Flickr photo id, before any download: the metadata-level half of decontamination.

COCO's and Flickr30k's evaluation images are Flickr photos, and several PMD sources point at Flickr photos too
(YFCC100M's download URLs, SBU's, some CC3M/CC12M/RedCaps URLs; Visual Genome's `flickr_id`; Localized Narratives
Flickr30k's image ids). A candidate whose Flickr photo id is the id of an evaluation image is the same photo, so it
fails with reason `eval_overlap` and the evaluation image named, and is never downloaded.

The evaluation ids come from files the user gives (`--eval-flickr-ids PATH`, repeatable):
- Karpathy's `dataset_flickr30k.json` (or PMD's `caption_datasets.zip`, which holds it): the `test` images; their
  file names are Flickr photo ids (`1000092795.jpg`). Set name `flickr30k_test`.
- COCO's `captions_val2014.json` / `captions_train2014.json`: each image's `flickr_url` holds its photo id. With
  Karpathy's `dataset_coco.json` also given (or in `caption_datasets.zip`), only Karpathy's val and test images
  count (set names `coco_karpathy_val`, `coco_karpathy_test`); without it, every image of the file (set name = the
  file name), which over-protects (restval images are trained on) but never under-protects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa

from pmd import schema
from pmd.decontaminate import EVAL_OVERLAP, SET_SEPARATOR, STAGE
from pmd.sources.base import InputError
from pmd.sources.inputs import input_name, iter_json_items, require_file
from pmd.sources.karpathy import EVAL_SPLITS, KARPATHY_ZIP, as_int, karpathy_dataset

# farm4.staticflickr.com/3153/2970773875_164f0c0b83_z.jpg, static.flickr.com/2723/4385058960_b0f291553e.jpg,
# live.staticflickr.com/65535/51234567890_abcdef1234_b.jpg; and photo pages flickr.com/photos/USER/ID.
_FLICKR_URL = (r"^https?://(?:[\w-]+\.)*(?:static\.?flickr\.com|staticflickr\.com)/(?:[\w-]+/)*?"
               r"(?P<id>\d+)_[0-9a-f]+(?:_[0-9a-z]+)?\.\w+"
               r"|^https?://(?:www\.|m\.)?flickr\.com/photos/[^/]+/(?P<page_id>\d+)")
_FLICKR_URL_RE = re.compile(_FLICKR_URL, re.IGNORECASE)
_DIGITS = re.compile(r"^(\d+)\.\w+$")
_VG_FLICKR_ID = re.compile(r'"flickr_id":(\d+)')
_LN_FLICKR30K = "localized_narratives__flickr30k"


def flickr_photo_id(url: str | None) -> int | None:
    """The photo id in a Flickr image or photo-page URL, else None."""
    if not url:
        return None
    match = _FLICKR_URL_RE.match(url)
    if match is None:
        return None
    return int(match.group("id") or match.group("page_id"))


# ------------------------------------------------------------------------------------------- evaluation ids
def _karpathy_flickr30k_test(path: Path, member: str | None) -> dict[int, str]:
    ids = {}
    for record in iter_json_items(path, "images.item", member_pattern=member):
        item = record.raw
        if not isinstance(item, dict) or item.get("split") != "test":
            continue
        match = _DIGITS.match(str(item.get("filename", "")))
        if match:
            ids[int(match.group(1))] = f"flickr30k_test{SET_SEPARATOR}{item['filename']}"
    return ids


def _karpathy_coco_eval(path: Path, member: str | None) -> dict[int, str]:
    """cocoid -> set name (coco_karpathy_val / coco_karpathy_test) of Karpathy's evaluation images."""
    out = {}
    for record in iter_json_items(path, "images.item", member_pattern=member):
        item = record.raw
        if isinstance(item, dict) and item.get("split") in EVAL_SPLITS:
            cocoid = as_int(item.get("cocoid"))
            if cocoid is not None:
                out[cocoid] = f"coco_karpathy_{item['split']}"
    return out


def _coco_captions_images(path: Path) -> list[tuple[int, str, int]]:
    """(cocoid, file name, Flickr photo id) of each image of a COCO captions file that has a Flickr URL."""
    out = []
    for record in iter_json_items(path, "images.item"):
        item = record.raw
        if not isinstance(item, dict):
            continue
        cocoid, photo = as_int(item.get("id")), flickr_photo_id(item.get("flickr_url"))
        if cocoid is not None and photo is not None:
            out.append((cocoid, str(item.get("file_name", cocoid)), photo))
    if not out:
        raise InputError(path, "no image with a flickr_url: not a COCO captions_*.json file")
    return out


def load_eval_flickr_ids(paths: Iterable[Path | str]) -> dict[int, str]:
    """Flickr photo id -> `SET!IMAGE` of every evaluation image the given files name (see the module docstring)."""
    ids: dict[int, str] = {}
    coco_eval: dict[int, str] | None = None
    captions: list[Path] = []
    paths = [require_file(p) for p in paths]
    for path in paths:
        if input_name(path) == KARPATHY_ZIP:
            ids.update(_karpathy_flickr30k_test(path, "*dataset_flickr30k.json"))
            coco_eval = {**(coco_eval or {}), **_karpathy_coco_eval(path, "*dataset_coco.json")}
            continue
        dataset = karpathy_dataset(path)
        if dataset == "flickr30k":
            ids.update(_karpathy_flickr30k_test(path, None))
        elif dataset == "coco":
            coco_eval = {**(coco_eval or {}), **_karpathy_coco_eval(path, None)}
        elif dataset is None and input_name(path).lower().endswith((".json", ".json.gz", ".json.bz2")):
            captions.append(path)
        else:
            found = f" (a Karpathy split file of dataset {dataset!r})" if dataset else ""
            raise InputError(path, f"not an evaluation id file{found}: expected Karpathy's dataset_flickr30k.json or "
                                   f"dataset_coco.json, {KARPATHY_ZIP}, or COCO's captions_*2014.json")
    for path in captions:
        for cocoid, file_name, photo in _coco_captions_images(path):
            if coco_eval is None:
                ids.setdefault(photo, f"{input_name(path)}{SET_SEPARATOR}{file_name}")
            elif cocoid in coco_eval:
                ids.setdefault(photo, f"{coco_eval[cocoid]}{SET_SEPARATOR}{file_name}")
    if not ids:
        raise InputError(", ".join(map(str, paths)), "these files name no evaluation image with a Flickr photo id")
    return ids


# ------------------------------------------------------------------------------------------------ screening
def candidate_photo_ids(candidates: pa.Table) -> list[int | None]:
    """The Flickr photo id of each candidate row (PAIR_SCHEMA), where its metadata has one."""
    urls = candidates.column(schema.IMAGE_URL).to_pylist()
    sources = candidates.column(schema.SOURCE).to_pylist()
    keys = candidates.column(schema.KEY).to_pylist()
    metas = candidates.column(schema.META).to_pylist()
    out: list[int | None] = []
    for url, source, key, meta in zip(urls, sources, keys, metas):
        photo = flickr_photo_id(url)
        if photo is None and source == "visual_genome" and meta:
            match = _VG_FLICKR_ID.search(meta)
            photo = int(match.group(1)) if match else None
        elif photo is None and source == _LN_FLICKR30K and key:
            # key = localized_narratives__flickr30k/{image_id}/{annotator_id}/{i}; the image id is the photo id.
            parts = key.split("/")
            photo = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        out.append(photo)
    return out


def screen_candidates(eval_ids: Mapping[int, str] | None, candidates: pa.Table
                      ) -> list[tuple[str, str, str] | None]:
    """The image stage's hook: per candidate, (stage, reason, detail) when it is an evaluation photo, else None."""
    if not eval_ids:
        return [None] * candidates.num_rows
    out: list[tuple[str, str, str] | None] = []
    for photo in candidate_photo_ids(candidates):
        name = eval_ids.get(photo) if photo is not None else None
        out.append(None if name is None else (STAGE, EVAL_OVERLAP, f"{name} (flickr photo {photo})"))
    return out
