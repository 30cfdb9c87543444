"""RedCaps adapter: annotation files, the annotations zip, directories, every rejection reason, input errors."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest

from pmd.sources import create_adapter
from pmd.sources.base import InputError, Pair, Reason, Record, Reject
from pmd.sources.red_caps import RedCapsAdapter

INFO = {"url": "https://redcaps.xyz", "version": "1.0", "subreddit": "itookapicture", "year": 2020}


def annotation(image_id: str, **values: object) -> dict[str, object]:
    """Crafted in the upstream field order and types."""
    base: dict[str, object] = {
        "image_id": image_id,
        "author": "photo_fan_42",
        "url": f"https://i.redd.it/{image_id}abcdef.jpg",
        "raw_caption": "ITAP of a  foggy morning ",
        "caption": "itap of a foggy morning",
        "subreddit": "itookapicture",
        "score": 57,
        "created_utc": 1588205765.0,
        "permalink": f"/r/itookapicture/comments/{image_id}/itap_of_a_foggy_morning/",
        "crosspost_parents": None,
    }
    base.update(values)
    return base


ANNOTATIONS = [
    annotation("gaa1z1"),
    annotation("gab2y2", raw_caption="   ", caption=""),
    annotation("gac3x3", url="i.redd.it/gac3x3.jpg"),
    annotation("gad4w4", url=None),
    annotation("", raw_caption="no id"),
    annotation("gae5v5", raw_caption=["not", "text"]),
    annotation("gaf6u6", raw_caption="My cat\n(OC)", score=3, crosspost_parents=["t3_ga0000"]),
]


def write_file(path: Path, annotations: list[dict[str, object]] = ANNOTATIONS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": INFO, "annotations": annotations}))
    return path


def meta(image_id: str, **values: object) -> str:
    fields = {k: v for k, v in annotation(image_id, **values).items() if k not in ("image_id", "url", "raw_caption")}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def expected(file: str) -> list[Pair | Reject]:
    return [
        Pair(key="red_caps/gaa1z1", text="ITAP of a foggy morning", split="train",
             image_url="https://i.redd.it/gaa1z1abcdef.jpg",
             meta=('{"author":"photo_fan_42","caption":"itap of a foggy morning","created_utc":1588205765.0,'
                   '"crosspost_parents":null,"permalink":"/r/itookapicture/comments/gaa1z1/itap_of_a_foggy_morning/",'
                   '"score":57,"subreddit":"itookapicture"}')),
        Reject(reason=Reason.EMPTY_TEXT, input_file=file, position=1, detail="empty raw_caption",
               key="red_caps/gab2y2", record=json.dumps(ANNOTATIONS[1])),
        Reject(reason=Reason.NO_URL, input_file=file, position=2, detail="not an http(s) URL: 'i.redd.it/gac3x3.jpg'",
               key="red_caps/gac3x3", record=json.dumps(ANNOTATIONS[2])),
        Reject(reason=Reason.MALFORMED, input_file=file, position=3, detail="missing url", key="red_caps/gad4w4",
               record=json.dumps(ANNOTATIONS[3])),
        Reject(reason=Reason.MALFORMED, input_file=file, position=4, detail="missing image_id",
               record=json.dumps(ANNOTATIONS[4])),
        Reject(reason=Reason.MALFORMED, input_file=file, position=5, detail="raw_caption is a list",
               key="red_caps/gae5v5", record=json.dumps(ANNOTATIONS[5])),
        Pair(key="red_caps/gaf6u6", text="My cat (OC)", split="train", image_url="https://i.redd.it/gaf6u6abcdef.jpg",
             meta=meta("gaf6u6", score=3, crosspost_parents=["t3_ga0000"])),
    ]


def run(inputs: list[Path]) -> list[Pair | Reject]:
    return list(RedCapsAdapter().iter_converted(inputs))


def test_annotation_file(tmp_path: Path) -> None:
    path = write_file(tmp_path / "annotations" / "itookapicture_2020.json")
    assert run([path]) == expected(str(path))


def test_annotations_zip(tmp_path: Path) -> None:
    path = tmp_path / "redcaps_v1.0_annotations.zip"
    other = [annotation("zz9999", subreddit="cats")]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("annotations/", "")
        # Written out of order: members are read sorted by name.
        archive.writestr("annotations/itookapicture_2020.json", json.dumps({"info": INFO, "annotations": ANNOTATIONS}))
        archive.writestr("annotations/cats_2017.json", json.dumps({"info": INFO, "annotations": other}))
        archive.writestr("README.txt", "not an annotation file")
    result = run([path])
    assert result[0] == Pair(key="red_caps/zz9999", text="ITAP of a foggy morning", split="train",
                             image_url="https://i.redd.it/zz9999abcdef.jpg", meta=meta("zz9999", subreddit="cats"))
    assert result[1:] == expected(f"{path}!annotations/itookapicture_2020.json")


def test_directory(tmp_path: Path) -> None:
    write_file(tmp_path / "annotations" / "b_2019.json", [annotation("bbb")])
    write_file(tmp_path / "annotations" / "a_2018.json", [annotation("aaa")])
    (tmp_path / "annotations" / "notes.txt").write_text("ignored")
    keys = ["red_caps/aaa", "red_caps/bbb"]
    assert [p.key for p in run([tmp_path / "annotations"])] == keys
    assert [p.key for p in run([tmp_path])] == keys  # the parent of annotations/ works too


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no \\*.json"):
        run([tmp_path])


def test_same_annotation_file_twice(tmp_path: Path) -> None:
    loose = write_file(tmp_path / "annotations" / "itookapicture_2020.json")
    archive = tmp_path / "redcaps_v1.0_annotations.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(loose, "annotations/itookapicture_2020.json")
    with pytest.raises(InputError, match="itookapicture_2020.json given twice"):
        run([archive, loose])


def test_zip_without_annotations(tmp_path: Path) -> None:
    path = tmp_path / "redcaps_v1.0_annotations.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("other/itookapicture_2020.json", "{}")
    with pytest.raises(InputError, match="no member matching annotations/\\*.json"):
        run([path])


def test_bad_zip(tmp_path: Path) -> None:
    path = tmp_path / "redcaps_v1.0_annotations.zip"
    path.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(InputError, match="not a readable zip") as info:
        run([path])
    assert info.value.path == str(path)


def test_truncated_json(tmp_path: Path) -> None:
    path = tmp_path / "itookapicture_2020.json"
    path.write_text(json.dumps({"info": INFO, "annotations": ANNOTATIONS})[:-100])
    with pytest.raises(InputError, match="truncated JSON") as info:
        list(RedCapsAdapter().records([path]))
    assert info.value.path == str(path)


def test_not_the_annotation_layout(tmp_path: Path) -> None:
    path = tmp_path / "itookapicture_2020.json"
    path.write_text(json.dumps([annotation("x")]))
    with pytest.raises(InputError, match="no elements at 'annotations.item'"):
        run([path])


def test_unknown_and_missing_inputs(tmp_path: Path) -> None:
    (tmp_path / "redcaps.csv").write_text("x")
    with pytest.raises(InputError, match="not a RedCaps input"):
        run([tmp_path / "redcaps.csv"])
    with pytest.raises(InputError, match="no such file"):
        run([tmp_path / "cats_2020.json"])


def test_odd_records() -> None:
    adapter = RedCapsAdapter()
    [not_object] = adapter.convert(Record("f.json", 0, "a string"), None)
    assert (not_object.reason, not_object.detail) == (Reason.MALFORMED, "annotation is a str, not an object")
    [no_id] = adapter.convert(Record("f.json", 1, {"url": "https://i.redd.it/x.jpg", "raw_caption": "x"}), None)
    assert (no_id.reason, no_id.key) == (Reason.MALFORMED, None)
    [no_caption] = adapter.convert(Record("f.json", 2, {"image_id": "abc", "url": "https://i.redd.it/x.jpg"}), None)
    assert (no_caption.reason, no_caption.key) == (Reason.EMPTY_TEXT, "red_caps/abc")
    [url_number] = adapter.convert(Record("f.json", 3, {"image_id": "abd", "url": 5, "raw_caption": "x"}), None)
    assert url_number.reason == Reason.NO_URL


def test_registry_and_pickling(tmp_path: Path) -> None:
    adapter = create_adapter("red_caps")
    assert isinstance(adapter, RedCapsAdapter) and adapter.inputs_help
    path = write_file(tmp_path / "itookapicture_2020.json")
    records = pickle.loads(pickle.dumps(list(adapter.records([path]))))
    clone = pickle.loads(pickle.dumps(adapter))
    assert [x for r in records for x in clone.convert(r, None)] == expected(str(path))
