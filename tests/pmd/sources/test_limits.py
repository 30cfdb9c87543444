"""The bounded readers: the JSON byte scanner against a byte-by-byte reference, the line cap, chunk byte budgets and
caption limits. Property-based (hypothesis) where the input space is the point."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmd import schema
from pmd.catalog import load_catalog
from pmd.ingest import chunked, convert_chunk, iter_chunks
from pmd.sources import create_adapter
from pmd.sources import inputs as inputs_module
from pmd.sources.base import CaptionLimits, InputError, OversizedLine, Pair, Reason, Record, caption_limits
from pmd.sources.inputs import (iter_json_items, iter_line_blocks, iter_line_ranges, iter_lines, parse_json_line,
                                read_lines)
from pmd.sources.limits import JsonScanner, LimitExceeded

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------- the JSON scanner
def reference_violation(data: bytes, item_depth: int | None, max_depth: int, max_token: int, max_item: int) -> bool:
    """Byte by byte: does the stream break a limit? Written for clarity, independently of the numpy scanner."""
    in_string, backslashes, depth = False, 0, 0
    last_boundary = -1
    item_start = None
    for i, byte in enumerate(data):
        char = bytes([byte])
        boundary = False
        if char == b'"' and backslashes % 2 == 0:
            in_string = not in_string
            boundary = True
        elif not in_string and char in b"[]{},:":
            boundary = True
            if char in b"[{":
                depth += 1
                if depth > max_depth:
                    return True
                if item_depth is not None and depth == item_depth + 1:
                    item_start = i
            elif char in b"]}":
                depth -= 1
                if item_depth is not None and depth == item_depth:
                    if i - item_start > max_item:
                        return True
                    item_start = None
        backslashes = backslashes + 1 if char == b"\\" else 0
        if boundary:
            if i - last_boundary > max_token:
                return True
            last_boundary = i
    if len(data) - last_boundary > max_token:
        return True
    return item_start is not None and len(data) - item_start > max_item


def scanner_violation(data: bytes, cuts: list[int], item_depth, max_depth, max_token, max_item) -> bool:
    scanner = JsonScanner(item_depth, max_depth=max_depth, max_token=max_token, max_item=max_item)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for a, b in zip(points, points[1:]):
            scanner.feed(data[a:b])
    except LimitExceeded:
        return True
    return False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(alphabet='ab"\\[]{},: \u00e9', max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=30,
)
json_like_bytes = st.binary(max_size=200) | st.text(alphabet='[]{}",:\\ab1 ', max_size=200).map(str.encode) | \
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode())


@SETTINGS
@given(data=json_like_bytes, cuts=st.lists(st.integers(0, 400), max_size=6), item_depth=st.none() | st.integers(0, 3),
       max_depth=st.integers(1, 5), max_token=st.integers(1, 30), max_item=st.integers(1, 60))
def test_scanner_matches_the_reference_for_any_bytes_and_any_chunking(data, cuts, item_depth, max_depth, max_token,
                                                                      max_item):
    expected = reference_violation(data, item_depth, max_depth, max_token, max_item)
    assert scanner_violation(data, cuts, item_depth, max_depth, max_token, max_item) == expected


@pytest.mark.parametrize(("doc", "message"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32 levels"),
    (b'{"annotations": ["' + b"a" * (2 * 1024**2) + b'"]}', "single JSON value longer than"),
    (b'{"annotations": [' + b"1" * (2 * 1024**2) + b"]}", "single JSON value longer than"),
    (b'{"annotations": [[' + b"1," * (5 * 1024**2) + b"1]]}", "single JSON element larger than"),
    (b'{"annotations": [' + b" " * (2 * 1024**2) + b"1]}", "single JSON value longer than"),
])
def test_iter_json_items_refuses_with_file_and_byte(tmp_path: Path, doc: bytes, message: str) -> None:
    path = tmp_path / "doc.json.gz"
    path.write_bytes(gzip.compress(doc, 1))
    with pytest.raises(InputError, match=message) as info:
        list(iter_json_items(path, "annotations.item"))
    assert str(info.value).startswith(f"{path}: ") and "at byte" in str(info.value)


def test_json_within_limits_reads_as_before_and_sizes_add_up(tmp_path: Path) -> None:
    items = [{"id": i, "s": "x\\\"y" * i, "deep": [[[[{"a": [1]}]]]]} for i in range(3000)]
    doc = json.dumps({"info": {"v": 1}, "annotations": items}).encode()
    path = tmp_path / "doc.json"
    path.write_bytes(doc)
    records = list(iter_json_items(path, "annotations.item"))
    assert [r.raw for r in records] == items
    assert sum(r.size for r in records) <= len(doc) and sum(r.size for r in records) > len(doc) // 2


@pytest.mark.parametrize(("line", "ok"), [
    ('{"a": [[[1]]]}', True),
    ("[" * 32 + "]" * 32, True),
    ("[" * 33 + "]" * 33, False),
    ('{"a": "' + "[" * 100 + '"}', True),  # brackets inside a string are not nesting
    ("[" * 5000 + "]" * 5000, False),  # json.loads alone would raise RecursionError near 1,000
])
def test_parse_json_line_depth(line: str, ok: bool) -> None:
    if ok:
        assert parse_json_line(line) == json.loads(line)
    else:
        with pytest.raises(ValueError, match="nested deeper than 32"):
            parse_json_line(line)


# ------------------------------------------------------------------------------------------------ line caps
def reference_lines(data: bytes, max_line: int) -> list[bytes | OversizedLine]:
    out: list[bytes | OversizedLine] = []
    pieces = data.split(b"\n")
    for i, piece in enumerate(pieces):
        terminated = i < len(pieces) - 1
        if not terminated and not piece:
            break
        content = piece[:-1] if piece.endswith(b"\r") else piece
        if len(content) > max_line:
            out.append(OversizedLine(content[:min(2000, max_line)], len(content)))
        else:
            out.append(piece + b"\n" if terminated else piece)
    return out


lines_bytes = st.lists(st.sampled_from([b"a", b"bb", b"\n", b"\r", b"\r\n", b"xxxxxxxxxx", b"\xff", b"\x00"]),
                       max_size=60).map(b"".join)


class _SmallReads(io.BytesIO):
    """readline that returns at most 3 bytes per call beyond the limit asked: the skip loop gets exercised."""

    def readline(self, size=-1):
        return super().readline(min(size, 3) if size and size > 0 else 3)


@SETTINGS
@given(data=lines_bytes, max_line=st.integers(1, 12))
def test_read_lines_matches_split_for_any_bytes(data: bytes, max_line: int) -> None:
    got = list(read_lines(io.BytesIO(data), max_line))
    assert got == reference_lines(data, max_line)


@SETTINGS
@given(data=lines_bytes, lines_per=st.integers(1, 7), max_line=st.integers(1, 12), budget=st.integers(1, 40))
def test_blocks_and_ranges_give_iter_lines_records_under_any_caps(tmp_path_factory, data, lines_per, max_line,
                                                                  budget) -> None:
    path = tmp_path_factory.mktemp("lines") / "rows.tsv"
    path.write_bytes(data)
    gz = path.with_name("rows.tsv.gz")
    gz.write_bytes(gzip.compress(data))
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(inputs_module, "MAX_LINE_BYTES", max_line)
        mp.setattr(inputs_module, "CHUNK_BYTES", budget)
        mp.setattr(inputs_module, "_SCAN_BYTES", 8)
        expected = [(r.position, r.raw) for r in iter_lines(path)]
        ranges = list(iter_line_ranges(path, lines_per))
        blocks = list(iter_line_blocks(gz, lines_per))
        for chunks in (ranges, blocks):
            got = [(r.position, r.raw) for c in chunks for r in c.records()]
            # The chunk's own list of its over-long lines is what the shared limits read instead of every line.
            for c in chunks:
                lines = c.records()
                assert lines.oversized == tuple(i for i, raw in enumerate(lines.raws)
                                                if isinstance(raw, OversizedLine))
                # A range read as one buffer stays that buffer: the same lines, joined without a split and a join.
                if not lines.oversized:
                    assert c.records().joined() == b"\n".join(lines.raws)
                    assert len(c.records()) == len(lines.raws) == c.lines
            assert [pos for pos, _ in got] == [pos for pos, _ in expected]
            # iter_lines strips every trailing CR/LF, the block readers one CR: compare like with like.
            assert [_norm(raw) for _, raw in got] == [_norm(raw) for _, raw in expected]
            assert sum(c.lines for c in chunks) == len(expected)
            assert all(c.lines <= lines_per for c in chunks)
        # A range holds at most the budget, one scan buffer and the line that crossed them.
        for r in ranges:
            longest = max(len(line) + 1 for line in data[r.start:r.end].split(b"\n"))
            assert r.end - r.start <= budget + 8 + longest
    finally:
        mp.undo()


def _norm(raw):
    return raw if isinstance(raw, OversizedLine) else raw.rstrip(b"\r\n")


def test_ten_megabyte_line_is_one_rejection_and_the_rest_is_read(tmp_path: Path) -> None:
    body = b"a cat\thttp://x/1.jpg\n" + b"z" * 10_000_000 + b"\thttp://x/2.jpg\r\n" + b"a dog\thttp://x/3.jpg\n"
    for name, data in (("Train_GCC-training.tsv", body), ("Train_GCC-training.tsv.gz", gzip.compress(body, 1))):
        path = tmp_path / name
        path.write_bytes(data)
        adapter = create_adapter("conceptual_captions")
        rows = [out for chunk in iter_chunks(adapter, [path], 2) for out in _rows(adapter, chunk)]
        assert [(r.reason if not isinstance(r, Pair) else "pair", r.position if not isinstance(r, Pair) else None)
                for r in rows] == [("pair", None), (Reason.LINE_TOO_LONG, 2), ("pair", None)]
        assert rows[1].detail == "10,000,015 bytes > 4,194,304"  # the CR of its CRLF is the ending, not the line
        assert rows[1].record.startswith("zzz") and len(rows[1].record) <= 2001


def _rows(adapter, chunk):
    from pmd.sources.inputs import LineBlock, LineRange

    records = chunk.records() if isinstance(chunk, (LineBlock, LineRange)) else chunk
    for record in records:
        yield from adapter.convert_limited(record, None)


def test_chunks_of_records_are_cut_by_bytes() -> None:
    records = [Record("f", i, b"x" * 10) for i in range(10)]
    assert [len(c) for c in chunked(records, 100, max_bytes=35)] == [4, 4, 2]
    assert [len(c) for c in chunked(records, 3, max_bytes=1000)] == [3, 3, 3, 1]
    sized = [Record("f", i, {"a": 1}, size=20) for i in range(5)]
    assert [len(c) for c in chunked(sized, 100, max_bytes=40)] == [2, 2, 1]


# --------------------------------------------------------------------------------------------- caption limits
def test_every_source_has_caption_limits() -> None:
    for entry in load_catalog():
        limits = caption_limits(entry.name)
        assert limits.max_chars >= 300 and 50 <= limits.max_words <= 512
        assert limits.max_chars >= limits.max_words  # a word is at least one character


@SETTINGS
@given(text=st.lists(st.sampled_from(["a", " ", "\t", "\u00e9", "\u3000", "\n", "xyz"]), max_size=40).map("".join),
       max_chars=st.integers(1, 30), max_words=st.integers(1, 10))
def test_caption_limit_column_and_row_agree(text: str, max_chars: int, max_words: int) -> None:
    limits = CaptionLimits(max_chars, max_words)
    row = limits.problem(text) is not None
    expected = len(text) > max_chars or len(text.split()) > max_words
    assert row == expected
    assert limits.too_long_mask(pa.array([text])).to_pylist() == [row]


def test_too_long_caption_is_rejected_not_truncated(tmp_path: Path) -> None:
    limits = caption_limits("conceptual_captions")
    long_chars = "a" * (limits.max_chars + 1)
    many_words = " ".join(["w"] * (limits.max_words + 1))
    just_fits = " ".join(["w"] * limits.max_words)
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_text(f"{long_chars}\thttp://x/1.jpg\n{many_words}\thttp://x/2.jpg\n{just_fits}\thttp://x/3.jpg\n")
    adapter = create_adapter("conceptual_captions")
    pairs, rejects, counts = convert_chunk(adapter, adapter.prepare([path]), list(adapter.records([path])))
    assert pairs.column(schema.TEXT).to_pylist() == [just_fits]
    assert rejects.column(schema.REASON).to_pylist() == [Reason.TOO_LONG] * 2
    assert rejects.column(schema.POSITION).to_pylist() == [1, 2]
    assert rejects.column(schema.KEY).to_pylist() == ["conceptual_captions/Train_GCC-training/1",
                                                      "conceptual_captions/Train_GCC-training/2"]
    assert rejects.column(schema.DETAIL).to_pylist() == [f"{limits.max_chars + 1:,} characters > {limits.max_chars:,}",
                                                         f"{limits.max_words + 1:,} words > {limits.max_words:,}"]
    assert counts.records == 3 and counts.rows == 3


def test_too_long_on_the_columnar_path_keeps_the_record_position(tmp_path: Path) -> None:
    """YFCC converts a chunk in columns; an over-long description is found back to its line."""
    limits = caption_limits("yfcc100m")

    def row(photo_id: int, description: str) -> str:
        fields = [str(photo_id), "u@N00", "nick", "2010-01-01 00:00:00.0", "1262304000", "cam", "a+title",
                  description, "", "", "", "", "", f"http://www.flickr.com/photos/u/{photo_id}/",
                  f"http://farm1.staticflickr.com/1/{photo_id}_abc.jpg", "lic", "http://lic", "1", "1", "abc", "def",
                  "jpg", "0"]
        return "\t".join(fields)

    english = "+".join(["the", "dog", "runs", "on", "the", "beach"] * (limits.max_words // 6 + 1))
    short = "a+black+dog+runs+across+a+sunny+beach"
    path = tmp_path / "yfcc100m_dataset-0"
    path.write_text("\n".join([row(1, short), row(2, english), row(3, short)]) + "\n")
    adapter = create_adapter("yfcc100m")
    records = list(adapter.records([path]))
    pairs, rejects = adapter.convert_tables_limited(records, adapter.prepare([path]))
    assert pairs.column(schema.KEY).to_pylist() == ["yfcc100m/1", "yfcc100m/3"]
    rejected = rejects.to_pylist()
    assert [(r["key"], r["reason"], r["position"]) for r in rejected] == [("yfcc100m/2", Reason.TOO_LONG, 2)]
    assert rejected[0]["lang"] == "en"


@pytest.mark.parametrize("compressed", [False, True])
def test_a_yfcc_chunk_as_lines_converts_as_its_records_do(tmp_path: Path, monkeypatch, compressed: bool) -> None:
    """A line chunk reaches the columnar path as `Lines` (no object per line): the same pairs and rejections, in
    the same order, as the same records in a list, an over-long line and a malformed one included."""
    from tests.pmd.sources.hostile_cases import _YFCC_ROW

    monkeypatch.setattr(inputs_module, "MAX_LINE_BYTES", 2000)
    good = [str(6985418911 + i) + _YFCC_ROW[len("6985418911"):] for i in range(6)]
    lines = [good[0], good[1], "9\t" + "x" * 3000, good[2], "not\ta\tphoto", good[3], good[4]]
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / ("yfcc100m_dataset-0.gz" if compressed else "yfcc100m_dataset-0")
    path.write_bytes(gzip.compress(data) if compressed else data)
    adapter = create_adapter("yfcc100m")
    context = adapter.prepare([path])
    [chunk] = list(iter_chunks(adapter, [path], 100))
    as_lines = chunk.records()
    assert as_lines.oversized == (2,) and len(as_lines) == len(lines)
    as_list = list(as_lines)
    assert as_list == as_lines and [r.position for r in as_list] == list(range(1, len(lines) + 1))
    got = convert_chunk(adapter, context, as_lines)
    want = convert_chunk(adapter, context, as_list)
    assert got[0].equals(want[0]) and got[1].equals(want[1]) and got[2] == want[2]
    reasons = {r["position"]: r["reason"] for r in got[1].to_pylist()}
    assert reasons[3] == Reason.LINE_TOO_LONG and reasons[5] == Reason.WRONG_FIELD_COUNT
    assert got[0].num_rows + got[1].num_rows == len(lines)


@pytest.mark.parametrize(("source", "fixture", "name"), [
    ("coco", "karpathy_coco_sample.json", "dataset_coco.json"),
    ("conceptual_captions", "cc3m_sample.tsv", "Validation_GCC-1.1.0-Validation.tsv"),
    ("yfcc100m", "yfcc100m_sample.tsv", "yfcc100m_dataset-0"),
])  # (the WIT rows in tests/fixtures/real are none English: no pairs to measure)
def test_real_captions_sit_well_inside_their_limits(tmp_path: Path, source: str, fixture: str, name: str) -> None:
    """Upstream rows as published: none is too long, and the longest kept caption has at least 2x headroom."""
    from tests.real_fixtures import REAL

    path = tmp_path / name
    path.write_bytes((REAL / fixture).read_bytes())
    adapter = create_adapter(source)
    pairs, rejects, _ = convert_chunk(adapter, adapter.prepare([path]), list(adapter.records([path])))
    assert Reason.TOO_LONG not in rejects.column(schema.REASON).to_pylist()
    assert pairs.num_rows > 0
    limits = caption_limits(source)
    texts = pairs.column(schema.TEXT).to_pylist()
    assert 2 * max(map(len, texts)) <= limits.max_chars
    assert 2 * max(len(t.split()) for t in texts) <= limits.max_words


def test_lookup_tables_loaded_whole_are_capped(tmp_path: Path, monkeypatch) -> None:
    from pmd.sources import limits
    from pmd.sources.karpathy import eval_cocoids
    from pmd.sources.visual_genome import load_image_data

    monkeypatch.setattr(limits, "MAX_LOOKUP_ENTRIES", 3)
    image_data = tmp_path / "image_data.json"
    image_data.write_text(json.dumps([{"image_id": i, "url": f"https://x.org/VG_100K/{i}.jpg"} for i in range(3)]))
    assert len(load_image_data(image_data)) == 3
    image_data.write_text(json.dumps([{"image_id": i, "url": f"https://x.org/VG_100K/{i}.jpg"} for i in range(4)]))
    with pytest.raises(InputError, match="more than 3 image entries"):
        load_image_data(image_data)
    karpathy = tmp_path / "dataset_coco.json"
    images = [{"split": "val" if i % 2 else "test", "cocoid": i, "filepath": "val2014", "filename": f"{i}.jpg",
               "imgid": i, "sentences": []} for i in range(4)]
    karpathy.write_text(json.dumps({"images": images[:3]}))
    assert eval_cocoids(karpathy) == frozenset({0, 1, 2})
    karpathy.write_text(json.dumps({"images": images}))
    with pytest.raises(InputError, match="more than 3 val/test images"):
        eval_cocoids(karpathy)
