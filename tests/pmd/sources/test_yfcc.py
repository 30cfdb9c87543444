import bz2
import json
from pathlib import Path

import pytest

from pmd.sources import create_adapter
from pmd.sources.base import InputError, Pair, Reject
from pmd.sources.yfcc import _FIELDS_25
from tests.real_fixtures import REAL as REAL_FIXTURES

REAL = REAL_FIXTURES / "yfcc100m_sample.tsv"


def yfcc_line(photo_id: int, title: str = "", description: str = "", marker: str = "0", line_number: int = 0,
              url: str | None = None) -> str:
    """A 25-field yfcc100m_dataset line; title/description given already URL-encoded, as upstream."""
    row = dict.fromkeys(_FIELDS_25, "")
    row.update(line_number=str(line_number), photo_id=str(photo_id), photo_hash="a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6",
               user_nsid="12345678@N00", user_nickname="some+one", date_taken="2010-05-01 10:00:00.0",
               date_uploaded="1272708000", capture_device="Canon+EOS+400D", title=title, description=description,
               user_tags="beach,summer+holiday", longitude="2.35", latitude="48.85", accuracy="16",
               page_url=f"http://www.flickr.com/photos/12345678@N00/{photo_id}/",
               download_url=url if url is not None else f"http://farm4.staticflickr.com/3001/{photo_id}_abcdef1234.jpg",
               license_name="Attribution+License", license_url="http://creativecommons.org/licenses/by/2.0/",
               server_id="3001", farm_id="4", secret="abcdef1234", secret_original="1234abcdef", extension="jpg",
               marker=marker)
    return "\t".join(row[f] for f in _FIELDS_25)


def run(tmp_path: Path, lines: list[str], name: str = "yfcc100m_dataset", **options) -> list:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    adapter = create_adapter("yfcc100m", {k: str(v) for k, v in options.items()})
    return list(adapter.iter_converted([path]))


def test_real_23_field_rows():
    out = list(create_adapter("yfcc100m").iter_converted([REAL]))
    assert [o.key for o in out] == ["yfcc100m/7088065", "yfcc100m/343224206", "yfcc100m/6325727670",
                                    "yfcc100m/10642543105"]
    assert all(isinstance(o, Pair) for o in out)
    gnome, muppet, fog, album = out
    assert gnome.text == "This gnome just appeared three stories up at school one day."
    assert json.loads(gnome.meta)["text_field"] == "description"
    assert gnome.image_url == "http://farm1.staticflickr.com/8/7088065_65c9d45e09.jpg"
    # No description: the title is the fallback and passes (3 words, English).
    assert muppet.text == "Team Muppet Show"
    assert json.loads(muppet.meta)["text_field"] == "title"
    # %0A newlines, %21, %26 decoded and collapsed.
    assert fog.text.startswith("This scene greeted me on the way to work yesterday morning. I hope the 1 hour")
    assert "B&W." in fog.text and "\n" not in fog.text and "  " not in fog.text
    assert album.text.startswith("Photographer: Johnstone O'Shannessy, 3 Bourke St, Melbourne Photos 0537-0623")
    for pair in out:
        assert pair.lang == "en" and 0.5 <= pair.lang_score <= 1.0
        meta = json.loads(pair.meta)
        assert "title" not in meta and "description" not in meta
    assert json.loads(fog.meta)["user_tags"].startswith("australia,b%26w,beautiful,black+and+white")


def test_english_description_wins_over_title(tmp_path):
    [pair] = run(tmp_path, [yfcc_line(1, title="Sunset+over+the+harbour",
                                      description="A+long+walk+along+the+beach+at+low+tide")])
    assert pair.text == "A long walk along the beach at low tide"
    assert json.loads(pair.meta)["text_field"] == "description"


def test_non_english_description_falls_back_to_english_title(tmp_path):
    [pair] = run(tmp_path, [yfcc_line(2, title="Sunset+over+the+harbour",
                                      description="Wir+waren+gestern+im+Zoo+und+haben+die+Elefanten+gesehen.")])
    assert pair.text == "Sunset over the harbour"
    assert json.loads(pair.meta)["text_field"] == "title"
    assert pair.lang == "en"


def test_two_word_description_falls_back_to_title(tmp_path):
    [pair] = run(tmp_path, [yfcc_line(3, title="My+dog+playing+in+the+snow", description="Great+shot")])
    assert pair.text == "My dog playing in the snow"


def test_neither_passes_is_rejected_with_reason(tmp_path):
    out = run(tmp_path, [
        yfcc_line(4, title="Sonnenuntergang+am+Hafen", description="Mein+Hund+spielt+im+Schnee"),
        yfcc_line(5, title="IMG_2031", description=""),
        yfcc_line(6, title="", description=""),
        yfcc_line(7, title="Great+shot", description="Coucher+de+soleil+sur+le+port"),
    ])
    assert all(isinstance(o, Reject) for o in out)
    assert [(o.key, o.reason) for o in out] == [
        ("yfcc100m/4", "not_english"), ("yfcc100m/5", "too_short"), ("yfcc100m/6", "empty_text"),
        ("yfcc100m/7", "too_short")]
    assert out[0].lang == "de" and out[0].lang_score > 0.5
    assert "description: not_english (de" in out[0].detail and "title: not_english (de" in out[0].detail
    assert out[0].position == 1 and out[0].input_file.endswith("yfcc100m_dataset")
    assert out[0].record is None  # filter rejects: key and line find the row; no raw copy


def test_html_and_urls_and_encoding_cleaned(tmp_path):
    description = ("Taken+at+%3Ca+href%3D%22http%3A%2F%2Fexample.com%2Fx%22%3Ethe+old+mill%3C%2Fa%3E+"
                   "near+the+river.%0A%0ASee+more+at+http%3A%2F%2Fwww.example.com%2Fgallery+and+www.photos.org"
                   "+%26amp%3B+enjoy%21")
    [pair] = run(tmp_path, [yfcc_line(8, description=description)])
    assert pair.text == "Taken at the old mill near the river. See more at and & enjoy!"


def test_video_rows_dropped_with_reason(tmp_path):
    out = run(tmp_path, [yfcc_line(9, description="A+video+of+the+parade+downtown", marker="1")])
    assert [(o.key, o.reason) for o in out] == [("yfcc100m/9", "video")]


def test_bad_rows_are_rejected_not_fatal(tmp_path):
    path = tmp_path / "yfcc100m_dataset"
    good = yfcc_line(10, description="A+walk+along+the+river+after+the+rain")
    with open(path, "wb") as f:
        f.write(b"only\tthree\tfields\n")
        f.write(yfcc_line(11, description="Bad+%ff+byte").encode().replace(b"Bad", b"B\xffad") + b"\n")
        f.write(good.replace("\t10\t", "\tnotanid\t", 1).encode() + b"\n")
        f.write(good.encode() + b"\n")
    out = list(create_adapter("yfcc100m").iter_converted([path]))
    assert [(type(o).__name__, o.reason if isinstance(o, Reject) else o.key) for o in out] == [
        ("Reject", "wrong_field_count"), ("Reject", "invalid_utf8"), ("Reject", "malformed"),
        ("Pair", "yfcc100m/10")]
    assert [o.position for o in out if isinstance(o, Reject)] == [1, 2, 3]


def test_bz2_input_and_truncated_bz2(tmp_path):
    lines = [yfcc_line(i, description="Kids+at+the+beach+on+a+sunny+day") for i in range(200)]
    data = bz2.compress("".join(line + "\n" for line in lines).encode())
    (tmp_path / "yfcc100m_dataset.bz2").write_bytes(data)
    out = list(create_adapter("yfcc100m").iter_converted([tmp_path / "yfcc100m_dataset.bz2"]))
    assert len(out) == 200 and all(isinstance(o, Pair) for o in out)
    (tmp_path / "cut.bz2").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.bz2"):
        list(create_adapter("yfcc100m").iter_converted([tmp_path / "cut.bz2"]))


def test_threshold_option(tmp_path):
    line = yfcc_line(12, title="Team+Muppet+Show")  # English at ~0.58
    [kept] = run(tmp_path, [line])
    assert isinstance(kept, Pair)
    [dropped] = run(tmp_path, [line], lang_threshold=0.9)
    assert dropped.reason == "not_english" and dropped.lang == "en"
    with pytest.raises(ValueError, match="lang_threshold"):
        create_adapter("yfcc100m", {"lang_threshold": "1.5"})
    with pytest.raises(ValueError, match=r"source 'yfcc100m': options: unknown key\(s\) \['threshold'\]"):
        create_adapter("yfcc100m", {"threshold": "0.5"})


def test_pmd_subset_jsonl(tmp_path):
    lines = [
        json.dumps({"image_url": "http://farm3.staticflickr.com/2823/10642543105_129f2fbe19.jpg",
                    "texts": ["Fog rolling in over the hills this morning"], "source": "yfcc100m",
                    "meta": "{\"photoid\": 10642543105}"}),
        json.dumps({"image_url": "http://farm3.staticflickr.com/2823/555_129f2fbe19.jpg",
                    "texts": ["Hafen", "Boats in the marina at dusk"], "source": "yfcc100m", "meta": "{}"}),
        "{not json",
    ]
    out = run(tmp_path, lines, name="yfcc100m_subset.jsonl", refilter_subset=True)
    assert [(type(o).__name__, o.key) for o in out] == [
        ("Pair", "yfcc100m/10642543105"), ("Pair", "yfcc100m/555"), ("Reject", None)]
    assert out[1].text == "Boats in the marina at dusk" and json.loads(out[1].meta)["text_field"] == "texts[1]"
    assert out[1].lang == "en" and out[1].lang_score >= 0.5
    assert out[2].reason == "malformed"


def test_pmd_subset_takes_texts0_as_is_by_default(tmp_path):
    """PMD's loaders take texts[0] of yfcc100m_subset.jsonl unfiltered: a one-word German text is kept, no LID."""
    lines = [
        json.dumps({"image_url": "http://farm3.staticflickr.com/2823/555_129f2fbe19.jpg",
                    "texts": ["Hafen", "Boats in the marina at dusk"], "source": "yfcc100m", "meta": "{}"}),
        json.dumps({"image_url": "http://farm3.staticflickr.com/2823/556_129f2fbe19.jpg",
                    "texts": ["  Two   words "], "source": "yfcc100m", "meta": "{}"}),
        json.dumps({"image_url": "http://farm3.staticflickr.com/2823/557_129f2fbe19.jpg",
                    "texts": [], "source": "yfcc100m", "meta": "{}"}),
        json.dumps({"image_url": "http://farm3.staticflickr.com/2823/558_129f2fbe19.jpg",
                    "texts": [7, "a string second"], "source": "yfcc100m", "meta": "{}"}),
    ]
    out = run(tmp_path, lines, name="yfcc100m_subset.jsonl")
    assert [(type(o).__name__, o.key) for o in out] == [
        ("Pair", "yfcc100m/555"), ("Pair", "yfcc100m/556"), ("Reject", "yfcc100m/557"), ("Reject", "yfcc100m/558")]
    assert out[0].text == "Hafen" and json.loads(out[0].meta)["text_field"] == "texts[0]"
    assert out[0].lang is None and out[0].lang_score is None
    assert out[1].text == "Two words"
    assert out[2].reason == out[3].reason == "empty_text"
    refiltered = run(tmp_path, lines[:2], name="yfcc100m_subset.jsonl", refilter_subset="true")
    assert refiltered[0].text == "Boats in the marina at dusk" and refiltered[1].reason == "too_short"


def test_meta_holds_every_other_field_as_published(tmp_path):
    """meta is encoded by polars; it must equal the generic encoder's JSON (sorted keys, compact, raw UTF-8)."""
    from pmd.sources.base import meta_json
    from pmd.sources.yfcc import _FIELDS_23, _NOT_META

    pairs = list(create_adapter("yfcc100m").iter_converted([REAL]))
    for line, pair in zip(REAL.read_text(encoding="utf-8").splitlines(), pairs):
        text_field = json.loads(pair.meta)["text_field"]
        expected = {n: v for n, v in zip(_FIELDS_23, line.split("\t")) if n not in _NOT_META}
        assert pair.meta == meta_json(expected | {"text_field": text_field})
    fields = yfcc_line(1, description="A+walk+along+the+river+after+the+rain").split("\t")
    fields[4] = 'say "hi"\\ \x01 ünï'  # needs JSON escapes
    [pair] = run(tmp_path, ["\t".join(fields)])
    expected = {n: v for n, v in zip(_FIELDS_25, fields) if n not in _NOT_META} | {"text_field": "description"}
    assert pair.meta == meta_json(expected)
    assert json.loads(pair.meta)["user_nickname"] == 'say "hi"\\ \x01 ünï'


def test_whole_chunk_fast_path_equals_the_per_line_path():
    """A clean chunk (ASCII, one layout) is checked on its joined lines; the same lines beside one bad line (which
    sends the chunk through the per-line checks) give the same pairs and rejects, plus that line's reject."""
    from pmd.sources.base import Record

    adapter = create_adapter("yfcc100m")
    lines = [yfcc_line(100 + i, title="Old+church+in+the+village" if i % 3 else "",
                       description=["A+walk+along+the+river+after+the+rain", "Der+Hund+spielt+im+Schnee",
                                    "two+words", "%3Cb%3ESunset%3C%2Fb%3E+over+the+harbour+%26amp%3B+boats"][i % 4],
                       marker="1" if i == 7 else "0") for i in range(24)]
    records = [Record(raw=line.encode(), input_file="f", position=i) for i, line in enumerate(lines)]
    bad = Record(raw=b"only\tthree\tfields", input_file="f", position=99)
    fast = adapter.convert_tables(records, None)
    slow = adapter.convert_tables([*records, bad], None)
    assert fast[0].equals(slow[0]) and fast[0].num_rows > 0
    assert slow[1].num_rows == fast[1].num_rows + 1 and fast[1].num_rows > 0
    assert slow[1].slice(1).equals(fast[1])
    assert slow[1].column("reason")[0].as_py() == "wrong_field_count"


def test_ragged_chunk_with_the_right_tab_total_takes_the_per_line_checks():
    """The whole-chunk check counts the chunk's tabs, not each line's: a line with three fields too many beside one
    with three too few has the right total, and must still give both lines their own reject, the others unchanged."""
    from pmd.sources.base import Record

    adapter = create_adapter("yfcc100m")
    lines = [yfcc_line(100 + i, description="A+walk+along+the+river+after+the+rain") for i in range(6)]
    records = [Record(raw=line.encode(), input_file="f", position=i) for i, line in enumerate(lines)]
    long_fields = lines[2].split("\t") + ["x", "y", "z"]
    short_fields = lines[4].split("\t")[:-3]  # 22: not the 23-field layout either
    ragged = list(records)
    ragged[2] = Record(raw="\t".join(long_fields).encode(), input_file="f", position=2)
    ragged[4] = Record(raw="\t".join(short_fields).encode(), input_file="f", position=4)
    assert sum(r.raw.count(b"\t") for r in ragged) == 24 * len(ragged)
    pairs, rejects = adapter.convert_tables(ragged, None)
    assert rejects.column("reason").to_pylist() == ["wrong_field_count", "wrong_field_count"]
    assert rejects.column("position").to_pylist() == [2, 4]
    assert [d.split()[-1] for d in rejects.column("detail").to_pylist()] == ["28", "22"]
    clean_pairs, _ = adapter.convert_tables([records[i] for i in (0, 1, 3, 5)], None)
    assert pairs.equals(clean_pairs) and pairs.num_rows == 4
