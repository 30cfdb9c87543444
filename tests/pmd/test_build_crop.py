"""The crop is a typed field of the candidate: Visual Genome's adapter sets it, the image stage crops to it (and
never reads `meta`), the shard keeps PAIR_SCHEMA with the box still recorded in `meta`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pmd import schema
from pmd.archives import ArchiveIndex
from pmd.build import ChunkTask, read_chunk, run_chunk
from pmd.images import ImageOptions, process_image
from pmd.sources.base import Crop, Pair, pairs_table
from pmd.sources.visual_genome import VisualGenomeAdapter
from tests.pmd.sources.test_visual_genome import VG, image_entry, region, write_json

OPTIONS = ImageOptions(image_size=0, min_side=8)  # keep the size: the output is the crop, pixel for pixel


def _gradient(width: int, height: int) -> Image.Image:
    """Every column and row a different colour, so a crop one pixel off gives other pixels."""
    x = np.arange(width, dtype=np.uint16)[None, :].repeat(height, 0)
    y = np.arange(height, dtype=np.uint16)[:, None].repeat(width, 1)
    rgb = np.stack([(x * 7) % 256, (y * 11) % 256, (x * 3 + y * 5) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_visual_genome_regions_are_cropped_exactly(tmp_path: Path) -> None:
    picture = _gradient(120, 90)
    corpus = tmp_path / "images" / "VG_100K_2"
    corpus.mkdir(parents=True)
    (corpus / "1.jpg").write_bytes(_png(picture))  # a PNG by content: the decoder sniffs, the crop stays lossless
    regions = [{"id": 1, "regions": [
        region(10, 1, "the left part", 5, 7, 40, 30),
        region(11, 1, "overshoots the right edge", 100, 60, 30, 40),  # clamped to (100, 60, 20, 30) by the adapter
        region(12, 1, "a float box", 10.5, 20.5, 33.0, 21.0),  # rounded half to even: (10, 20, 33, 21)
        region(13, 1, "the left part again", 5, 7, 40, 30),  # same image and box: processed once, same bytes
    ]}, {"id": 2, "regions": [region(20, 2, "beyond the image", 500, 500, 20, 20)]}]  # image 2: size unknown
    image_data = [image_entry(1, f"{VG}/VG_100K_2/1.jpg", 120, 90),
                  {"image_id": 2, "url": f"{VG}/VG_100K_2/1.jpg", "coco_id": None, "flickr_id": None}]
    inputs = [write_json(tmp_path, "region_descriptions.json", regions),
              write_json(tmp_path, "image_data.json", image_data)]
    pairs = list(VisualGenomeAdapter(VisualGenomeAdapter.Options(decontaminate=False)).iter_converted(inputs))
    assert [p.crop for p in pairs] == [Crop(5, 7, 40, 30), Crop(100, 60, 20, 30), Crop(10, 20, 33, 21),
                                       Crop(5, 7, 40, 30), Crop(500, 500, 20, 20)]
    # meta records the box as it did before the crop was a column (as computed, before rounding).
    assert [json.loads(p.meta)["box"] for p in pairs][1:3] == [
        {"x": 100, "y": 60, "width": 20, "height": 30}, {"x": 10.5, "y": 20.5, "width": 33.0, "height": 21.0}]

    table = pairs_table(pairs, "visual_genome")
    assert table.schema.equals(schema.CANDIDATE_SCHEMA, check_metadata=True)
    task = ChunkTask(source="visual_genome", index=0, candidates=table,
                     path=tmp_path / "work" / "images" / "visual_genome" / "chunk-00000.arrow", image_options=OPTIONS,
                     seed=0, mode="archive", archive_state=ArchiveIndex.build([tmp_path / "images"]).to_state())
    assert run_chunk(task) == {"source": "visual_genome", "index": 0, "rows": 5, "ok": 4,
                               "failures_by_reason": {"bad_box": 1}}
    rows = read_chunk(task.path).to_pylist()
    for row, box in zip(rows[:4], [(5, 7, 40, 30), (100, 60, 20, 30), (10, 20, 33, 21), (5, 7, 40, 30)]):
        x, y, w, h = box
        expected = process_image(_png(picture.crop((x, y, x + w, y + h))), OPTIONS)
        assert (row[schema.WIDTH], row[schema.HEIGHT]) == (w, h) == (row[schema.ORIGINAL_WIDTH],
                                                                    row[schema.ORIGINAL_HEIGHT])
        assert row[schema.IMAGE] == expected.data, box
        assert row[schema.REASON] is None
    off_by_one = process_image(_png(picture.crop((6, 7, 46, 37))), OPTIONS)
    assert rows[0][schema.IMAGE] != off_by_one.data
    assert (rows[4][schema.STAGE], rows[4][schema.REASON]) == ("check", "bad_box")
    assert "empty inside the 120x90 image" in rows[4][schema.DETAIL]
    # The chunk (and so the shard) keeps the pair columns: the crop is spent on the image, meta still has the box.
    assert schema.CROP not in read_chunk(task.path).column_names
    assert json.loads(rows[0][schema.META])["box"] == {"x": 5, "y": 7, "width": 40, "height": 30}


def test_the_image_stage_reads_the_crop_column_not_meta(tmp_path: Path) -> None:
    picture = _gradient(64, 48)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png(picture))
    box_in_meta = json.dumps({"box": {"x": 0, "y": 0, "width": 10, "height": 10}})
    pairs = [Pair("s/whole", "whole", "train", box_in_meta, image_ref="a.png"),
             Pair("s/cropped", "cropped", "train", "{}", image_ref="a.png", crop=Crop(16, 8, 32, 24))]
    task = ChunkTask(source="s", index=0, candidates=pairs_table(pairs, "s"), path=tmp_path / "chunk-00000.arrow",
                     image_options=OPTIONS, seed=0, mode="archive",
                     archive_state=ArchiveIndex.build([tmp_path / "images"]).to_state())
    run_chunk(task)
    rows = read_chunk(task.path).to_pylist()
    assert [(r[schema.WIDTH], r[schema.HEIGHT]) for r in rows] == [(64, 48), (32, 24)]
    assert rows[0][schema.IMAGE] == process_image(_png(picture), OPTIONS).data
    assert rows[1][schema.IMAGE] == process_image(_png(picture.crop((16, 8, 48, 32))), OPTIONS).data


def test_candidates_without_a_crop_column_are_processed_whole(tmp_path: Path) -> None:
    """Pair columns only (what a retry hands over): every image whole, as for a null crop."""
    picture = _gradient(40, 40)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "b.png").write_bytes(_png(picture))
    table = pairs_table([Pair("s/b", "b", "train", "{}", image_ref="b.png")], "s").select(list(schema.PAIR_COLUMNS))
    assert table.schema.names == list(schema.PAIR_COLUMNS)
    task = ChunkTask(source="s", index=0, candidates=table.cast(schema.PAIR_SCHEMA), path=tmp_path / "c.arrow",
                     image_options=OPTIONS, seed=0, mode="archive",
                     archive_state=ArchiveIndex.build([tmp_path / "images"]).to_state())
    run_chunk(task)
    [row] = read_chunk(task.path).to_pylist()
    assert (row[schema.WIDTH], row[schema.HEIGHT]) == (40, 40)
    assert row[schema.IMAGE] == process_image(_png(picture), OPTIONS).data
