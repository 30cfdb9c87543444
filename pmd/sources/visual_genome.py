"""Visual Genome region descriptions (v1.2): one pair per region, the image to be cropped to the region's box.

Inputs: `region_descriptions.json` (top-level list of `{"regions": [{region_id, image_id, phrase, x, y, width,
height}, ...], "id": image_id}`), `image_data.json` (list of `{image_id, url, width, height, coco_id, flickr_id}`),
each possibly zipped as published (`region_descriptions.json.zip`, `image_data.json.zip`), plus Karpathy's
`dataset_coco.json` / `caption_datasets.zip` for decontamination (images whose `coco_id` is in Karpathy val/test
are dropped, like HF M4's build).

`prepare` loads `image_data.json` (108k entries) and the decontamination ids into the context that travels with
the work (`VisualGenomeContext`); the regions are streamed one image at a time. Images are members of `images.zip`
/ `images2.zip`: `image_ref` is the last two components of the image URL (`VG_100K_2/1.jpg`). The pair's `crop` is
the region in whole pixels, which the image stage crops to; `meta.box` records the same box as computed (before
rounding). Everything is split `train`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmd.sources import limits
from pmd.sources.base import Crop, InputError, Pair, Reason, Record, Reject, SourceAdapter, meta_json, reject
from pmd.sources.inputs import input_location, input_name, iter_json_items, strip_compression_suffix
from pmd.sources.karpathy import (
    KARPATHY_HELP,
    DecontaminationOptions,
    as_int,
    eval_cocoids,
    partition_inputs,
    require_karpathy,
)
from pmd.text import clean_caption

REGIONS_JSON = "region_descriptions.json"
IMAGE_DATA_JSON = "image_data.json"
_INT32_MAX = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: Any) -> int | None:
    return value if _is_int(value) and value > 0 else None


def _image_ref(url: Any) -> str | None:
    """`https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg` -> `VG_100K_2/1.jpg` (the member in images*.zip)."""
    if not isinstance(url, str):
        return None
    parts = [part for part in url.split("?")[0].split("/") if part]
    if len(parts) < 2 or "." not in parts[-1] or ":" in parts[-2]:
        return None
    return f"{parts[-2]}/{parts[-1]}"


# image_id -> (image_ref or None, width or None, height or None, coco_id or None, flickr_id or None): a tuple, to keep
# the 108k entries small in memory and when the context is pickled to workers.
ImageInfo = tuple[str | None, int | None, int | None, int | None, int | None]


@dataclass(frozen=True)
class VisualGenomeContext:
    """What converting a region needs besides the region: for v1.2's 108,077 images about 36 MB of Python heap and
    4.3 MB pickled (benchmarks/bench_context_size.py), put in Ray's object store once per ingest."""

    images: dict[int, ImageInfo]
    #: Cocoids of Karpathy's val/test images (empty when not decontaminating).
    eval_cocoids: frozenset[int]


def load_image_data(path: Path) -> dict[int, ImageInfo]:
    """`image_data.json` as a dict. Entries without an integer id cannot be joined to anything and are skipped;
    an entry without a usable URL is kept with `image_ref` None (its regions are rejected as `no_image_metadata`)."""
    images: dict[int, ImageInfo] = {}
    for record in iter_json_items(input_location(path), "item", member_pattern=f"*{IMAGE_DATA_JSON}"):
        entry = record.raw
        if not isinstance(entry, dict):
            continue
        image_id = entry.get("image_id", entry.get("id"))  # v1.2 says image_id, v1.0 said id
        if not _is_int(image_id):
            continue
        images[image_id] = (
            _image_ref(entry.get("url")),
            _positive_int(entry.get("width")),
            _positive_int(entry.get("height")),
            as_int(entry.get("coco_id")),
            as_int(entry.get("flickr_id")),
        )
        if len(images) > limits.MAX_LOOKUP_ENTRIES:
            raise InputError(record.input_file, f"more than {limits.MAX_LOOKUP_ENTRIES:,} image entries (v1.2 has "
                                                "108,077): refused rather than held in memory")
    return images


def crop_box(x: float, y: float, width: float, height: float, image_width: int | None, image_height: int | None,
             ) -> tuple[float, float, float, float] | str:
    """The crop box `(x, y, width, height)` of a region, or why there is none.

    Decision: VG boxes often overshoot the image by a pixel or two (and a few start at -1), so a box is clamped to
    the image rather than rejected; only a box with no area, or none left after clamping (entirely outside the
    image), is `bad_box`. When the image size is unknown the box is kept as published.
    """
    if not all(math.isfinite(v) for v in (x, y, width, height)):
        return f"non-finite box ({x}, {y}, {width}, {height})"
    if width <= 0 or height <= 0:
        return f"non-positive box size {width}x{height}"
    left, top, right, bottom = max(x, 0), max(y, 0), x + width, y + height
    if image_width is not None:
        right = min(right, image_width)
    if image_height is not None:
        bottom = min(bottom, image_height)
    if right <= left or bottom <= top:
        return f"box ({x}, {y}, {width}, {height}) lies outside the {image_width}x{image_height} image"
    return left, top, right - left, bottom - top


def pixel_crop(box: tuple[float, float, float, float]) -> Crop:
    """A `crop_box` result in whole pixels, each value rounded on its own as the image stage always has (Python's
    round, half to even). Capped to int32: no image is 2^31 pixels wide, so the cap never changes the region the
    image stage clamps it to. A box that rounds to nothing is left for the image stage to call `bad_box`."""
    x, y, width, height = (min(round(value), _INT32_MAX) for value in box)
    return Crop(x, y, width, height)


class VisualGenomeAdapter(SourceAdapter):
    name = "visual_genome"
    inputs_help = (f"{REGIONS_JSON}(.zip) v1.2 and {IMAGE_DATA_JSON}(.zip), plus {KARPATHY_HELP} for "
                   "decontamination; images: images.zip, images2.zip")
    Options = DecontaminationOptions

    def __init__(self, options: DecontaminationOptions | None = None):
        self.options = options if options is not None else DecontaminationOptions()

    def _identify(self, inputs: Sequence[Path]) -> tuple[Path, Path, Path | None]:
        karpathy, others = partition_inputs(inputs)
        found: dict[str, Path] = {}
        for path in others:
            base = strip_compression_suffix(input_name(path))
            if base not in (REGIONS_JSON, IMAGE_DATA_JSON):
                raise InputError(path, f"not an input of {self.name}; expected {self.inputs_help}")
            if base in found:
                raise InputError(path, f"{base} given twice (also {found[base]})")
            found[base] = path
        for base in (REGIONS_JSON, IMAGE_DATA_JSON):
            if base not in found:
                raise InputError(base, f"missing input for {self.name}: add {base} (or {base}.zip) to the inputs")
        return found[REGIONS_JSON], found[IMAGE_DATA_JSON], karpathy

    def prepare(self, inputs: Sequence[Path]) -> VisualGenomeContext:
        _, image_data, karpathy = self._identify(inputs)
        ids = eval_cocoids(require_karpathy(karpathy, self.name)) if self.options.decontaminate else frozenset()
        return VisualGenomeContext(load_image_data(image_data), ids)

    def records(self, inputs: Sequence[Path]) -> Iterator[Record]:
        regions, _, _ = self._identify(inputs)
        yield from iter_json_items(regions, "item", member_pattern=f"*{REGIONS_JSON}")

    def convert(self, record: Record, context: VisualGenomeContext) -> Iterator[Pair | Reject]:
        if not isinstance(context, VisualGenomeContext):
            # A misuse, not a bad row: without image_data.json no region can be converted.
            raise TypeError(f"{self.name}: convert() needs the VisualGenomeContext prepare() returns, "
                            f"not {type(context).__name__}")
        item = record.raw
        if not isinstance(item, dict) or not _is_int(item.get("id")) or not isinstance(item.get("regions"), list):
            yield reject(record, Reason.MALFORMED, "image entry without an integer 'id' and a 'regions' list")
            return
        image_id = item["id"]
        info = context.images.get(image_id)
        for index, region in enumerate(item["regions"]):
            yield self._convert_region(Record(record.input_file, record.position, region), index, image_id, info,
                                       context.eval_cocoids)

    def _convert_region(self, record: Record, index: int, image_id: int, info: ImageInfo | None,
                        eval_ids: frozenset[int]) -> Pair | Reject:
        region = record.raw
        if not isinstance(region, dict) or not _is_int(region.get("region_id")):
            return reject(record, Reason.MALFORMED, f"region {index} of image {image_id}: no integer 'region_id'")
        key = f"{self.name}/{region['region_id']}"
        if region.get("image_id", image_id) != image_id:
            return reject(record, Reason.MALFORMED, f"region image_id {region.get('image_id')!r} is not the "
                                                    f"entry's id {image_id}", key=key)
        box = [region.get(field) for field in ("x", "y", "width", "height")]
        if not all(_is_number(value) for value in box):
            return reject(record, Reason.MALFORMED, "missing or non-numeric x/y/width/height", key=key)
        phrase = region.get("phrase")
        if not isinstance(phrase, str):
            return reject(record, Reason.MALFORMED, "missing or non-string 'phrase'", key=key)
        if info is None:
            return reject(record, Reason.NO_IMAGE_METADATA, f"image {image_id} not in {IMAGE_DATA_JSON}", key=key)
        image_ref, image_width, image_height, coco_id, flickr_id = info
        if image_ref is None:
            return reject(record, Reason.NO_IMAGE_METADATA, f"image {image_id} has no usable url", key=key)
        if coco_id is not None and coco_id in eval_ids:
            return reject(record, Reason.DECONTAMINATED, f"COCO image {coco_id} in Karpathy val/test", key=key)
        text = clean_caption(phrase)
        if not text:
            return reject(record, Reason.EMPTY_TEXT, key=key)
        crop = crop_box(*box, image_width, image_height)
        if isinstance(crop, str):
            return reject(record, Reason.BAD_BOX, crop, key=key)
        meta: dict[str, Any] = {
            "region_id": region["region_id"],
            "image_id": image_id,
            "coco_id": coco_id,
            "flickr_id": flickr_id,
            "image_width": image_width,
            "image_height": image_height,
            "box": dict(zip(("x", "y", "width", "height"), crop)),
        }
        if list(crop) != box:
            meta["upstream_box"] = dict(zip(("x", "y", "width", "height"), box))
        return Pair(key=key, text=text, split="train", meta=meta_json(meta), image_ref=image_ref,
                    crop=pixel_crop(crop))
