"""SBU Captions adapter: both published layouts, every rejection reason, and the input errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from pmd.sources import create_adapter
from pmd.sources.base import InputError, Pair, Reason, Record, Reject
from pmd.sources.sbu import SbuAdapter, flickr_photo_id
from tests.archive_files import write_tar

# Crafted in the upstream shape: Flickr static URLs, "NNN@N0X" user ids, free-form captions.
URLS = [
    "http://static.flickr.com/2723/4385058960_b0f291553e.jpg",
    "http://static.flickr.com/3112/2698262148_31f2c1f8d8.jpg",
    "ftp://static.flickr.com/1/12345_abcdef.jpg",
    "https://farm3.staticflickr.com/2088/2279102331_0a5c7d83a4_b.jpg",
    "http://example.org/images/photo.jpg",
]
CAPTIONS = [
    "  Man sits on a  bench\tin the park ",
    "   ",
    "a caption whose url is not http",
    "the sun sets over   the lake",
    "a picture not hosted on flickr",
]
USER_IDS = ["47889917@N08", "11771839@N00", "99999999@N01", "23425231@N05", "12345678@N02"]


def expected_json(file: str) -> list[Pair | Reject]:
    return [
        Pair(key="sbu_captions/0", text="Man sits on a bench in the park", split="train",
             meta='{"index":0,"photo_id":"4385058960","user_id":"47889917@N08"}', image_url=URLS[0]),
        Reject(reason=Reason.EMPTY_TEXT, input_file=file, position=1, key="sbu_captions/1",
               record=json.dumps({"image_url": URLS[1], "caption": CAPTIONS[1], "user_id": USER_IDS[1]})),
        Reject(reason=Reason.NO_URL, input_file=file, position=2, key="sbu_captions/2",
               detail="not an http(s) URL: 'ftp://static.flickr.com/1/12345_abcdef.jpg'",
               record=json.dumps({"image_url": URLS[2], "caption": CAPTIONS[2], "user_id": USER_IDS[2]})),
        Pair(key="sbu_captions/3", text="the sun sets over the lake", split="train",
             meta='{"index":3,"photo_id":"2279102331","user_id":"23425231@N05"}', image_url=URLS[3]),
        Pair(key="sbu_captions/4", text="a picture not hosted on flickr", split="train",
             meta='{"index":4,"user_id":"12345678@N02"}', image_url=URLS[4]),
    ]


def write_json(path: Path, **arrays: list) -> Path:
    # Upstream order is image_urls, user_ids, captions; a different order must not matter.
    data = arrays or {"captions": CAPTIONS, "user_ids": USER_IDS, "image_urls": URLS}
    path.write_text(json.dumps(data))
    return path



def run(inputs: list[Path]) -> list[Pair | Reject]:
    return list(SbuAdapter().iter_converted(inputs))


def test_json_layout(tmp_path: Path) -> None:
    path = write_json(tmp_path / "sbu-captions-all.json")
    assert run([path]) == expected_json(str(path))


def test_json_records_are_rows_of_the_parallel_arrays(tmp_path: Path) -> None:
    path = write_json(tmp_path / "sbu-captions-all.json")
    records = list(SbuAdapter().records([path]))
    assert records[0] == Record(str(path), 0, {"image_url": URLS[0], "caption": CAPTIONS[0], "user_id": USER_IDS[0]})
    assert [r.position for r in records] == [0, 1, 2, 3, 4]


def test_published_tar_gz(tmp_path: Path) -> None:
    data = json.dumps({"image_urls": URLS, "user_ids": USER_IDS, "captions": CAPTIONS}).encode()
    path = write_tar(tmp_path / "sbu-captions-all.tar.gz", {"sbu-captions-all.json": data})
    assert run([path]) == expected_json(f"{path}!sbu-captions-all.json")


def test_tar_with_two_json_members_is_refused(tmp_path: Path) -> None:
    data = json.dumps({"image_urls": URLS, "user_ids": USER_IDS, "captions": CAPTIONS}).encode()
    path = write_tar(tmp_path / "sbu-captions-all.tar.gz", {"a/sbu-captions-all.json": data, "b/copy.json": data})
    with pytest.raises(InputError, match="more than one JSON file"):
        run([path])


@pytest.mark.parametrize("short", ["image_urls", "captions", "user_ids"])
def test_arrays_of_different_lengths(tmp_path: Path, short: str) -> None:
    arrays = {"image_urls": URLS, "user_ids": USER_IDS, "captions": CAPTIONS}
    arrays[short] = arrays[short][:3]
    path = write_json(tmp_path / "sbu-captions-all.json", **arrays)
    with pytest.raises(InputError) as info:
        run([path])
    assert info.value.path == str(path)
    lengths = {name: 3 if name == short else 5 for name in arrays}
    assert (f"image_urls has {lengths['image_urls']}, captions has {lengths['captions']}, "
            f"user_ids has {lengths['user_ids']} elements") in str(info.value)


def test_missing_array(tmp_path: Path) -> None:
    path = write_json(tmp_path / "sbu-captions-all.json", image_urls=URLS, captions=CAPTIONS)
    with pytest.raises(InputError, match="user_ids") as info:
        run([path])
    assert str(path) in str(info.value)


def test_truncated_json(tmp_path: Path) -> None:
    path = tmp_path / "sbu-captions-all.json"
    path.write_text(json.dumps({"image_urls": URLS, "user_ids": USER_IDS, "captions": CAPTIONS})[:-40])
    with pytest.raises(InputError) as info:
        run([path])
    assert str(path) in str(info.value)


def write_text_pair(tmp_path: Path, urls: list[bytes], captions: list[bytes]) -> tuple[Path, Path]:
    url_file = tmp_path / "SBU_captioned_photo_dataset_urls.txt"
    caption_file = tmp_path / "SBU_captioned_photo_dataset_captions.txt"
    url_file.write_bytes(b"".join(u + b"\n" for u in urls))
    caption_file.write_bytes(b"".join(c + b"\n" for c in captions))
    return url_file, caption_file


def test_text_layout(tmp_path: Path) -> None:
    urls = [u.encode() for u in URLS]
    urls += [b"http://static.flickr.com/1/2_ab.jpg", b"http://static.flickr.com/1/3\xff.jpg"]
    captions = [c.encode() for c in CAPTIONS] + [b"caf\xe9 au lait", b"fine caption"]
    url_file, caption_file = write_text_pair(tmp_path, urls, captions)
    file = str(caption_file)
    expected = [
        Pair(key="sbu_captions/0", text="Man sits on a bench in the park", split="train",
             meta='{"index":0,"photo_id":"4385058960"}', image_url=URLS[0]),
        Reject(reason=Reason.EMPTY_TEXT, input_file=file, position=2, key="sbu_captions/1",
               record=f"{URLS[1]}\t{CAPTIONS[1]}"),
        Reject(reason=Reason.NO_URL, input_file=file, position=3, key="sbu_captions/2",
               detail="not an http(s) URL: 'ftp://static.flickr.com/1/12345_abcdef.jpg'",
               record=f"{URLS[2]}\t{CAPTIONS[2]}"),
        Pair(key="sbu_captions/3", text="the sun sets over the lake", split="train",
             meta='{"index":3,"photo_id":"2279102331"}', image_url=URLS[3]),
        Pair(key="sbu_captions/4", text="a picture not hosted on flickr", split="train",
             meta='{"index":4}', image_url=URLS[4]),
        Reject(reason=Reason.INVALID_UTF8, input_file=file, position=6, key="sbu_captions/5",
               detail="caption line", record="http://static.flickr.com/1/2_ab.jpg\tcaf\\xe9 au lait"),
        Reject(reason=Reason.INVALID_UTF8, input_file=file, position=7, key="sbu_captions/6",
               detail="url line", record="http://static.flickr.com/1/3\\xff.jpg\tfine caption"),
    ]
    # Either order of the two files on the command line.
    assert run([url_file, caption_file]) == expected
    assert run([caption_file, url_file]) == expected


def test_text_files_of_different_lengths(tmp_path: Path) -> None:
    url_file, caption_file = write_text_pair(tmp_path, [u.encode() for u in URLS], [c.encode() for c in CAPTIONS[:4]])
    with pytest.raises(InputError) as info:
        run([url_file, caption_file])
    assert info.value.path == str(caption_file)
    assert f"4 lines, but {url_file} has 5" in str(info.value)


def test_json_invalid_utf8_surrogate() -> None:
    # yajl replaces a lone \ud83d escape, but the pure-Python ijson backend keeps it: such a str cannot be written.
    record = Record("sbu-captions-all.json", 7, {"image_url": URLS[0], "caption": "smile \ud83d", "user_id": "1@N00"})
    assert list(SbuAdapter().convert(record, None)) == [
        Reject(reason=Reason.INVALID_UTF8, input_file="sbu-captions-all.json", position=7, key="sbu_captions/7",
               detail="unpaired surrogate in caption",
               record=json.dumps({"image_url": URLS[0], "caption": "smile \\ud83d", "user_id": "1@N00"},
                                 ensure_ascii=False)),
    ]


def test_json_odd_values() -> None:
    adapter = SbuAdapter()
    [no_url] = adapter.convert(Record("f", 0, {"image_url": None, "caption": "x", "user_id": "1@N00"}), None)
    assert (no_url.reason, no_url.key) == (Reason.NO_URL, "sbu_captions/0")
    [null_caption] = adapter.convert(Record("f", 1, {"image_url": URLS[0], "caption": None, "user_id": None}), None)
    assert (null_caption.reason, null_caption.key) == (Reason.EMPTY_TEXT, "sbu_captions/1")
    [number] = adapter.convert(Record("f", 2, {"image_url": URLS[0], "caption": 3, "user_id": None}), None)
    assert number.reason == Reason.MALFORMED
    [not_a_row] = adapter.convert(Record("f", 3, ["a", "b"]), None)
    assert not_a_row.reason == Reason.MALFORMED


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["sbu-captions-all.json", "sbu-captions-all.tar.gz"], "exactly one copy"),
        (["sbu-captions-all.json", "SBU_captioned_photo_dataset_urls.txt"], "exactly one copy"),
        (["SBU_captioned_photo_dataset_urls.txt"], "exactly one \\*_urls.txt and one \\*_captions.txt"),
        (["SBU_captioned_photo_dataset_captions.txt"], "exactly one \\*_urls.txt and one \\*_captions.txt"),
        (["sbu.csv"], "not an SBU Captions input"),
    ],
)
def test_bad_input_sets(tmp_path: Path, names: list[str], message: str) -> None:
    paths = []
    for name in names:
        (tmp_path / name).write_bytes(b"")
        paths.append(tmp_path / name)
    with pytest.raises(InputError, match=message):
        run(paths)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file") as info:
        run([tmp_path / "sbu-captions-all.json"])
    assert info.value.path == str(tmp_path / "sbu-captions-all.json")


def test_no_inputs() -> None:
    assert run([]) == []


def test_flickr_photo_id() -> None:
    assert flickr_photo_id("http://static.flickr.com/2723/4385058960_b0f291553e.jpg") == "4385058960"
    assert flickr_photo_id("http://farm4.static.flickr.com/3001/2731232_12ab34cd56_m.jpg") == "2731232"
    assert flickr_photo_id("https://live.staticflickr.com/65535/50000000000_abcdef1234_o.png") == "50000000000"
    assert flickr_photo_id("http://example.org/2723/4385058960_b0f291553e.jpg") is None
    assert flickr_photo_id("http://static.flickr.com/2723/photo.jpg") is None
    assert flickr_photo_id("http://[::1") is None


def test_registry_and_pickling(tmp_path: Path) -> None:
    adapter = create_adapter("sbu_captions")
    assert isinstance(adapter, SbuAdapter) and adapter.name == "sbu_captions" and adapter.inputs_help
    path = write_json(tmp_path / "sbu-captions-all.json")
    records = list(adapter.records([path]))
    clone = pickle.loads(pickle.dumps(adapter))
    converted = [item for record in pickle.loads(pickle.dumps(records)) for item in clone.convert(record, None)]
    assert converted == expected_json(str(path))
