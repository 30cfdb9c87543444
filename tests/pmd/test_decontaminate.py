"""Evaluation images kept out by perceptual hash (pmd.decontaminate): generated images, re-encoded and resized copies
caught, different images not, exact threshold edges, sets read from folders and archives, counts for stats."""

from __future__ import annotations

import dataclasses
import io
import tarfile
import zipfile
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pmd import schema
from pmd.decontaminate import (DEFAULT_THRESHOLD, EVAL_OVERLAP, PIXEL_HASH_TOLERANCE, EvalHashIndex, Match,
                               eval_overlap_counts, eval_set_of, hamming, phash, phash_bytes, screen)
from pmd.images import ImageOptions, ImageRejected, process_image


def picture(seed: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """A photo-like image: smooth random low-frequency structure (what pHash looks at) plus fine noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "flickr30k_test"
    (root / "images").mkdir(parents=True)
    for seed in range(6):
        (root / "images" / f"{1000 + seed}.jpg").write_bytes(encode(picture(seed), "JPEG", quality=90))
    (root / "README.txt").write_text("not an image")
    return root


def test_phash_is_imagehash_phash_as_an_int():
    image = picture(3)
    assert phash(image) == int(str(imagehash.phash(image)), 16)
    assert hamming(0b1011, 0b0110) == 3 == bin(0b1011 ^ 0b0110).count("1")


def test_copies_at_another_size_and_quality_are_caught_and_named(eval_dir):
    index = EvalHashIndex.build([eval_dir])
    assert len(index) == 6 and index.set_names == ["flickr30k_test"] and index.threshold == DEFAULT_THRESHOLD
    original = picture(2)
    smaller = original.resize((200, 150), Image.Resampling.LANCZOS)
    match = index.check_bytes(encode(smaller, "JPEG", quality=60))
    assert match == Match("flickr30k_test", "images/1002.jpg", match.distance) and match.distance <= 4
    # What the build stores (pmd's resize to 256 px + JPEG 95) is caught too.
    stored = process_image(encode(original), ImageOptions())
    assert index.check_bytes(stored.data).image == "images/1002.jpg"
    # Different pictures are not.
    for seed in range(100, 130):
        assert index.check(picture(seed)) is None


def test_threshold_edges_are_exact(eval_dir):
    index = EvalHashIndex.build([eval_dir], threshold=5)
    base = int(index.hashes[0])
    at = base ^ 0b11111  # 5 bits flipped
    beyond = base ^ 0b111111  # 6 bits flipped
    assert index.check_hash(at) == Match("flickr30k_test", index.names[0], 5)
    # Against an independent nearest-neighbour search over Python ints.
    for probe in (at, beyond, base ^ (1 << 63), base ^ ((1 << 64) - 1)):
        d, name = min((bin(int(h) ^ probe).count("1"), n) for h, n in zip(index.hashes, index.names))
        got = index.check_hash(probe)
        assert (got.distance, got.image) == (d, name) if d <= 5 else got is None
    assert all(bin(int(h) ^ beyond).count("1") > 5 for h in index.hashes) == (index.check_hash(beyond) is None)
    assert EvalHashIndex.build([eval_dir], threshold=0).check_hash(base).distance == 0
    with pytest.raises(ValueError, match="threshold"):
        EvalHashIndex(index.hashes, index.names, index.set_ids, index.set_names, threshold=64)


def test_sets_from_zip_and_tar_and_unreadable_members(tmp_path, eval_dir, caplog):
    zpath = tmp_path / "coco_test.zip"
    with zipfile.ZipFile(zpath, "w") as archive:
        archive.writestr("val2014/COCO_val2014_1.jpg", encode(picture(10), "JPEG"))
        archive.writestr("val2014/broken.jpg", b"\xff\xd8 not really a jpeg")
    tpath = tmp_path / "extra.tar.gz"
    with tarfile.open(tpath, "w:gz") as archive:
        data = encode(picture(11))
        info = tarfile.TarInfo("x/eleven.png")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    index = EvalHashIndex.build([eval_dir, zpath, tpath])
    assert index.set_names == ["flickr30k_test", "coco_test.zip", "extra.tar.gz"] and len(index) == 8
    assert "broken.jpg" in caplog.text
    assert index.check(picture(10).resize((300, 225))) .detail.startswith("coco_test.zip!val2014/COCO_val2014_1.jpg")
    assert index.check(picture(11)).eval_set == "extra.tar.gz"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        EvalHashIndex.build([empty])
    with pytest.raises(ValueError, match="named"):
        EvalHashIndex.build([eval_dir, eval_dir])


def test_screen_hook(eval_dir):
    index = EvalHashIndex.build([eval_dir])
    copy = process_image(encode(picture(4)), ImageOptions())
    other = process_image(encode(picture(200)), ImageOptions())
    rejected = screen(copy, index, ImageRejected)
    assert isinstance(rejected, ImageRejected) and rejected.reason == EVAL_OVERLAP
    assert eval_set_of(rejected.detail) == "flickr30k_test" and "images/1004.jpg" in rejected.detail
    assert screen(other, index, ImageRejected) is other
    assert screen(copy, None, ImageRejected) is copy
    failed = ImageRejected("too_small")
    assert screen(failed, index, ImageRejected) is failed


def test_phash_from_the_pixels_is_the_stored_images_hash_within_the_tolerance():
    """The image stage hashes the pixels it holds instead of decoding its own JPEG again: on photo-like images at
    the build's common sizes (draft-decoded or not), rotated by EXIF and cropped, the hash is the stored image's."""
    exif = Image.Exif()
    exif[0x0112] = 6
    distances = []
    for seed in range(8):
        for size in ((480, 360), (640, 480), (1024, 768), (2048, 1536)):
            raw = encode(picture(seed, size), "JPEG", quality=90, **({"exif": exif.tobytes()} if seed % 3 == 0 else {}))
            box = (10, 20, size[0] // 2, size[1] // 2) if seed % 4 == 1 else None
            result = process_image(raw, ImageOptions(), box, with_phash=True)
            distances.append(hamming(result.phash, phash_bytes(result.data)))
            assert process_image(raw, ImageOptions(), box).phash is None  # only computed when asked for
    assert max(distances) <= PIXEL_HASH_TOLERANCE, distances
    assert distances.count(0) >= len(distances) // 2


def test_screen_uses_the_pixel_hash_when_given(eval_dir):
    index = EvalHashIndex.build([eval_dir])
    copy = process_image(encode(picture(4)), ImageOptions(), with_phash=True)
    assert hamming(copy.phash, phash_bytes(copy.data)) <= PIXEL_HASH_TOLERANCE
    rejected = screen(copy, index, ImageRejected)
    assert isinstance(rejected, ImageRejected) and "images/1004.jpg" in rejected.detail
    # The hash it carries is what is compared, not its bytes decoded again: a far hash on the same bytes passes.
    far = dataclasses.replace(copy, phash=copy.phash ^ ((1 << 64) - 1))
    assert screen(far, index, ImageRejected) is far


def test_check_cost_is_flat_in_the_number_of_hashes():
    """One vectorised XOR + popcount: 100,000 evaluation hashes answer exactly like a loop over Python ints."""
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 100_000, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    index = EvalHashIndex(hashes, [str(i) for i in range(len(hashes))], np.zeros(len(hashes), np.int32), ["big"])
    probe = int(hashes[77_777]) ^ 0b1011  # 3 bits from one of them
    assert index.check_hash(probe) == Match("big", "77777", 3)
    assert min(bin(int(h) ^ probe).count("1") for h in hashes[:1000]) == int(index.distances(probe)[:1000].min())


def test_eval_overlap_counts(tmp_path):
    table = pa.table({
        schema.SOURCE: ["sbu_captions", "sbu_captions", "yfcc100m", "yfcc100m", "coco"],
        schema.REASON: [EVAL_OVERLAP, EVAL_OVERLAP, EVAL_OVERLAP, "download_error", EVAL_OVERLAP],
        schema.DETAIL: ["flickr30k_test!1.jpg (flickr photo 1)", "coco_karpathy_test!a.jpg (hamming 3)",
                        "flickr30k_test!2.jpg (hamming 0)", "timeout", None],
    })
    expected = {"coco": {"unknown": 1}, "sbu_captions": {"coco_karpathy_test": 1, "flickr30k_test": 1},
                "yfcc100m": {"flickr30k_test": 1}}
    assert eval_overlap_counts(table) == expected
    import pyarrow.parquet as pq

    path = tmp_path / "failures.parquet"
    pq.write_table(table, path)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"nope")
    assert eval_overlap_counts([path, bad]) == expected


def test_phash_bytes_decodes_any_format():
    image = picture(7)
    assert phash_bytes(encode(image, "PNG")) == phash(image)


def test_pmd_stats_reports_overlaps_per_source_and_set(tmp_path, capsys):
    from pmd import stats
    from pmd_cli.pmd import main
    from tests.pmd.build_fixture import shard_row, write_build

    overlap = [{"key": f"sbu_captions/{i}", "source": "sbu_captions", "image_url": f"http://x/{i}.jpg",
                "image_ref": None, "stage": "decontaminate", "reason": EVAL_OVERLAP, "detail": detail}
               for i, detail in enumerate(["flickr30k_test!1.jpg (flickr photo 1)",
                                           "flickr30k_test!2.jpg (hamming 4)",
                                           "coco_karpathy_test!COCO_val2014_000000000042.jpg (hamming 0)"])]
    root = write_build(tmp_path / "b", [[shard_row("sbu_captions/9", "sbu_captions", "a dog", b"D" * 10)]], overlap,
                       {"sbu_captions": {"input_rows": 4, "pairs": 1, "rejects": 0, "failures": 3,
                                         "rejects_by_reason": {}}})
    result = stats.audit(root)
    assert result["trusted"], result["problems"]
    assert result["eval_overlap"] == {"sbu_captions": {"coco_karpathy_test": 1, "flickr30k_test": 2}}
    assert result["sources"]["sbu_captions"]["failures_by_stage"] == {"decontaminate": 3}
    assert result["sources"]["sbu_captions"]["success"]["attempted"] == 1  # removed on purpose, not image failures
    assert main(["stats", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "evaluation images kept out of sbu_captions: coco_karpathy_test 1, flickr30k_test 2" in printed
