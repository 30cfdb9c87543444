"""pmd.eval_sets: Karpathy's split files (plain or inside caption_datasets.zip) and their images, read with the
build's JSON and archive readers."""

import json

import pytest

from pmd.eval_sets import EvalSetError, iter_karpathy_split, karpathy_images
from tests.archive_files import write_zip


def _record(i, split, captions=("a cat",), filepath="val2014"):
    rec = {"filename": f"img{i}.jpg", "imgid": i, "split": split,
           "sentences": [{"raw": c, "tokens": c.split(), "imgid": i, "sentid": i * 10 + j}
                         for j, c in enumerate(captions)]}
    if filepath:
        rec["filepath"] = filepath
    return rec


def test_split_records_captions_and_skips(tmp_path):
    records = [_record(0, "test", ("a", "b")), _record(1, "train"), _record(2, "test", ()), _record(3, "val"),
               _record(4, "test", ("c",))]
    js = tmp_path / "dataset_coco.json"
    js.write_text(json.dumps({"images": records, "dataset": "coco"}))
    got = karpathy_images(js)
    assert [(e.ref, e.captions) for e in got] == [("val2014/img0.jpg", ("a", "b")), ("val2014/img4.jpg", ("c",))]
    assert [e.ref for e in karpathy_images(js, "val")] == ["val2014/img3.jpg"]
    with pytest.raises(EvalSetError, match="not 'flickr30k'"):
        karpathy_images(js, dataset="flickr30k")
    with pytest.raises(EvalSetError, match="unknown Karpathy split"):
        karpathy_images(js, "dev")
    # images: one in the zip, one missing
    images = write_zip(tmp_path / "val2014.zip", {"val2014/img0.jpg": b"zero"})
    out = [(e.ref, data, error) for e, data, error in iter_karpathy_split(js, [images])]
    assert out[0] == ("val2014/img0.jpg", b"zero", None)
    assert out[1][0] == "val2014/img4.jpg" and out[1][1] is None and out[1][2].startswith("missing_member")


def test_zip_member_and_bare_flickr_names(tmp_path):
    flickr = {"images": [_record(i, "test", ("x",), filepath=None) for i in range(3)], "dataset": "flickr30k"}
    coco = {"images": [_record(9, "test")], "dataset": "coco"}
    zipped = write_zip(tmp_path / "caption_datasets.zip", {"dataset_flickr30k.json": json.dumps(flickr).encode(),
                                                           "dataset_coco.json": json.dumps(coco).encode()})
    with pytest.raises(EvalSetError, match="say which dataset"):
        karpathy_images(zipped)
    assert [e.ref for e in karpathy_images(zipped, dataset="coco")] == ["val2014/img9.jpg"]
    folder = tmp_path / "flickr30k-images"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.jpg").write_bytes(bytes([i]))
    got = list(iter_karpathy_split(zipped, [folder], dataset="flickr30k"))
    assert [(e.ref, data, error) for e, data, error in got] == [(f"img{i}.jpg", bytes([i]), None) for i in range(3)]
