"""COCO (Karpathy splits) adapter and the shared Karpathy helpers."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest

from tests.pmd.sources._karpathy_fixtures import (
    REAL_COCOID,
    document,
    image,
    real_document,
    write_karpathy,
    write_truncated_karpathy,
)
from pmd.sources import create_adapter
from pmd.sources.base import InputError, Pair, Reason, Record, Reject, meta_json
from pmd.sources.coco import CocoAdapter
from pmd.sources.karpathy import eval_cocoids, is_karpathy_input, karpathy_dataset, partition_inputs

REAL_TOKENS = {
    770337: ["a", "man", "with", "a", "red", "helmet", "on", "a", "small", "moped", "on", "a", "dirt", "road"],
    771687: ["man", "riding", "a", "motor", "bike", "on", "a", "dirt", "road", "on", "the", "countryside"],
    772707: ["a", "man", "riding", "on", "the", "back", "of", "a", "motorcycle"],
    776154: ["a", "dirt", "path", "with", "a", "young", "person", "on", "a", "motor", "bike", "rests", "to", "the",
             "foreground", "of", "a", "verdant", "area", "with", "a", "bridge", "and", "a", "background", "of", "cloud",
             "wreathed", "mountains"],
    781998: ["a", "man", "in", "a", "red", "shirt", "and", "a", "red", "hat", "is", "on", "a", "motorcycle", "on", "a",
             "hill", "side"],
}
REAL_TEXTS = {
    770337: "A man with a red helmet on a small moped on a dirt road.",  # upstream has a trailing space
    771687: "Man riding a motor bike on a dirt road on the countryside.",
    772707: "A man riding on the back of a motorcycle.",
    776154: "A dirt path with a young person on a motor bike rests to the foreground of a verdant area with a bridge "
            "and a background of cloud-wreathed mountains.",  # trailing space upstream too
    781998: "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
}


def real_pairs() -> list[Pair]:
    return [
        Pair(
            key=f"coco/{sentid}",
            text=text,
            split="test",
            meta=meta_json({"cocoid": REAL_COCOID, "imgid": 0, "sentid": sentid,
                            "filename": "COCO_val2014_000000391895.jpg", "filepath": "val2014",
                            "karpathy_split": "test", "tokens": REAL_TOKENS[sentid]}),
            image_ref="val2014/COCO_val2014_000000391895.jpg",
        )
        for sentid, text in REAL_TEXTS.items()
    ]


def crafted_pairs(item: dict, split: str) -> list[Pair]:
    return [
        Pair(
            key=f"coco/{s['sentid']}",
            text=s["raw"].strip(),
            split=split,
            meta=meta_json({"cocoid": item["cocoid"], "imgid": item["imgid"], "sentid": s["sentid"],
                            "filename": item["filename"], "filepath": item["filepath"],
                            "karpathy_split": item["split"], "tokens": s["tokens"]}),
            image_ref=f"{item['filepath']}/{item['filename']}",
        )
        for s in item["sentences"]
    ]


def run(inputs: list[Path]) -> list[Pair | Reject]:
    return list(CocoAdapter().iter_converted(inputs))


@pytest.mark.parametrize("variant", ["plain", "gz", "zip"])
def test_real_record_gives_its_five_exact_pairs(tmp_path: Path, variant: str) -> None:
    path = write_karpathy(tmp_path, real_document(), variant)
    assert run([path]) == real_pairs()


def test_real_record_texts_have_no_trailing_space() -> None:
    raws = [s["raw"] for s in real_document()["images"][0]["sentences"]]
    assert sum(raw.endswith(" ") for raw in raws) == 2  # the fixture keeps upstream's trailing spaces
    assert all(not pair.text.endswith(" ") for pair in real_pairs())


def test_karpathy_splits_map_to_pmd_splits(tmp_path: Path) -> None:
    train = image(9, "train", [(101, "A cat on a mat."), (102, "  A cat\n sleeping.  ")], imgid=1)
    restval = image(25, "restval", [(201, "Two dogs.")], imgid=2, filepath="val2014")
    val = image(30, "val", [(301, "A red bus.")], imgid=3)
    path = write_karpathy(tmp_path, document(train, restval, val))
    expected = (real_pairs() + crafted_pairs(train, "train") + crafted_pairs(restval, "train")
                + crafted_pairs(val, "validation"))
    expected[6] = Pair(**{**_fields(expected[6]), "text": "A cat sleeping."})  # whitespace collapsed
    assert run([path]) == expected
    assert expected[5].image_ref == "train2014/COCO_train2014_000000000009.jpg"
    assert expected[7].image_ref == "val2014/COCO_val2014_000000000025.jpg"


def _fields(pair: Pair) -> dict:
    return {name: getattr(pair, name) for name in Pair.__slots__}


def test_empty_caption_is_rejected_with_its_key(tmp_path: Path) -> None:
    item = image(9, "train", [(101, "A cat."), (102, ""), (103, " \n\t ")])
    path = write_karpathy(tmp_path, document(item, with_real=False))
    out = run([path])
    assert out[0] == crafted_pairs(item, "train")[0]
    assert [(r.reason, r.key, r.input_file, r.position) for r in out[1:]] == [
        (Reason.EMPTY_TEXT, "coco/102", str(path), 0),
        (Reason.EMPTY_TEXT, "coco/103", str(path), 0),
    ]
    assert '"sentid": 102' in out[1].record  # the reject carries the sentence, not the whole image


@pytest.mark.parametrize(
    ("item", "detail"),
    [
        ("not an object", "image record is a str"),
        ({"filepath": "val2014", "filename": "x.jpg", "imgid": 1, "split": "train", "sentences": []},
         "'cocoid'"),
        ({"filepath": "val2014", "filename": "x.jpg", "imgid": 1, "split": "train", "cocoid": "7", "sentences": []},
         "'cocoid'"),
        ({"filepath": "val2014", "filename": "x.jpg", "imgid": 1, "split": "dev", "cocoid": 7, "sentences": []},
         "unknown Karpathy split 'dev'"),
        ({"filepath": "val2014", "filename": "x.jpg", "imgid": 1, "split": "test", "cocoid": 7}, "'sentences'"),
        ({"filename": "x.jpg", "imgid": 1, "split": "test", "cocoid": 7, "sentences": []}, "'filepath'"),
    ],
)
def test_malformed_image_record_is_one_reject(item: object, detail: str) -> None:
    record = Record("dataset_coco.json", 4, item)
    out = list(CocoAdapter().convert(record, None))
    assert len(out) == 1 and isinstance(out[0], Reject)
    assert out[0].reason == Reason.MALFORMED and detail in out[0].detail
    assert (out[0].input_file, out[0].position, out[0].key) == ("dataset_coco.json", 4, None)


def test_malformed_sentences_are_rejected_and_the_rest_kept(tmp_path: Path) -> None:
    item = image(9, "test", [(101, "A cat.")])
    item["sentences"] += [
        {"tokens": [], "raw": "No id.", "imgid": 1},
        "a string",
        {"tokens": [], "raw": None, "imgid": 1, "sentid": 104},
        {"tokens": [], "raw": "Ok.", "imgid": 1, "sentid": True},
    ]
    path = write_karpathy(tmp_path, document(item, with_real=False))
    out = run([path])
    assert out[0] == crafted_pairs({**item, "sentences": item["sentences"][:1]}, "test")[0]
    assert [(r.reason, r.key) for r in out[1:]] == [
        (Reason.MALFORMED, None), (Reason.MALFORMED, None), (Reason.MALFORMED, "coco/104"), (Reason.MALFORMED, None),
    ]
    assert "sentence 1" in out[1].detail and "sentence 3" in out[3].detail and "'raw'" in out[3].detail


def test_keys_unique_and_convert_is_picklable(tmp_path: Path) -> None:
    items = [image(i, "train", [(1000 + 10 * i + j, f"Caption {j}.") for j in range(5)], imgid=i) for i in range(20)]
    path = write_karpathy(tmp_path, document(*items))
    adapter = CocoAdapter()
    records = list(adapter.records([path]))
    clone = pickle.loads(pickle.dumps(adapter))
    out = [x for r in records for x in clone.convert(pickle.loads(pickle.dumps(r)), None)]
    assert len(out) == 105 and all(isinstance(x, Pair) for x in out)
    assert len({x.key for x in out}) == 105


def test_missing_karpathy_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"dataset_coco\.json.*caption_datasets\.zip"):
        run([])


def test_unknown_and_duplicate_inputs(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path, real_document())
    other = tmp_path / "captions_train2014.json"
    other.write_text("{}")
    with pytest.raises(InputError, match="captions_train2014.json: not an input of coco"):
        run([path, other])
    with pytest.raises(InputError, match="given twice"):
        run([path, write_karpathy(tmp_path / "b", real_document(), "zip")])
    with pytest.raises(InputError, match="no such file"):
        run([tmp_path / "nowhere" / "dataset_coco.json"])


def test_truncated_json_is_an_input_error_naming_the_file(tmp_path: Path) -> None:
    items = [image(i, "train", [(1000 + i, f"Caption {i}.")], imgid=i) for i in range(30)]
    path = write_truncated_karpathy(tmp_path, document(*items))
    with pytest.raises(InputError) as info:
        run([path])
    assert str(path) in str(info.value)


def test_truncated_zip_is_an_input_error_naming_the_file(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path, document(*[image(i, "val", [(i, "x.")]) for i in range(50)]), "zip")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        run([path])
    assert str(path) in str(info.value)


def test_zip_without_coco_member_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "caption_datasets.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("dataset_flickr30k.json", '{"images": []}')
    with pytest.raises(InputError, match="caption_datasets.zip: zip archive has no member matching"):
        run([path])


@pytest.mark.parametrize("variant", ["plain", "gz", "zip"])
def test_eval_cocoids_are_karpathy_val_and_test(tmp_path: Path, variant: str) -> None:
    doc = document(
        image(1, "train", [(1, "a.")]), image(2, "restval", [(2, "b.")]), image(3, "val", [(3, "c.")]),
        image(4, "test", [(4, "d.")]), {"split": "test", "cocoid": None}, "junk",
    )
    path = write_karpathy(tmp_path, doc, variant)
    assert eval_cocoids(path) == frozenset({REAL_COCOID, 3, 4})


def test_karpathy_input_recognised_by_name() -> None:
    assert is_karpathy_input(Path("a/dataset_coco.json"))
    assert is_karpathy_input(Path("dataset_coco.json.gz"))
    assert is_karpathy_input(Path("caption_datasets.zip"))
    assert not is_karpathy_input(Path("dataset_flickr30k.json"))
    assert partition_inputs([Path("x.jsonl"), Path("caption_datasets.zip")]) == (
        Path("caption_datasets.zip"), [Path("x.jsonl")])


@pytest.mark.parametrize("variant", ["plain", "gz"])
def test_karpathy_file_of_another_name_recognised_by_content(tmp_path: Path, variant: str) -> None:
    """Karpathy's file saved as `karpathy_coco.json`: its content (`"dataset": "coco"` after the images) makes it the
    Karpathy input, for COCO as for LN-COCO and Visual Genome (shared `partition_inputs`)."""
    original = write_karpathy(tmp_path / "a", real_document(), variant)
    renamed = original.with_name(original.name.replace("dataset_coco", "karpathy_coco"))
    original.rename(renamed)
    assert karpathy_dataset(renamed) == "coco" and is_karpathy_input(renamed)
    assert run([renamed]) == real_pairs()
    # Same layout, another dataset (Flickr30k's split file), or another JSON: not the COCO split file.
    flickr = tmp_path / "splits_f30k.json"
    flickr.write_text(json.dumps({"images": [{"split": "test", "filename": "1000092795.jpg"}],
                                  "dataset": "flickr30k"}, indent=1))
    other = tmp_path / "captions_val2014.json"
    other.write_text(json.dumps({"info": {}, "images": [], "annotations": [], "dataset": "coco"}))
    assert karpathy_dataset(flickr) == "flickr30k" and not is_karpathy_input(flickr)
    assert karpathy_dataset(other) is None and karpathy_dataset(tmp_path / "missing.json") is None
    with pytest.raises(InputError, match="splits_f30k.json: not an input of coco"):
        run([renamed, flickr])
    with pytest.raises(InputError, match="given twice"):
        run([renamed, write_karpathy(tmp_path / "b", real_document())])


def test_registry_builds_the_adapter() -> None:
    adapter = create_adapter("coco")
    assert isinstance(adapter, CocoAdapter) and adapter.name == "coco" and adapter.inputs_help
    with pytest.raises(ValueError, match="takes no options"):
        create_adapter("coco", {"decontaminate": "false"})
