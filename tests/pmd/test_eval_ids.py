"""Evaluation photos kept out by Flickr photo id (pmd.eval_ids): ids from Karpathy's and COCO's files (the real COCO
captions rows), ids of candidates from their URLs and metadata, and the screen's exact verdicts."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from pmd.decontaminate import EVAL_OVERLAP, STAGE
from pmd.eval_ids import candidate_photo_ids, flickr_photo_id, load_eval_flickr_ids, screen_candidates
from pmd.sources.base import InputError, Pair, pairs_table
from tests.pmd.sources._karpathy_fixtures import image
from tests.real_fixtures import REAL

FLICKR30K = {"images": [
    {"filename": "1000092795.jpg", "split": "test", "sentences": []},
    {"filename": "10002456.jpg", "split": "train", "sentences": []},
    {"filename": "1001773457.jpg", "split": "test", "sentences": []},
    {"filename": "notanid.jpg", "split": "test", "sentences": []},
], "dataset": "flickr30k"}


@pytest.mark.parametrize("url, photo", [
    ("http://static.flickr.com/2723/4385058960_b0f291553e.jpg", 4385058960),  # SBU
    ("http://farm3.staticflickr.com/2823/10642543105_129f2fbe19.jpg", 10642543105),  # YFCC
    ("http://farm5.staticflickr.com/4125/5094763076_813ea2751b_z.jpg", 5094763076),  # COCO flickr_url
    ("https://live.staticflickr.com/65535/51234567890_abcdef1234_b.jpg", 51234567890),
    ("https://c1.staticflickr.com/1/123/4567_89abcdef_o.png", 4567),
    ("http://farm1.static.flickr.com/40/93045690_81fb4b2a2e.jpg", 93045690),
    ("https://www.flickr.com/photos/someone/8776368733/", 8776368733),
    ("https://i.redd.it/4567_89abcdef.jpg", None),
    ("https://upload.wikimedia.org/wikipedia/commons/0/07/Noctilio_albiventris.jpg", None),
    ("https://staticflickr.com.evil.example/1/2_ab.jpg", None),
    (None, None),
])
def test_flickr_photo_id(url, photo):
    assert flickr_photo_id(url) == photo


def test_ids_from_flickr30k_and_coco_files(tmp_path):
    f30k = tmp_path / "dataset_flickr30k.json"
    f30k.write_text(json.dumps(FLICKR30K))
    captions = tmp_path / "captions_val2014.json"
    shutil.copyfile(REAL / "coco_captions_sample.json", captions)
    ids = load_eval_flickr_ids([f30k, captions])
    assert ids[1000092795] == "flickr30k_test!1000092795.jpg" and 10002456 not in ids
    # Without Karpathy's COCO file, every image of the captions file (all 10 real rows) counts.
    assert len(ids) == 2 + 10
    assert ids[5094763076] == "captions_val2014.json!COCO_val2014_000000318219.jpg"
    # With it, only Karpathy's val and test images.
    coco = {"images": [image(318219, "test", [(1, "a.")]), image(574769, "val", [(2, "b.")]),
                       image(60623, "restval", [(3, "c.")])], "dataset": "coco"}
    karpathy = tmp_path / "my_karpathy_split.json"  # recognised by content, whatever its name
    karpathy.write_text(json.dumps(coco))
    ids = load_eval_flickr_ids([captions, karpathy, f30k])
    assert ids == {1000092795: "flickr30k_test!1000092795.jpg", 1001773457: "flickr30k_test!1001773457.jpg",
                   5094763076: "coco_karpathy_test!COCO_val2014_000000318219.jpg",
                   6728227647: "coco_karpathy_val!COCO_val2014_000000574769.jpg"}
    # PMD's caption_datasets.zip holds both Karpathy files.
    bundle = tmp_path / "caption_datasets.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.writestr("dataset_flickr30k.json", json.dumps(FLICKR30K))
        archive.writestr("dataset_coco.json", json.dumps(coco))
    assert load_eval_flickr_ids([bundle, captions]) == ids


def test_bad_id_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_eval_flickr_ids([tmp_path / "missing.json"])
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(InputError, match="not an evaluation id file"):
        load_eval_flickr_ids([other])
    no_urls = tmp_path / "captions_x.json"
    no_urls.write_text(json.dumps({"info": {}, "images": [{"id": 1, "file_name": "a.jpg"}]}))
    with pytest.raises(InputError, match="no image with a flickr_url"):
        load_eval_flickr_ids([no_urls])
    train_only = tmp_path / "dataset_flickr30k.json"
    train_only.write_text(json.dumps({"images": [FLICKR30K["images"][1]], "dataset": "flickr30k"}))
    with pytest.raises(InputError, match="no evaluation image"):
        load_eval_flickr_ids([train_only])


def test_screen_candidates_exact():
    rows = [
        ("yfcc100m", Pair("yfcc100m/1000092795", "a", "train", "{}",
                          image_url="http://farm3.staticflickr.com/2823/1000092795_129f2fbe19.jpg")),
        ("sbu_captions", Pair("sbu_captions/7", "b", "train", "{}",
                              image_url="http://static.flickr.com/2723/4385058960_b0f291553e.jpg")),
        ("visual_genome", Pair("visual_genome/1", "c", "train", '{"coco_id":null,"flickr_id":5094763076}',
                               image_ref="VG_100K/1.jpg")),
        ("localized_narratives__flickr30k", Pair("localized_narratives__flickr30k/1001773457/2/0", "d", "train",
                                                 "{}", image_ref="flickr30k-images/1001773457.jpg")),
        ("conceptual_captions", Pair("conceptual_captions/x/1", "e", "train", "{}",
                                     image_url="https://example.com/1000092795_129f2fbe19.jpg")),
    ]
    table = pairs_table([p for _, p in rows], "x")
    table = table.set_column(1, "source", [[s for s, _ in rows]])
    assert candidate_photo_ids(table) == [1000092795, 4385058960, 5094763076, 1001773457, None]
    ids = {1000092795: "flickr30k_test!1000092795.jpg", 5094763076: "coco_karpathy_test!x.jpg",
           1001773457: "flickr30k_test!1001773457.jpg"}
    assert screen_candidates(ids, table) == [
        (STAGE, EVAL_OVERLAP, "flickr30k_test!1000092795.jpg (flickr photo 1000092795)"),
        None,
        (STAGE, EVAL_OVERLAP, "coco_karpathy_test!x.jpg (flickr photo 5094763076)"),
        (STAGE, EVAL_OVERLAP, "flickr30k_test!1001773457.jpg (flickr photo 1001773457)"),
        None,
    ]
    assert screen_candidates(None, table) == [None] * 5
