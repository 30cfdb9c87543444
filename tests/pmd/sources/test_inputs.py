"""Streaming readers: every container format, and every way an input can be unreadable."""

from __future__ import annotations

import bz2
import gzip
import json
import zipfile
from pathlib import Path

import pytest

from pmd.sources.base import InputError, Record
from pmd.sources.inputs import (
    decode_utf8,
    iter_json_items,
    iter_lines,
    iter_streams,
    load_json_value,
    require_file,
    strip_compression_suffix,
)
from tests import archive_files
from tests.archive_files import write_zip

TEXT = b"first line\nsecond\tline\r\nthird \xff line\n\nlast line without newline"
LINES = [b"first line", b"second\tline", b"third \xff line", b"", b"last line without newline"]
DOC = {"info": {"version": "1.0"}, "images": [{"id": 1, "w": 1.5}, {"id": 2, "w": None}, {"id": 3, "w": 2}]}


def lines_of(path: Path, **kwargs) -> list[tuple[str, int, bytes]]:
    return [(r.input_file, r.position, r.raw) for r in iter_lines(path, **kwargs)]


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    return archive_files.write_tar(path, members, mode, directories=["data"])


@pytest.mark.parametrize(
    ("name", "encode"),
    [("data.tsv", lambda b: b), ("data.tsv.gz", gzip.compress), ("data.tsv.bz2", bz2.compress)],
)
def test_iter_lines_plain_and_compressed(tmp_path: Path, name: str, encode) -> None:
    path = tmp_path / name
    path.write_bytes(encode(TEXT))
    assert lines_of(path) == [(str(path), i, line) for i, line in enumerate(LINES, start=1)]


def test_iter_lines_zip_members(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "bundle.zip", {"b.tsv": TEXT, "a.tsv.gz": gzip.compress(b"x\ny\n"), "c.json": b"{}",
                                              "dir/": b""})
    assert lines_of(path, member_pattern="*.tsv*") == (
        [(f"{path}!a.tsv.gz", 1, b"x"), (f"{path}!a.tsv.gz", 2, b"y")]
        + [(f"{path}!b.tsv", i, line) for i, line in enumerate(LINES, start=1)]
    )


def test_iter_lines_tar_gz_member(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "bundle.tar.gz", {"data/rows.tsv": TEXT, "data/other.txt": b"z\n"})
    assert lines_of(path, member_pattern="*.tsv") == [
        (f"{path}!data/rows.tsv", i, line) for i, line in enumerate(LINES, start=1)
    ]


def test_skip_header_per_stream(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "bundle.zip", {"a.tsv": b"h\n1\n", "b.tsv": b"h\n2\n"})
    assert lines_of(path, skip_header=lambda line: line.startswith(b"h")) == [
        (f"{path}!a.tsv", 2, b"1"), (f"{path}!b.tsv", 2, b"2")]
    plain = tmp_path / "a.tsv"
    plain.write_bytes(b"1\n2\n")
    assert lines_of(plain, skip_header=lambda line: line.startswith(b"h")) == [(str(plain), 1, b"1"),
                                                                             (str(plain), 2, b"2")]


def test_truncated_gzip_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "big.tsv.gz"
    body = b"".join(b"row %d\tsome text to make it longer\n" % i for i in range(5000))
    path.write_bytes(gzip.compress(body)[:-50])
    with pytest.raises(InputError) as info:
        list(iter_lines(path))
    error = info.value
    assert error.path == str(path)
    assert error.position is not None and 4000 < error.position <= 5000
    assert str(error).startswith(f"{path}:{error.position}: ") and "truncated" in str(error)


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv.gz"
    path.write_bytes(b"this is not gzip data at all\n")
    with pytest.raises(InputError) as info:
        list(iter_lines(path))
    assert info.value.path == str(path)


def test_truncated_bz2(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv.bz2"
    path.write_bytes(bz2.compress(TEXT * 100)[:-30])
    with pytest.raises(InputError) as info:
        list(iter_lines(path))
    assert info.value.path == str(path)


def test_truncated_tar_gz(tmp_path: Path) -> None:
    path = tmp_path / "bundle.tar.gz"
    write_tar(path, {"data/rows.tsv": TEXT * 2000})
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(InputError) as info:
        list(iter_lines(path, member_pattern="*.tsv"))
    assert str(path) in str(info.value)


def test_tar_without_matching_member(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "bundle.tar.gz", {"data/rows.txt": TEXT})
    with pytest.raises(InputError, match="no member matching \\*.json") as info:
        list(iter_lines(path, member_pattern="*.json"))
    assert info.value.path == str(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file") as info:
        list(iter_lines(tmp_path / "nope.tsv"))
    assert info.value.path == str(tmp_path / "nope.tsv") and info.value.position is None
    with pytest.raises(InputError, match="not a regular file"):
        require_file(tmp_path)
    (tmp_path / "x").write_bytes(b"")
    assert require_file(tmp_path / "x") == tmp_path / "x"


def test_bad_zip(tmp_path: Path) -> None:
    path = tmp_path / "bundle.zip"
    path.write_bytes(b"PK\x03\x04 certainly not a zip archive")
    with pytest.raises(InputError, match="not a readable zip archive") as info:
        list(iter_lines(path))
    assert info.value.path == str(path)


def test_zip_without_matching_member(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "bundle.zip", {"a.txt": b"x"})
    with pytest.raises(InputError, match="no member matching annotations/\\*.json"):
        list(iter_json_items(path, "annotations.item", member_pattern="annotations/*.json"))


def test_corrupt_zip_member(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "bundle.zip", {"rows.tsv": TEXT * 50}, compression=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    offset = data.index(b"second\tline")
    data[offset:offset + 6] = b"SECOND"  # the CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as info:
        list(iter_lines(path))
    assert info.value.path == f"{path}!rows.tsv"


@pytest.mark.parametrize("name", ["doc.json", "doc.json.gz", "doc.json.bz2"])
def test_iter_json_items(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    raw = json.dumps(DOC).encode()
    compress = {"gz": gzip.compress, "bz2": bz2.compress}.get(name.rsplit(".", 1)[-1], lambda data: data)
    path.write_bytes(compress(raw))
    assert list(iter_json_items(path, "images.item")) == [
        Record(str(path), 0, {"id": 1, "w": 1.5}),
        Record(str(path), 1, {"id": 2, "w": None}),
        Record(str(path), 2, {"id": 3, "w": 2}),
    ]
    assert isinstance(list(iter_json_items(path, "images.item"))[0].raw["w"], float)  # not Decimal


def test_iter_json_items_zip_and_tar(tmp_path: Path) -> None:
    raw = json.dumps(DOC).encode()
    z = write_zip(tmp_path / "docs.zip", {"annotations/b.json": raw, "annotations/a.json": raw, "README": b"x"})
    items = list(iter_json_items(z, "images.item", member_pattern="annotations/*.json"))
    assert [(r.input_file, r.position) for r in items] == [
        (f"{z}!annotations/a.json", 0), (f"{z}!annotations/a.json", 1), (f"{z}!annotations/a.json", 2),
        (f"{z}!annotations/b.json", 0), (f"{z}!annotations/b.json", 1), (f"{z}!annotations/b.json", 2),
    ]
    t = write_tar(tmp_path / "docs.tar.gz", {"data/doc.json": raw})
    assert [r.raw["id"] for r in iter_json_items(t, "images.item", member_pattern="*.json")] == [1, 2, 3]


def test_truncated_json(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(DOC)[:-25])
    items = iter_json_items(path, "images.item")
    assert next(items).raw == {"id": 1, "w": 1.5}
    with pytest.raises(InputError, match="invalid or truncated JSON after element") as info:
        list(items)
    assert info.value.path == str(path)


def test_json_with_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    path.write_bytes(b'{"images": [{"id": 1, "name": "caf\xe9"}]}')
    with pytest.raises(InputError) as info:
        list(iter_json_items(path, "images.item"))
    assert info.value.path == str(path)


def test_json_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "doc.json.gz"
    big = {"images": [{"id": i, "caption": "a caption long enough to fill some space"} for i in range(3000)]}
    path.write_bytes(gzip.compress(json.dumps(big).encode())[:-40])
    with pytest.raises(InputError) as info:
        list(iter_json_items(path, "images.item"))
    assert info.value.path == str(path)


def test_json_wrong_layout(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(InputError, match="no elements at 'images.item'"):
        list(iter_json_items(path, "images.item"))


def test_load_json_value(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(DOC))
    assert load_json_value(path, "info") == {"version": "1.0"}
    with pytest.raises(InputError, match="no value at 'licenses'"):
        load_json_value(path, "licenses")
    path.write_text(json.dumps(DOC)[:10])
    with pytest.raises(InputError, match="invalid or truncated JSON") as info:
        load_json_value(path, "images")
    assert info.value.path == str(path)


def test_iter_streams_plain(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"abc")
    assert [(name, stream.read()) for name, stream in iter_streams(path)] == [(str(path), b"abc")]


def test_small_helpers() -> None:
    assert decode_utf8("café".encode()) == "café"
    assert decode_utf8(b"caf\xe9") is None
    assert strip_compression_suffix("wit_v1.train.all-00000-of-00010.tsv.gz") == "wit_v1.train.all-00000-of-00010.tsv"
    assert strip_compression_suffix("sbu-captions-all.tar.gz") == "sbu-captions-all"
    assert strip_compression_suffix("redcaps_v1.0_annotations.zip") == "redcaps_v1.0_annotations"
    assert strip_compression_suffix("cc12m.tsv") == "cc12m.tsv"


def test_line_blocks_give_the_same_records_as_iter_lines(tmp_path):
    from pmd.sources.inputs import iter_line_blocks, iter_lines

    path = tmp_path / "lines.tsv.gz"
    body = b"a\tb\r\n\nsecond\n\xff bad utf8\nthird\rwith cr inside\nlast without newline"
    with gzip.open(path, "wb") as f:
        f.write(body)
    expected = list(iter_lines(path))
    for size in (1, 2, 3, 100):
        blocks = list(iter_line_blocks(path, size))
        assert [r for b in blocks for r in b.records()] == expected
        assert sum(b.lines for b in blocks) == len(expected) == 6


@pytest.mark.parametrize("body", [
    b"a\tb\r\n\nsecond\n\xff bad utf8\nthird\rwith cr inside\nlast without newline",
    b"one\ntwo\nthree\n",
    b"",
    b"\n\n\n",
    b"x" * 100 + b"\n" + b"y\n" * 37,
])
def test_line_ranges_cut_like_line_blocks(tmp_path, monkeypatch, body):
    from pmd.sources import inputs

    path = tmp_path / "plain.tsv"
    path.write_bytes(body)
    monkeypatch.setattr(inputs, "_SCAN_BYTES", 7)  # ranges must be found across many small reads
    for size in (1, 2, 3, 5, 100):
        blocks = list(inputs.iter_line_blocks(path, size))
        ranges = list(inputs.iter_line_ranges(path, size))
        assert [(r.first_line, r.lines) for r in ranges] == [(b.first_line, b.lines) for b in blocks]
        assert [r.records() for r in ranges] == [b.records() for b in blocks]
    (tmp_path / "x.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="uncompressed"):
        list(inputs.iter_line_ranges(tmp_path / "x.gz", 5))
