"""Visual Genome adapter: region_descriptions.json + image_data.json (+ Karpathy) -> one pair per region."""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.pmd.sources._karpathy_fixtures import REAL_COCOID, document, image, write_karpathy
from pmd.sources import create_adapter
from pmd.sources.base import Crop, InputError, Pair, Reason, Record, Reject, meta_json
from pmd.sources.karpathy import DecontaminationOptions
from pmd.sources.visual_genome import VisualGenomeAdapter, crop_box, pixel_crop

VG = "https://cs.stanford.edu/people/rak248"
SOURCE = "visual_genome"


def region(region_id: int, image_id: int, phrase: str, x: Any, y: Any, width: Any, height: Any) -> dict[str, Any]:
    """A v1.2 region, key order as upstream."""
    return {"region_id": region_id, "width": width, "height": height, "image_id": image_id, "phrase": phrase,
            "y": y, "x": x}


def image_entry(image_id: int, url: str, width: int, height: int, coco_id: int | None = None,
                flickr_id: int | None = None) -> dict[str, Any]:
    return {"width": width, "url": url, "height": height, "image_id": image_id, "coco_id": coco_id,
            "flickr_id": flickr_id}


# Image 1 is the first image of VG (no COCO id); 2 is a COCO Karpathy-train image; 3 is the Karpathy test image.
IMAGE_DATA = [
    image_entry(1, f"{VG}/VG_100K_2/1.jpg", 800, 600),
    image_entry(2, f"{VG}/VG_100K/2.jpg", 800, 600, coco_id=9, flickr_id=2372541),
    image_entry(3, f"{VG}/VG_100K/3.jpg", 640, 480, coco_id=REAL_COCOID),
]
REGIONS = [
    {"regions": [region(1382, 1, "the clock is green in colour", 421, 57, 82, 139),
                 region(1383, 1, "shade is along the street ", 0, 388, 119, 209)], "id": 1},
    {"regions": [region(4091, 2, "man wearing\ta hat", 100, 50, 40, 60)], "id": 2},
    {"regions": [region(5001, 3, "a man on a moped", 10, 10, 100, 100),
                 region(5002, 3, "a dirt road", 0, 300, 640, 180)], "id": 3},
]


def write_json(directory: Path, name: str, value: Any, zipped: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = json.dumps(value).encode()
    if not zipped:
        path = directory / name
        path.write_bytes(data)
        return path
    path = directory / f"{name}.zip"  # as visualgenome.org publishes them
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return path


def inputs(tmp_path: Path, regions: list[Any] = REGIONS, image_data: list[Any] = IMAGE_DATA, zipped: bool = False,
           karpathy: str | None = "plain") -> list[Path]:
    paths = [write_json(tmp_path, "region_descriptions.json", regions, zipped),
             write_json(tmp_path, "image_data.json", image_data, zipped)]
    if karpathy is not None:
        doc = document(image(9, "train", [(1, "x.")]))
        paths.append(write_karpathy(tmp_path / "karpathy", doc, karpathy))
    return paths


def pair(region_id: int, text: str, image_ref: str, box: tuple, image_id: int, size: tuple[int, int],
         coco_id: int | None = None, flickr_id: int | None = None, upstream_box: tuple | None = None,
         crop: Crop | None = None) -> Pair:
    meta: dict[str, Any] = {
        "region_id": region_id, "image_id": image_id, "coco_id": coco_id, "flickr_id": flickr_id,
        "image_width": size[0], "image_height": size[1], "box": dict(zip(("x", "y", "width", "height"), box)),
    }
    if upstream_box is not None:
        meta["upstream_box"] = dict(zip(("x", "y", "width", "height"), upstream_box))
    # The crop is the box in whole pixels: the box itself when it is whole already.
    crop = crop if crop is not None else Crop(*box)
    return Pair(key=f"{SOURCE}/{region_id}", text=text, split="train", meta=meta_json(meta), image_ref=image_ref,
                crop=crop)


KEPT = [
    pair(1382, "the clock is green in colour", "VG_100K_2/1.jpg", (421, 57, 82, 139), 1, (800, 600)),
    # 388 + 209 = 597 <= 600: inside
    pair(1383, "shade is along the street", "VG_100K_2/1.jpg", (0, 388, 119, 209), 1, (800, 600)),
    pair(4091, "man wearing a hat", "VG_100K/2.jpg", (100, 50, 40, 60), 2, (800, 600), coco_id=9,
         flickr_id=2372541),
]


def run(paths: list[Path], adapter: VisualGenomeAdapter | None = None) -> list[Pair | Reject]:
    return list((adapter or VisualGenomeAdapter()).iter_converted(paths))


@pytest.mark.parametrize(("zipped", "karpathy"), [(False, "plain"), (True, "zip"), (True, "gz")])
def test_pairs_and_decontamination(tmp_path: Path, zipped: bool, karpathy: str) -> None:
    out = run(inputs(tmp_path, zipped=zipped, karpathy=karpathy))
    assert [x for x in out if isinstance(x, Pair)] == KEPT
    rejects = [x for x in out if isinstance(x, Reject)]
    assert [(r.reason, r.key, r.position) for r in rejects] == [
        (Reason.DECONTAMINATED, f"{SOURCE}/5001", 2),
        (Reason.DECONTAMINATED, f"{SOURCE}/5002", 2),
    ]
    assert json.loads(rejects[0].record)["region_id"] == 5001  # the reject carries the region, not the image
    suffix = "region_descriptions.json.zip!region_descriptions.json" if zipped else "region_descriptions.json"
    assert rejects[0].input_file.endswith(suffix)


def test_opt_out_keeps_contaminated_images_and_needs_no_karpathy(tmp_path: Path) -> None:
    adapter = create_adapter("visual_genome", {"decontaminate": "no"})
    assert adapter.options == DecontaminationOptions(decontaminate=False)
    out = run(inputs(tmp_path, karpathy=None), adapter)
    assert out == KEPT + [
        pair(5001, "a man on a moped", "VG_100K/3.jpg", (10, 10, 100, 100), 3, (640, 480), coco_id=REAL_COCOID),
        pair(5002, "a dirt road", "VG_100K/3.jpg", (0, 300, 640, 180), 3, (640, 480), coco_id=REAL_COCOID),
    ]


def test_missing_karpathy_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"dataset_coco\.json.*caption_datasets\.zip.*decontaminate=false"):
        run(inputs(tmp_path, karpathy=None))


@pytest.mark.parametrize("missing", ["region_descriptions.json", "image_data.json"])
def test_missing_vg_input_is_an_input_error(tmp_path: Path, missing: str) -> None:
    paths = [p for p in inputs(tmp_path) if not p.name.startswith(missing)]
    with pytest.raises(InputError, match=f"missing input for visual_genome: add {missing}"):
        run(paths)


def test_unknown_and_duplicate_inputs(tmp_path: Path) -> None:
    paths = inputs(tmp_path)
    stray = write_json(tmp_path, "objects.json", [])
    with pytest.raises(InputError, match="objects.json: not an input of visual_genome"):
        run(paths + [stray])
    with pytest.raises(InputError, match="given twice"):
        run(paths + [write_json(tmp_path / "z", "image_data.json", IMAGE_DATA, zipped=True)])


def test_box_clamping_and_bad_boxes(tmp_path: Path) -> None:
    regions = [{"id": 1, "regions": [
        region(1, 1, "overshoots by two", 700, 500, 102, 102),  # -> clamped to 100x100
        region(2, 1, "starts at minus one", -1, -1, 51, 31),  # -> (0, 0, 50, 30)
        region(3, 1, "zero width", 10, 10, 0, 20),
        region(4, 1, "negative height", 10, 10, 20, -5),
        region(5, 1, "right of the image", 800, 10, 20, 20),
        region(6, 1, "below the image", 10, 650, 20, 20),
        region(7, 1, "float box", 1.5, 2.5, 10.0, 20.0),
    ]}]
    out = run(inputs(tmp_path, regions=regions))
    ref, size = "VG_100K_2/1.jpg", (800, 600)
    assert [x for x in out if isinstance(x, Pair)] == [
        pair(1, "overshoots by two", ref, (700, 500, 100, 100), 1, size, upstream_box=(700, 500, 102, 102)),
        pair(2, "starts at minus one", ref, (0, 0, 50, 30), 1, size, upstream_box=(-1, -1, 51, 31)),
        # Rounded half to even, each value on its own, as the image stage always rounded meta.box.
        pair(7, "float box", ref, (1.5, 2.5, 10.0, 20.0), 1, size, crop=Crop(2, 2, 10, 20)),
    ]
    bad = [(r.reason, r.key) for r in out if isinstance(r, Reject)]
    assert bad == [(Reason.BAD_BOX, f"{SOURCE}/{i}") for i in (3, 4, 5, 6)]


def test_crop_box_rule() -> None:
    assert crop_box(0, 0, 10, 10, 100, 100) == (0, 0, 10, 10)
    assert crop_box(95, 95, 10, 10, 100, 100) == (95, 95, 5, 5)
    assert crop_box(-5, 0, 10, 10, 100, 100) == (0, 0, 5, 10)
    assert crop_box(-10, 0, 10, 10, 100, 100) == "box (-10, 0, 10, 10) lies outside the 100x100 image"
    assert crop_box(100, 0, 10, 10, 100, 100) == "box (100, 0, 10, 10) lies outside the 100x100 image"
    assert crop_box(5, 5, 0, 10, 100, 100) == "non-positive box size 0x10"
    assert crop_box(500, 500, 10, 10, None, None) == (500, 500, 10, 10)  # image size unknown: kept as published
    # The JSON reader refuses 1e400; a caller passing floats gets a reason, never an OverflowError later.
    assert crop_box(0, 0, math.inf, 10, None, None) == "non-finite box (0, 0, inf, 10)"


def test_pixel_crop_rounds_like_the_image_stage_and_fits_int32() -> None:
    assert pixel_crop((0.5, 1.5, 2.5, 10.49)) == Crop(0, 2, 2, 10)  # half to even, each value on its own
    # Width unknown (no image size): capped, and the image stage clamps it to the image as before.
    assert pixel_crop((3, 4, 1e12, 5)) == Crop(3, 4, 2**31 - 1, 5)


def test_a_huge_box_on_an_image_of_unknown_size_is_capped(tmp_path: Path) -> None:
    regions = [{"id": 4, "regions": [region(3, 4, "huge, on an image of unknown size", 0, 0, 1e12, 5)]}]
    image_data = IMAGE_DATA + [{"image_id": 4, "url": f"{VG}/VG_100K/4.jpg"}]
    [out] = run(inputs(tmp_path, regions=regions, image_data=image_data))
    assert out.crop == Crop(0, 0, 2**31 - 1, 5)
    assert json.loads(out.meta)["box"] == {"x": 0, "y": 0, "width": 1e12, "height": 5}


def test_bad_rows_are_rejected_with_reasons(tmp_path: Path) -> None:
    image_data = IMAGE_DATA + [image_entry(4, "no-url", 100, 100), {"url": f"{VG}/VG_100K/99.jpg"}, "junk"]
    regions = [
        {"id": 1, "regions": [
            region(10, 1, "", 1, 1, 5, 5),
            region(11, 1, " \n ", 1, 1, 5, 5),
            {"width": 5, "height": 5, "image_id": 1, "phrase": "no id", "y": 1, "x": 1},
            region(12, 1, "string box", "1", 1, 5, 5),
            region(13, 1, None, 1, 1, 5, 5),  # type: ignore[arg-type]
            region(14, 2, "wrong image", 1, 1, 5, 5),
            "not a region",
            {"region_id": 15, "width": 5, "height": 5, "image_id": 1, "phrase": "no x", "y": 1},
        ]},
        {"id": 77, "regions": [region(20, 77, "image not in image_data", 1, 1, 5, 5)]},
        {"id": 4, "regions": [region(21, 4, "image without a usable url", 1, 1, 5, 5)]},
        {"id": "5", "regions": []},
        {"regions": [region(22, 1, "entry without id", 1, 1, 5, 5)]},
        [1, 2],
        {"id": 1, "regions": [region(23, 1, "good", 1, 1, 5, 5)]},
    ]
    out = run(inputs(tmp_path, regions=regions, image_data=image_data))
    assert out[-1] == pair(23, "good", "VG_100K_2/1.jpg", (1, 1, 5, 5), 1, (800, 600))
    assert [(r.reason, r.key, r.position) for r in out[:-1]] == [
        (Reason.EMPTY_TEXT, f"{SOURCE}/10", 0),
        (Reason.EMPTY_TEXT, f"{SOURCE}/11", 0),
        (Reason.MALFORMED, None, 0),
        (Reason.MALFORMED, f"{SOURCE}/12", 0),
        (Reason.MALFORMED, f"{SOURCE}/13", 0),
        (Reason.MALFORMED, f"{SOURCE}/14", 0),
        (Reason.MALFORMED, None, 0),
        (Reason.MALFORMED, f"{SOURCE}/15", 0),
        (Reason.NO_IMAGE_METADATA, f"{SOURCE}/20", 1),
        (Reason.NO_IMAGE_METADATA, f"{SOURCE}/21", 2),
        (Reason.MALFORMED, None, 3),
        (Reason.MALFORMED, None, 4),
        (Reason.MALFORMED, None, 5),
    ]
    assert "image 77 not in image_data.json" in out[8].detail


def test_truncated_region_file_is_an_input_error_naming_it(tmp_path: Path) -> None:
    paths = inputs(tmp_path, regions=REGIONS * 20)
    paths[0].write_bytes(paths[0].read_bytes()[:300])
    with pytest.raises(InputError) as info:
        run(paths)
    assert str(paths[0]) in str(info.value)


def test_truncated_zip_is_an_input_error_naming_it(tmp_path: Path) -> None:
    paths = inputs(tmp_path, zipped=True)
    paths[1].write_bytes(paths[1].read_bytes()[:60])  # image_data.json.zip
    with pytest.raises(InputError) as info:
        run(paths)
    assert str(paths[1]) in str(info.value)


def test_convert_needs_the_context_and_nothing_else(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="VisualGenomeContext"):
        list(VisualGenomeAdapter().convert(Record("region_descriptions.json", 0, REGIONS[0]), None))
    paths = inputs(tmp_path)
    context = pickle.loads(pickle.dumps(VisualGenomeAdapter().prepare(paths)))
    assert context.eval_cocoids == frozenset({REAL_COCOID}) and set(context.images) == {1, 2, 3}
    records = pickle.loads(pickle.dumps(list(VisualGenomeAdapter().records(paths))))
    # A third instance, which never saw the inputs: the rows come from (record, context) alone.
    assert [x for r in records for x in VisualGenomeAdapter().convert(r, context) if isinstance(x, Pair)] == KEPT


def test_keys_unique(tmp_path: Path) -> None:
    regions = [{"id": 1, "regions": [region(1000 + i, 1, f"thing {i}", i, i, 5, 5) for i in range(200)]}]
    keys = [p.key for p in run(inputs(tmp_path, regions=regions))]
    assert len(keys) == 200 and len(set(keys)) == 200


def test_registry_builds_the_adapter() -> None:
    adapter = create_adapter("visual_genome")
    assert isinstance(adapter, VisualGenomeAdapter) and adapter.options.decontaminate and adapter.inputs_help
