"""WIT adapter: header check, csv quoting (fields with tabs, newlines, quotes), English filter, rejections."""

from __future__ import annotations

import csv
import gzip
import io
import json
import pickle
import random
from pathlib import Path

import pytest

from pmd.sources import create_adapter
from pmd.sources import wit
from pmd.sources.base import InputError, Pair, Reason, Record, Reject
from pmd.sources.base import meta_json
from pmd.sources.wit import COLUMNS, WitAdapter, WitOptions, group_rows, quote_open_after, shard_id, split_of
from pmd.text import clean_caption

HEADER = "\t".join(COLUMNS).encode() + b"\n"
TRAIN = "wit_v1.train.all-00000-of-00010.tsv.gz"


def row(**values: str) -> dict[str, str]:
    base = {
        "language": "en",
        "page_url": "https://en.wikipedia.org/wiki/Tower_Bridge",
        "image_url": "https://upload.wikimedia.org/wikipedia/commons/6/63/Tower_Bridge_from_Shad_Thames.jpg",
        "page_title": "Tower Bridge",
        "section_title": "History",
        "hierarchical_section_title": "Tower Bridge / History",
        "caption_reference_description": "Tower Bridge seen from Shad Thames",
        "caption_attribution_description": "English: Tower Bridge from Shad Thames",
        "caption_alt_text_description": "",
        "mime_type": "image/jpeg",
        "original_height": "2304",
        "original_width": "3072",
        "is_main_image": "false",
        "attribution_passes_lang_id": "true",
        "page_changed_recently": "true",
        "context_page_description": "Tower Bridge is a Grade I listed combined bascule and suspension bridge.",
        "context_section_description": "",
    }
    base.update(values)
    return base


def tsv(rows: list[dict[str, str]]) -> bytes:
    """Rows in the upstream dialect: tab-delimited, QUOTE_MINIMAL, "\\n" line ends (what csv.writer produces)."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerows([[r[c] for c in COLUMNS] for r in rows])
    return out.getvalue().encode()


def write_shard(path: Path, body: bytes, header: bytes = HEADER) -> Path:
    data = header + body
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def run(inputs: list[Path]) -> list[Pair | Reject]:
    return list(WitAdapter().iter_converted(inputs))


MULTILINE = row(
    caption_reference_description='The  "bascules"\traised\nfor a ship',
    context_page_description='Tower Bridge is a bridge.\nIt was built "between 1886 and 1894".\n',
    original_height="",
    is_main_image="TRUE",
)


EMPTY = row(caption_reference_description="  ", caption_attribution_description="Deutsch: Die Brücke",
            caption_alt_text_description="")


def test_shard(tmp_path: Path) -> None:
    bad_utf8 = b"en\thttps://en.wikipedia.org/wiki/X\thttps://upload.wikimedia.org/x.jpg\tCaf\xe9" + b"\t" * 13 + b"\n"
    body = (
        tsv([MULTILINE])                                     # lines 2-5
        + tsv([row(language="de", caption_reference_description="Die Brücke")])  # line 6
        + tsv([EMPTY])                                       # line 7
        + tsv([row(image_url="upload.wikimedia.org/x.jpg")])  # line 8
        + b"en\tonly\tthree fields\n"                        # line 9
        + bad_utf8                                           # line 10
        + b"\n"                                              # line 11
        + tsv([row(language="fr")])                          # line 12
        + b'en\t"never closed\tand so on\n'                  # line 13
        + tsv([row(page_title="Last")])                      # line 14
    )
    path = write_shard(tmp_path / TRAIN, body)
    file = str(path)
    key = "wit/wit_v1.train.all-00000-of-00010"
    default_meta = {c: v for c, v in row().items()
                    if c not in ("language", "image_url", "caption_reference_description")}
    default_meta.update(original_height=2304, original_width=3072, is_main_image=False,
                        attribution_passes_lang_id=True, page_changed_recently=True)
    expected = [
        Pair(key=f"{key}/2", text='The "bascules" raised for a ship', split="train", image_url=row()["image_url"],
             meta=(
                 '{"attribution_passes_lang_id":true,'
                 '"caption_alt_text_description":"",'
                 '"caption_attribution_description":"English: Tower Bridge from Shad Thames",'
                 '"context_page_description":'
                 '"Tower Bridge is a bridge.\\nIt was built \\"between 1886 and 1894\\".\\n",'
                 '"context_section_description":"",'
                 '"hierarchical_section_title":"Tower Bridge / History",'
                 '"is_main_image":true,'
                 '"mime_type":"image/jpeg",'
                 '"original_height":null,'
                 '"original_width":3072,'
                 '"page_changed_recently":true,'
                 '"page_title":"Tower Bridge",'
                 '"page_url":"https://en.wikipedia.org/wiki/Tower_Bridge",'
                 '"section_title":"History",'
                 '"text_field":"caption_reference_description"}'
             )),
        Reject(reason=Reason.NOT_ENGLISH, input_file=file, position=6, detail="language=de", key=f"{key}/6"),
        Reject(reason=Reason.EMPTY_TEXT, input_file=file, position=7,
               # Two spaces are three words to PMD: the reference is chosen, and blank.
               detail="caption_reference_description: chosen (3 words), blank once non-ASCII characters dropped and "
                      "whitespace collapsed",
               key=f"{key}/7", record=tsv([EMPTY]).decode().rstrip("\n")),
        Reject(reason=Reason.NO_URL, input_file=file, position=8, key=f"{key}/8",
               detail="not an http(s) URL: 'upload.wikimedia.org/x.jpg'",
               record=tsv([row(image_url="upload.wikimedia.org/x.jpg")]).decode().rstrip("\n")),
        Reject(reason=Reason.WRONG_FIELD_COUNT, input_file=file, position=9, detail="expected 17 fields, got 3",
               record="en\tonly\tthree fields"),
        Reject(reason=Reason.INVALID_UTF8, input_file=file, position=10,
               record=bad_utf8.decode("utf-8", "backslashreplace").rstrip("\n")),
        Reject(reason=Reason.MALFORMED, input_file=file, position=11, detail="blank line", record=""),
        Reject(reason=Reason.NOT_ENGLISH, input_file=file, position=12, detail="language=fr", key=f"{key}/12"),
        Reject(reason=Reason.MALFORMED, input_file=file, position=13, detail="quoted field never closed",
               record='en\t"never closed\tand so on'),
        Pair(key=f"{key}/14", text="Tower Bridge seen from Shad Thames", split="train", image_url=row()["image_url"],
             meta=meta_json({**default_meta, "page_title": "Last", "text_field": "caption_reference_description"})),
    ]
    assert run([path]) == expected


def test_multiline_row_is_one_record(tmp_path: Path) -> None:
    path = write_shard(tmp_path / TRAIN, tsv([MULTILINE, row()]))
    records = list(WitAdapter().records([path]))
    assert [r.position for r in records] == [2, 6]
    assert records[0].raw == tsv([MULTILINE]).rstrip(b"\n")


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("wit_v1.train.all-00009-of-00010.tsv.gz", "train"),
        ("wit_v1.val.all-00000-of-00005.tsv.gz", "validation"),
        ("wit_v1.test.all-00004-of-00005.tsv.gz", "test"),
        ("wit_v1.test.all-00004-of-00005.tsv", "test"),
    ],
)
def test_split_and_key_from_file_name(tmp_path: Path, name: str, split: str) -> None:
    path = write_shard(tmp_path / name, tsv([row()]))
    [pair] = run([path])
    assert pair.split == split
    assert pair.key == f"wit/{name.removesuffix('.gz').removesuffix('.tsv')}/2"


def test_several_shards_keep_distinct_keys(tmp_path: Path) -> None:
    a = write_shard(tmp_path / "wit_v1.train.all-00000-of-00010.tsv.gz", tsv([row(), row()]))
    b = write_shard(tmp_path / "wit_v1.val.all-00000-of-00005.tsv.gz", tsv([row()]))
    assert [(p.key, p.split) for p in run([a, b])] == [
        ("wit/wit_v1.train.all-00000-of-00010/2", "train"),
        ("wit/wit_v1.train.all-00000-of-00010/3", "train"),
        ("wit/wit_v1.val.all-00000-of-00005/2", "validation"),
    ]


def test_agrees_with_the_tfds_csv_reader(tmp_path: Path) -> None:
    """Random fields full of tabs, newlines and quotes: same rows, fields and start lines as csv.DictReader. (Every
    reference is taken as it is, so the text shows the parse, not the text rule.)"""
    rng = random.Random(7)
    alphabet = ['a', 'b', ' ', '\t', '\n', '"', 'é', '""']

    def junk() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))

    rows = [row(language=rng.choice(["en", "en", "fr"]), caption_reference_description=junk() + "x",
                page_title=junk(), context_page_description=junk(), context_section_description=junk())
            for _ in range(300)]
    path = write_shard(tmp_path / TRAIN, tsv(rows))
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        expected, start = [], 2
        for parsed in reader:
            key = f"wit/wit_v1.train.all-00000-of-00010/{start}"
            if parsed["language"] == "en":
                expected.append((key, clean_caption(parsed["caption_reference_description"]),
                                 parsed["context_page_description"], parsed["context_section_description"]))
            else:
                expected.append((key, Reason.NOT_ENGLISH))
            start = reader.line_num + 1
    got = [(item.key, item.text, json.loads(item.meta)["context_page_description"],
            json.loads(item.meta)["context_section_description"]) if isinstance(item, Pair)
           else (item.key, item.reason)
           for item in WitAdapter(WitOptions(min_reference_words=1, ascii_only=False)).iter_converted([path])]
    assert len(expected) == 300
    assert got == expected


def test_stray_quote_costs_one_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wit, "MAX_ROW_LINES", 3)
    body = tsv([row()]) + b'en\t"stray\n' + tsv([row()] * 5)
    path = write_shard(tmp_path / TRAIN, body)
    result = run([path])
    assert [(type(r).__name__, r.position if isinstance(r, Reject) else r.key.rsplit("/", 1)[1]) for r in result] == [
        ("Pair", "2"), ("Reject", 3), ("Pair", "4"), ("Pair", "5"), ("Pair", "6"), ("Pair", "7"), ("Pair", "8"),
    ]
    assert result[1].reason == Reason.MALFORMED


def test_quote_open_after() -> None:
    assert not quote_open_after(b"a\tb")
    assert quote_open_after(b'a\t"b')
    assert not quote_open_after(b'a\t"b""c"\td')
    assert quote_open_after(b'a\t"b""')  # an escaped quote, still inside
    assert not quote_open_after(b'a\tb"c')  # a quote inside an unquoted field is literal
    assert quote_open_after(b'"x"y\t"z')
    assert not quote_open_after(b'end."\tnext', in_quotes=True)
    assert quote_open_after(b'still "" inside', in_quotes=True)


def test_group_rows_at_end_of_file() -> None:
    # A quote opened and never closed: the opening line alone, then the rest read again as rows.
    lines = [Record("f", 2, b'en\t"open'), Record("f", 3, b"plain"), Record("f", 4, b"x\ty")]
    assert list(group_rows(lines)) == lines
    # A later quote closes it, as csv's reader would have it.
    closing = [Record("f", 2, b'en\t"open'), Record("f", 3, b"plain"), Record("f", 4, b'"x"\ty')]
    assert list(group_rows(closing)) == [Record("f", 2, b'en\t"open\nplain\n"x"\ty')]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (HEADER.replace(b"caption_reference_description", b"caption_reference"),
         "missing caption_reference_description; unexpected 'caption_reference'"),
        (HEADER.replace(b"\tcontext_section_description", b""), "missing context_section_description"),
        (HEADER.replace(b"language\tpage_url", b"page_url\tlanguage"), "different order"),
        (b"", "missing language"),  # no header: the first data row is read as one
    ],
)
def test_bad_header(tmp_path: Path, header: bytes, message: str) -> None:
    path = write_shard(tmp_path / TRAIN, tsv([row()]), header=header)
    with pytest.raises(InputError, match=message) as info:
        run([path])
    assert info.value.path == str(path) and info.value.position == 1


def test_empty_shard(tmp_path: Path) -> None:
    path = write_shard(tmp_path / TRAIN, b"", header=b"")
    with pytest.raises(InputError, match="empty file") as info:
        run([path])
    assert info.value.path == str(path)


def test_header_only_shard(tmp_path: Path) -> None:
    assert run([write_shard(tmp_path / TRAIN, b"")]) == []


def test_crlf_line_ends(tmp_path: Path) -> None:
    path = write_shard(tmp_path / TRAIN, tsv([row()]).replace(b"\n", b"\r\n"), header=HEADER.replace(b"\n", b"\r\n"))
    [pair] = run([path])
    assert isinstance(pair, Pair) and json.loads(pair.meta)["context_section_description"] == ""


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / TRAIN
    path.write_bytes(gzip.compress(HEADER + tsv([row()] * 200))[:-30])
    with pytest.raises(InputError) as info:
        run([path])
    assert info.value.path == str(path) and "truncated" in str(info.value)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["wit.csv"], "not a WIT shard"),
        (["wit_v1.all-00000-of-00010.tsv.gz"], "cannot tell the split"),
        (["a/wit_v1.train.all-00000-of-00010.tsv.gz", "b/wit_v1.train.all-00000-of-00010.tsv"], "given twice"),
    ],
)
def test_bad_inputs(tmp_path: Path, names: list[str], message: str) -> None:
    paths = []
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        paths.append(write_shard(tmp_path / name, tsv([row()])))
    with pytest.raises(InputError, match=message):
        run(paths)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        run([tmp_path / TRAIN])


def test_helpers() -> None:
    assert split_of("/data/wit_v1.val.all-00003-of-00005.tsv.gz") == "validation"
    assert split_of("wit_v1.train.all-00003-of-00010.tsv.gz") == "train"
    assert split_of("wit_v1.all.tsv") is None
    assert shard_id("/data/wit_v1.val.all-00003-of-00005.tsv.gz") == "wit_v1.val.all-00003-of-00005"


def test_registry_and_pickling(tmp_path: Path) -> None:
    adapter = create_adapter("wit")
    assert isinstance(adapter, WitAdapter) and adapter.inputs_help
    path = write_shard(tmp_path / TRAIN, tsv([MULTILINE, row(language="de")]))
    records = pickle.loads(pickle.dumps(list(adapter.records([path]))))
    clone = pickle.loads(pickle.dumps(adapter))
    assert [x for r in records for x in clone.convert(r, None)] == run([path])
