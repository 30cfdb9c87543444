"""WIT text rule: reference description, else the English part of the attribution, else the alt text, with floors.

Real rows: the TFDS WIT test shards (tests/fixtures/real/wit_tfds, none English); English rows are made from them by
changing only `language`, so the attribution strings the rule parses are as Commons wrote them.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from pmd.sources import create_adapter
from pmd.sources.base import Pair, Reason, Reject
from pmd.sources.wit import COLUMNS
from pmd.sources.wit_text import ALT_TEXT, ATTRIBUTION, REFERENCE, TextFloors, choose_text, english_attribution
from tests.real_fixtures import REAL

TFDS = REAL / "wit_tfds"
FLOORS = TextFloors(reference=1, attribution=3, alt_text=3)


def tfds_rows(name: str) -> list[dict[str, str]]:
    """The shard read the way the TFDS builder reads it."""
    text = (TFDS / name).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_MINIMAL))


def write(path: Path, rows: list[dict[str, str]]) -> Path:
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([[r[c] for c in COLUMNS] for r in rows])
    path.write_text(out.getvalue(), encoding="utf-8")
    return path


def test_english_part_of_real_attributions():
    attributions = [r["caption_attribution_description"] for r in tfds_rows("train-00000-of-00009.tsv")]
    assert attributions == ["Galego: Logo do Movemento Galego ao Socialismo",
                            "English: Lesser bulldog bat (Noctilio albiventris)",
                            "English: Coin of Ukraine Русский: Юбилейная монета Украины"]
    assert [english_attribution(a) for a in attributions] == [
        "", "Lesser bulldog bat (Noctilio albiventris)", "Coin of Ukraine"]


@pytest.mark.parametrize("attribution, english", [
    ("Deutsch: Eine Brücke English: A bridge over the river", "A bridge over the river"),
    ("English: The old mill. Note: demolished in 1950 Français : Le vieux moulin", "The old mill. Note: demolished in 1950"),
    ("English: Harbour at dusk Italiano: Porto al tramonto", "Harbour at dusk"),
    ("English : Harbour\nat  dusk", "Harbour at dusk"),
    ("English: Map 中文（简体）: 地图", "Map"),
    ("Svenska: Hamnen", ""),
    ("SimpleEnglish: nothing here", ""),
    ("", ""),
])
def test_english_part(attribution, english):
    assert english_attribution(attribution) == english


def test_choose_text_order_and_floors():
    assert choose_text("A bridge", "English: A bridge over the Thames", "Bridge at night", FLOORS) == \
        choose_text("A bridge", "", "", FLOORS)
    first = choose_text("A bridge", "English: A bridge over the Thames", "", FLOORS)
    assert (first.field, first.text) == (REFERENCE, "A bridge")
    attribution = choose_text(" ", "English: A bridge over the Thames", "Bridge at night", FLOORS)
    assert (attribution.field, attribution.text) == (ATTRIBUTION, "A bridge over the Thames")
    alt = choose_text("", "English: Bridge", "The bridge at night", FLOORS)
    assert (alt.field, alt.text) == (ALT_TEXT, "The bridge at night")
    short = choose_text("", "English: Bridge", "Bridge.jpg", FLOORS)
    assert (short.field, short.reason) == (None, Reason.TOO_SHORT)
    assert short.detail == ("caption_reference_description: empty; caption_attribution_description: 1 words < 3; "
                            "caption_alt_text_description: 1 words < 3")
    empty = choose_text("", "Deutsch: Eine Brücke", "", FLOORS)
    assert (empty.field, empty.reason) == (None, Reason.EMPTY_TEXT)
    off = choose_text("", "English: A bridge over the Thames", "The bridge at night", FLOORS, fallback=False)
    assert (off.field, off.reason, off.detail) == (None, Reason.EMPTY_TEXT, "caption_reference_description: empty")
    floor = choose_text("Bridge", "", "", TextFloors(reference=2, attribution=3, alt_text=3))
    assert floor.reason == Reason.TOO_SHORT


def test_adapter_on_real_shaped_english_rows(tmp_path):
    """The three real train rows made English (their reference descriptions are empty: attribution-only rows),
    plus an alt-text-only and a reference row. Counts and the decision in meta are exact."""
    rows = [dict(r, language="en") for r in tfds_rows("train-00000-of-00009.tsv")]
    rows.append(dict(rows[1], caption_attribution_description="Deutsch: Kleines Hasenmaul",
                     caption_alt_text_description="A bat hanging from a branch"))
    rows.append(dict(rows[1], caption_reference_description="Lesser bulldog bat"))
    path = write(tmp_path / "wit_v1.train.all-00000-of-00010.tsv", rows)
    out = list(create_adapter("wit").iter_converted([path]))
    kinds = [(type(o).__name__, o.reason if isinstance(o, Reject) else json.loads(o.meta)["text_field"]) for o in out]
    assert kinds == [("Reject", Reason.EMPTY_TEXT), ("Pair", ATTRIBUTION), ("Pair", ATTRIBUTION),
                     ("Pair", ALT_TEXT), ("Pair", REFERENCE)]
    assert [o.text for o in out if isinstance(o, Pair)] == [
        "Lesser bulldog bat (Noctilio albiventris)", "Coin of Ukraine", "A bat hanging from a branch",
        "Lesser bulldog bat"]
    assert out[0].detail.startswith("caption_reference_description: empty; caption_attribution_description: empty")
    # The reference-only rule PMD's loaders do not use keeps 1 of these 5 English rows; PMD's rule keeps 4.
    reference_only = list(create_adapter("wit", {"text_fallback": "false"}).iter_converted([path]))
    assert [type(o).__name__ for o in reference_only] == ["Reject", "Reject", "Reject", "Reject", "Pair"]
    strict = list(create_adapter("wit", {"min_attribution_words": "4"}).iter_converted([path]))
    assert [o.reason for o in strict if isinstance(o, Reject)] == [Reason.EMPTY_TEXT, Reason.TOO_SHORT]


def test_real_shards_as_published(tmp_path):
    """Unchanged, the real rows are all non-English; the test shard ends inside a quoted field (malformed)."""
    train = tmp_path / "wit_v1.train.all-00000-of-00010.tsv"
    train.write_bytes((TFDS / "train-00000-of-00009.tsv").read_bytes())
    test = tmp_path / "wit_v1.test.all-00000-of-00005.tsv"
    test.write_bytes((TFDS / "test-00000-of-00005.tsv").read_bytes())
    out = list(create_adapter("wit").iter_converted([train, test]))
    assert [(o.reason, o.position) for o in out] == [
        (Reason.NOT_ENGLISH, 2), (Reason.NOT_ENGLISH, 4), (Reason.NOT_ENGLISH, 5), (Reason.MALFORMED, 2)]


def test_floors_are_checked():
    with pytest.raises(ValueError, match="at least 1"):
        create_adapter("wit", {"min_alt_text_words": "0"})
