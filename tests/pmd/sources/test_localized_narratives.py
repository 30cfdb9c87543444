"""Localized Narratives adapters: upstream `{dataset}_{split}_captions.jsonl` -> one pair per narrative sentence."""

from __future__ import annotations

import bz2
import gzip
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.pmd.sources._karpathy_fixtures import REAL_COCOID, document, image, write_karpathy
from pmd.sources import create_adapter
from pmd.sources.base import InputError, Pair, Reason, Record, Reject, meta_json
from pmd.sources.karpathy import DecontaminationOptions
from pmd.sources.localized_narratives import (
    LocalizedNarrativesAde20k,
    LocalizedNarrativesCoco,
    LocalizedNarrativesFlickr30k,
    LocalizedNarrativesOpenImages,
    split_sentences,
)


def narrative(dataset_id: str, image_id: str, annotator_id: int, caption: str) -> dict[str, Any]:
    """One line of an upstream `*_captions.jsonl` file: exactly these four fields, in this order."""
    return {"dataset_id": dataset_id, "image_id": image_id, "annotator_id": annotator_id, "caption": caption}


def full_narrative(dataset_id: str, image_id: str, annotator_id: int, caption: str) -> dict[str, Any]:
    """A line of the `*_localized_narratives.jsonl` files (abridged): the caption fields plus timing, mouse traces
    and the recording, which the adapter must not copy into every sentence's meta."""
    return narrative(dataset_id, image_id, annotator_id, caption) | {
        "timed_caption": [{"utterance": "In this", "start_time": 0.0, "end_time": 0.4},
                          {"utterance": "image", "start_time": 0.4, "end_time": 0.9}],
        "traces": [[{"x": 0.2086, "y": -0.0533, "t": 0.022}, {"x": 0.2111, "y": -0.0439, "t": 0.056}]],
        "voice_recording": f"{dataset_id}/{image_id}_{annotator_id}.ogg",
    }


def jsonl(items: list[Any]) -> bytes:
    return b"".join((item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n" for item in items)


def write(directory: Path, name: str, items: list[Any], variant: str = "plain") -> Path:
    """An upstream caption file as published (`plain`), or gzipped / bzipped / zipped."""
    directory.mkdir(parents=True, exist_ok=True)
    data = jsonl(items)
    if variant == "plain":
        path = directory / name
        path.write_bytes(data)
    elif variant == "gz":
        path = directory / f"{name}.gz"
        path.write_bytes(gzip.compress(data))
    elif variant == "bz2":
        path = directory / f"{name}.bz2"
        path.write_bytes(bz2.compress(data))
    elif variant == "zip":
        path = directory / f"{name}.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(name, data)
            archive.writestr("README.txt", "not a caption file")
    else:  # pragma: no cover
        raise ValueError(variant)
    return path


def expected(source: str, item: dict[str, Any], sentences: list[str], split: str, image_url: str | None = None,
             image_ref: str | None = None) -> list[Pair]:
    base = {"dataset_id": item["dataset_id"], "image_id": item["image_id"], "annotator_id": item["annotator_id"],
            "original_caption": item["caption"]}
    return [
        Pair(key=f"{source}/{item['image_id']}/{item['annotator_id']}/{i}", text=text, split=split,
             meta=meta_json({**base, "sentence_index": i}), image_url=image_url, image_ref=image_ref)
        for i, text in enumerate(sentences)
    ]


# -- the sentence rule --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("caption", "sentences"),
    [
        ("In this image I can see a dog. It is brown.", ["In this image I can see a dog.", "It is brown."]),
        ("  a man  .. .  and\n a woman.  ", ["a man.", "and a woman."]),
        ("no full stop at the end", ["no full stop at the end."]),
        ("it costs 2.5 dollars.", ["it costs 2.", "5 dollars."]),  # PMD's rule, decimals included
        ("", []),
        (" . .. ", []),
    ],
)
def test_split_sentences_follows_pmd(caption: str, sentences: list[str]) -> None:
    assert split_sentences(caption) == sentences


# -- one adapter per dataset --------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["plain", "gz", "bz2", "zip"])
def test_open_images_pairs_urls_and_splits(tmp_path: Path, variant: str) -> None:
    a = narrative("open_images", "0000b9fcba019d36", 0, "In this picture we can see a cat. Behind it, a wall.")
    b = narrative("open_images", "0001eeaf4aed83f9", 6, "A plane in the sky.")
    c = narrative("open_images", "000a1249af2bc5f0", 3, "Two people.")
    train = write(tmp_path, "open_images_train_v6_captions.jsonl", [a, b], variant)
    val = write(tmp_path, "open_images_validation_captions.jsonl", [c], variant)
    test = write(tmp_path, "open_images_test_captions.jsonl", [c | {"image_id": "000b"}], variant)
    out = list(LocalizedNarrativesOpenImages().iter_converted([train, val, test]))
    s3 = "https://s3.amazonaws.com/open-images-dataset"
    source = "localized_narratives__openimages"
    assert out == (
        expected(source, a, ["In this picture we can see a cat.", "Behind it, a wall."], "train",
                 image_url=f"{s3}/train/0000b9fcba019d36.jpg")
        + expected(source, b, ["A plane in the sky."], "train", image_url=f"{s3}/train/0001eeaf4aed83f9.jpg")
        + expected(source, c, ["Two people."], "validation", image_url=f"{s3}/validation/000a1249af2bc5f0.jpg")
        + expected(source, c | {"image_id": "000b"}, ["Two people."], "test", image_url=f"{s3}/test/000b.jpg")
    )
    assert set(json.loads(out[0].meta)) == {"dataset_id", "image_id", "annotator_id", "original_caption",
                                            "sentence_index"}
    full = full_narrative("open_images", "0000b9fcba019d36", 0, "In this picture we can see a cat. Behind it, a wall.")
    path = write(tmp_path / "full", "open_images_train_v6_captions.jsonl", [full])
    assert list(LocalizedNarrativesOpenImages().iter_converted([path])) == out[:2]


def test_flickr30k_pairs(tmp_path: Path) -> None:
    a = narrative("flickr30k", "1000092795", 1, "Here we see people. They stand.")
    b = narrative("flickr30k", "1001773457", 2, "Dogs.")
    paths = [write(tmp_path, "flickr30k_train_captions.jsonl", [a]), write(tmp_path, "flickr30k_val_captions.jsonl",
                                                                            [b]),
             write(tmp_path, "flickr30k_test_captions.jsonl", [b | {"image_id": "1002"}])]
    source = "localized_narratives__flickr30k"
    assert list(LocalizedNarrativesFlickr30k().iter_converted(paths)) == (
        expected(source, a, ["Here we see people.", "They stand."], "train",
                 image_ref="flickr30k-images/1000092795.jpg")
        + expected(source, b, ["Dogs."], "validation", image_ref="flickr30k-images/1001773457.jpg")
        + expected(source, b | {"image_id": "1002"}, ["Dogs."], "test", image_ref="flickr30k-images/1002.jpg")
    )


def test_ade20k_pairs(tmp_path: Path) -> None:
    a = narrative("ADE20k", "ADE_train_00000001", 5, "A room. A bed.")
    b = narrative("ADE20k", "ADE_val_00000001", 7, "A street")
    paths = [write(tmp_path, "ade20k_train_captions.jsonl", [a], "gz"),
             write(tmp_path, "ade20k_validation_captions.jsonl", [b])]
    source = "localized_narratives__ADE20k"
    assert list(LocalizedNarrativesAde20k().iter_converted(paths)) == (
        expected(source, a, ["A room.", "A bed."], "train",
                 image_ref="ADEChallengeData2016/images/training/ADE_train_00000001.jpg")
        + expected(source, b, ["A street."], "validation",
                   image_ref="ADEChallengeData2016/images/validation/ADE_val_00000001.jpg")
    )


@pytest.mark.parametrize("karpathy_variant", ["plain", "gz", "zip"])
def test_coco_pairs_and_decontamination(tmp_path: Path, karpathy_variant: str) -> None:
    # Karpathy: the real record (cocoid 391895, split test) plus a val, a train and a restval image.
    karpathy = write_karpathy(tmp_path / "k", document(
        image(30, "val", [(1, "x.")]), image(9, "train", [(2, "y.")]), image(25, "restval", [(3, "z.")])),
        karpathy_variant)
    kept_train = narrative("mscoco_train2017", "9", 93, "A bowl of broccoli. A fork.")
    kept_restval = narrative("mscoco_val2017", "25", 12, "Two dogs.")
    test_image = narrative("mscoco_val2017", str(REAL_COCOID), 93, "A man on a moped. A dirt road.")
    test_image_2 = narrative("mscoco_val2017", str(REAL_COCOID), 104, "A motorbike.")
    val_image = narrative("mscoco_train2017", "30", 7, "A red bus.")
    train = write(tmp_path, "coco_train_captions.jsonl", [kept_train, val_image])
    val = write(tmp_path, "coco_val_captions.jsonl", [test_image, kept_restval, test_image_2], "gz")
    out = list(LocalizedNarrativesCoco().iter_converted([karpathy, train, val]))
    source = "localized_narratives__coco"
    pairs = [x for x in out if isinstance(x, Pair)]
    assert pairs == (
        expected(source, kept_train, ["A bowl of broccoli.", "A fork."], "train",
                 image_ref="train2017/000000000009.jpg")
        + expected(source, kept_restval, ["Two dogs."], "validation", image_ref="val2017/000000000025.jpg")
    )
    rejects = [(r.reason, r.key, Path(r.input_file).name, r.position) for r in out if isinstance(r, Reject)]
    assert rejects == [
        (Reason.DECONTAMINATED, f"{source}/30/7", "coco_train_captions.jsonl", 2),
        (Reason.DECONTAMINATED, f"{source}/{REAL_COCOID}/93", "coco_val_captions.jsonl.gz", 1),
        (Reason.DECONTAMINATED, f"{source}/{REAL_COCOID}/104", "coco_val_captions.jsonl.gz", 3),
    ]


def test_coco_without_karpathy_is_an_input_error(tmp_path: Path) -> None:
    train = write(tmp_path, "coco_train_captions.jsonl", [narrative("mscoco_train2017", "9", 1, "A.")])
    with pytest.raises(InputError, match=r"dataset_coco\.json.*caption_datasets\.zip.*decontaminate=false"):
        list(LocalizedNarrativesCoco().iter_converted([train]))


def test_coco_decontamination_opt_out(tmp_path: Path) -> None:
    item = narrative("mscoco_val2017", str(REAL_COCOID), 93, "A man on a moped.")
    val = write(tmp_path, "coco_val_captions.jsonl", [item])
    adapter = create_adapter("localized_narratives__coco", {"decontaminate": "false"})
    assert adapter.options == DecontaminationOptions(decontaminate=False)
    assert list(adapter.iter_converted([val])) == expected(
        "localized_narratives__coco", item, ["A man on a moped."], "validation", image_ref="val2017/000000391895.jpg")
    # The Karpathy file is accepted (and ignored) when decontamination is off.
    karpathy = write_karpathy(tmp_path / "k", document())
    assert len(list(adapter.iter_converted([karpathy, val]))) == 1


def test_coco_convert_refuses_to_run_without_the_decontamination_set() -> None:
    line = json.dumps(narrative("mscoco_val2017", "9", 1, "A.")).encode()
    with pytest.raises(TypeError, match="Karpathy val/test ids"):
        list(LocalizedNarrativesCoco().convert(Record("coco_val_captions.jsonl", 1, line), None))


def test_coco_convert_needs_the_context_and_nothing_else(tmp_path: Path) -> None:
    karpathy = write_karpathy(tmp_path, document())
    items = [narrative("mscoco_val2017", str(i), 1, "A. B.") for i in (REAL_COCOID, 5)]
    paths = [karpathy, write(tmp_path, "coco_val_captions.jsonl", items)]
    context = pickle.loads(pickle.dumps(LocalizedNarrativesCoco().prepare(paths)))
    assert context == frozenset({REAL_COCOID})
    records = list(LocalizedNarrativesCoco().records(paths))
    # A fresh instance that never saw the inputs: the rows come from (record, context) alone.
    out = [x for r in records for x in LocalizedNarrativesCoco().convert(r, context)]
    assert [type(x).__name__ for x in out] == ["Reject", "Pair", "Pair"]
    assert out == list(LocalizedNarrativesCoco().iter_converted(paths))


# -- bad rows -----------------------------------------------------------------------------------------------------

def test_bad_rows_are_rejected_with_reasons(tmp_path: Path) -> None:
    good = narrative("flickr30k", "1", 1, "Good.")
    lines: list[Any] = [
        b'{"dataset_id": "flickr30k", "image_id": "2", "annotator_id": 1, "caption": "cut',  # bad JSON
        b'{"dataset_id": "flickr30k", "image_id": "3", "annotator_id": 1, "caption": "caf\xe9."}',  # latin-1
        narrative("flickr30k", "4", 1, ""),
        narrative("flickr30k", "5", 1, " .  . "),
        b"",
        b"[1, 2]",
        {"dataset_id": "flickr30k", "annotator_id": 1, "caption": "No image id."},
        {"dataset_id": "flickr30k", "image_id": "6", "annotator_id": 1},
        {"dataset_id": "flickr30k", "image_id": "../7", "annotator_id": 1, "caption": "Path."},
        {"dataset_id": "flickr30k", "image_id": "8", "annotator_id": 1, "caption": 42},
        good,
    ]
    path = write(tmp_path, "flickr30k_train_captions.jsonl", lines)
    out = list(LocalizedNarrativesFlickr30k().iter_converted([path]))
    source = "localized_narratives__flickr30k"
    assert out[-1] == expected(source, good, ["Good."], "train", image_ref="flickr30k-images/1.jpg")[0]
    assert [(r.reason, r.position, r.key) for r in out[:-1]] == [
        (Reason.MALFORMED, 1, None),
        (Reason.INVALID_UTF8, 2, None),
        (Reason.EMPTY_TEXT, 3, f"{source}/4/1"),
        (Reason.EMPTY_TEXT, 4, f"{source}/5/1"),
        (Reason.MALFORMED, 5, None),
        (Reason.MALFORMED, 6, None),
        (Reason.MALFORMED, 7, None),
        (Reason.MALFORMED, 8, f"{source}/6/1"),
        (Reason.MALFORMED, 9, None),
        (Reason.MALFORMED, 10, f"{source}/8/1"),
    ]
    assert all(r.input_file == str(path) for r in out[:-1])
    assert "invalid JSON" in out[0].detail and out[0].record.startswith('{"dataset_id"')
    assert out[1].record is not None and "\\xe9" in out[1].record


def test_coco_image_id_must_be_an_integer(tmp_path: Path) -> None:
    path = write(tmp_path, "coco_train_captions.jsonl", [narrative("mscoco_train2017", "abc", 1, "A cat.")])
    adapter = LocalizedNarrativesCoco(DecontaminationOptions(decontaminate=False))
    [out] = list(adapter.iter_converted([path]))
    assert out.reason == Reason.MALFORMED and "not an integer" in out.detail


# -- inputs -------------------------------------------------------------------------------------------------------

def test_truncated_gzip_is_an_input_error_naming_the_file(tmp_path: Path) -> None:
    items = [narrative("open_images", f"{i:016x}", 1, f"Caption number {i}. " * 20) for i in range(200)]
    path = write(tmp_path, "open_images_test_captions.jsonl", items, "gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        list(LocalizedNarrativesOpenImages().iter_converted([path]))
    assert str(path) in str(info.value)


def test_truncated_zip_is_an_input_error_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "ade20k_train_captions.jsonl", [narrative("ADE20k", "ADE_train_1", 1, "A.")], "zip")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError) as info:
        list(LocalizedNarrativesAde20k().iter_converted([path]))
    assert str(path) in str(info.value)


def test_truncated_karpathy_is_an_input_error_naming_it(tmp_path: Path) -> None:
    karpathy = write_karpathy(tmp_path, document(*[image(i, "val", [(i, "x.")]) for i in range(40)]))
    karpathy.write_bytes(karpathy.read_bytes()[:500])
    train = write(tmp_path, "coco_train_captions.jsonl", [narrative("mscoco_train2017", "9", 1, "A.")])
    with pytest.raises(InputError) as info:
        list(LocalizedNarrativesCoco().iter_converted([train, karpathy]))
    assert str(karpathy) in str(info.value)


@pytest.mark.parametrize(
    ("adapter", "name"),
    [
        (LocalizedNarrativesOpenImages, "coco_train_captions.jsonl"),
        (LocalizedNarrativesCoco, "open_images_test_captions.jsonl"),
        (LocalizedNarrativesFlickr30k, "flickr30k_train_localized_narratives.jsonl"),
        (LocalizedNarrativesAde20k, "ln_ade20k_train_captions_multi.jsonl"),
        (LocalizedNarrativesFlickr30k, "dataset_coco.json"),  # Karpathy is LN-COCO's only
    ],
)
def test_unknown_inputs_are_input_errors(tmp_path: Path, adapter: type, name: str) -> None:
    path = tmp_path / name
    path.write_text("{}\n")
    with pytest.raises(InputError, match=f"{name}: not an input of"):
        list(adapter().iter_converted([path]))


def test_no_caption_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no caption file"):
        list(LocalizedNarrativesOpenImages().iter_converted([]))
    with pytest.raises(InputError, match="no caption file"):
        list(LocalizedNarrativesCoco().iter_converted([write_karpathy(tmp_path, document())]))


def test_keys_unique_across_files_and_annotators(tmp_path: Path) -> None:
    lines = [narrative("flickr30k", str(i), a, "One. Two. Three.") for i in range(10) for a in (1, 2)]
    paths = [write(tmp_path, "flickr30k_train_captions.jsonl", lines[:10]),
             write(tmp_path, "flickr30k_test_captions.jsonl", lines[10:], "gz")]
    keys = [p.key for p in LocalizedNarrativesFlickr30k().iter_converted(paths)]
    assert len(keys) == 60 and len(set(keys)) == 60


def test_registry_builds_the_four_adapters() -> None:
    for name, cls in [("localized_narratives__coco", LocalizedNarrativesCoco),
                      ("localized_narratives__flickr30k", LocalizedNarrativesFlickr30k),
                      ("localized_narratives__ADE20k", LocalizedNarrativesAde20k),
                      ("localized_narratives__openimages", LocalizedNarrativesOpenImages)]:
        adapter = create_adapter(name)
        assert type(adapter) is cls and adapter.name == name and adapter.inputs_help
    assert create_adapter("localized_narratives__coco").options.decontaminate is True
    with pytest.raises(ValueError, match="takes no options"):
        create_adapter("localized_narratives__openimages", {"decontaminate": "false"})
    with pytest.raises(ValueError, match=r"localized_narratives__coco': options: unknown key\(s\) \['decontam'\]"):
        create_adapter("localized_narratives__coco", {"decontam": "false"})
