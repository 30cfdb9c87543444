"""WIT text rule, as the PMD-lineage WIT loader applies it (docs/sources.md, "WIT text rule"): reference description
(>= 2 words), else the English part of the attribution (>= 3), else the alt text (>= 3), words counted as pieces
between single spaces, non-ASCII characters dropped. Every expected value below was worked out by hand from that
loader's code, quirks included.

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
from pmd.sources.wit_text import (ALT_TEXT, ATTRIBUTION, REFERENCE, TextRule, ascii_only, choose_text,
                                  english_attribution, pmd_words)
from tests.real_fixtures import REAL

TFDS = REAL / "wit_tfds"
TRAIN = "wit_v1.train.all-00000-of-00010.tsv"


def tfds_rows(name: str) -> list[dict[str, str]]:
    """The shard read the way the TFDS builder (and PMD's loader) reads it."""
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
    attributions = [r["caption_attribution_description"]
                    for name in ("train-00000-of-00009.tsv", "test-00000-of-00005.tsv") for r in tfds_rows(name)]
    assert attributions == ["Galego: Logo do Movemento Galego ao Socialismo",
                            "English: Lesser bulldog bat (Noctilio albiventris)",
                            "English: Coin of Ukraine Русский: Юбилейная монета Украины",
                            "Italiano: Gruppo di M94"]
    assert [english_attribution(a) for a in attributions] == [
        None, "Lesser bulldog bat (Noctilio albiventris)", "Coin of Ukraine", None]


@pytest.mark.parametrize("attribution, english", [
    ("Deutsch: Eine Brücke English: A bridge over the river", "A bridge over the river"),
    ("English: Harbour at dusk Italiano: Porto al tramonto", "Harbour at dusk"),
    ("ENGLISH: Harbour at dusk", "Harbour at dusk"),
    ("  English:  Harbour at dusk  ", "Harbour at dusk"),
    # PMD's blind spots, kept: a cut at "Note: ", a two-word next label, no space after the colon, one before it.
    ("English: The old mill. Note: demolished in 1950 Français : Le vieux moulin", "The old mill."),
    ("English: Map Bahasa Indonesia: Peta", "Map Bahasa"),
    ("English:Harbour at dusk", None),
    ("English : Harbour at dusk", None),
    # A later label wins, and an English text that itself starts with "English" reads as a label.
    ("Deutsch: Brücke English: Bridge Italiano: Ponte English: Second bridge", "Second bridge"),
    ("English: English Channel coast Deutsch: Ärmelkanal", "Ärmelkanal"),
    ("English: ", ""),
    ("Photo taken in English Harbour", None),
    ("Svenska: Hamnen", None),
    ("", None),
])
def test_english_part(attribution, english):
    assert english_attribution(attribution) == english


def test_pmd_word_count_and_ascii():
    assert [pmd_words(t) for t in ("", "Bridge", "Tower Bridge", "Tower  Bridge", "Tower\tBridge", " Tower")] == \
        [1, 1, 2, 3, 1, 2]
    assert ascii_only("Café “Flore” — Paris") == "Caf Flore  Paris"


def test_choose_text_order_and_floors():
    rule = TextRule()
    assert (rule.min_reference_words, rule.min_attribution_words, rule.min_alt_text_words) == (2, 3, 3)
    reference = choose_text("Tower Bridge", "English: A bridge over the Thames", "Bridge at night")
    assert (reference.field, reference.text) == (REFERENCE, "Tower Bridge")
    # A one-word reference is passed over (PMD's floor is 2); so is one made two "words" by a tab.
    for short in ("Bridge", "Tower\tBridge"):
        attribution = choose_text(short, "English: A bridge over the Thames", "Bridge at night")
        assert (attribution.field, attribution.text) == (ATTRIBUTION, "A bridge over the Thames")
    alt = choose_text("", "English: Bridge", "The bridge at night")
    assert (alt.field, alt.text) == (ALT_TEXT, "The bridge at night")
    # Two spaces make three "words": PMD takes this alt text.
    doubled = choose_text("", "", "Bridge  night")
    assert (doubled.field, doubled.text) == (ALT_TEXT, "Bridge night")
    short = choose_text("", "English: Bridge", "Bridge.jpg")
    assert (short.field, short.reason, short.detail) == (
        None, Reason.TOO_SHORT, ("caption_reference_description: empty; caption_attribution_description: 1 words < 3; "
                                 "caption_alt_text_description: 1 words < 3"))
    empty = choose_text("", "Deutsch: Eine Brücke", "")
    assert (empty.field, empty.reason, empty.detail) == (
        None, Reason.EMPTY_TEXT, ("caption_reference_description: empty; caption_attribution_description: no English "
                                  "part; caption_alt_text_description: empty"))


def test_non_ascii_dropped_after_the_choice():
    cafe = choose_text("Café de Flore, Paris", "", "")
    assert (cafe.field, cafe.text) == (REFERENCE, "Caf de Flore, Paris")
    kept = choose_text("Café de Flore, Paris", "", "", TextRule(ascii_only=False))
    assert (kept.field, kept.text) == (REFERENCE, "Café de Flore, Paris")
    # The reference passes its floor, so PMD takes it and never looks at the attribution, even when nothing of it is
    # left: the row gives no pair (PMD would emit the one remaining space).
    cyrillic = choose_text("Юбилейная монета", "English: Jubilee coin of Ukraine", "")
    assert (cyrillic.field, cyrillic.reason, cyrillic.detail) == (
        None, Reason.EMPTY_TEXT, ("caption_reference_description: chosen (2 words), blank once non-ASCII characters "
                                  "dropped and whitespace collapsed"))
    assert choose_text("Юбилейная монета", "", "", TextRule(ascii_only=False)).text == "Юбилейная монета"
    blank = choose_text("  ", "English: A bridge over the Thames", "", TextRule(ascii_only=False))
    assert (blank.reason, blank.detail) == (
        Reason.EMPTY_TEXT, "caption_reference_description: chosen (3 words), blank once whitespace collapsed")


def test_rule_settings():
    off = choose_text("Bridge", "English: A bridge over the Thames", "The bridge at night", TextRule(fallback=False))
    assert (off.field, off.reason, off.detail) == (None, Reason.TOO_SHORT, "caption_reference_description: 1 words < 2")
    one = choose_text("Bridge", "English: A bridge over the Thames", "", TextRule(min_reference_words=1))
    assert (one.field, one.text) == (REFERENCE, "Bridge")
    with pytest.raises(ValueError, match="at least 1"):
        TextRule(min_alt_text_words=0)
    with pytest.raises(ValueError, match="at least 1"):
        create_adapter("wit", {"min_alt_text_words": "0"})


def real_shaped_rows() -> list[dict[str, str]]:
    """The four real TFDS rows made English, then crafted rows on the last real train row's fields."""
    real = [dict(r, language="en") for name in ("train-00000-of-00009.tsv", "test-00000-of-00005.tsv")
            for r in tfds_rows(name)]
    bat = real[1]
    crafted = [
        dict(bat, caption_attribution_description="Deutsch: Kleines Hasenmaul",  # alt-text only
             caption_alt_text_description="A bat hanging from a branch"),
        dict(bat, caption_reference_description="Lesser bulldog bat"),  # reference
        dict(bat, caption_reference_description="Bat"),  # a one-word reference: PMD falls back to the attribution
        dict(bat, caption_attribution_description="English : Lesser bulldog bat",  # a label PMD does not see
             caption_alt_text_description="bat.jpg"),
        dict(bat, caption_reference_description="Murciélago pescador menor"),  # non-ASCII dropped
    ]
    return real + crafted


def test_adapter_on_real_shaped_english_rows(tmp_path):
    """Decisions in meta and texts are exact; the share of English rows kept under PMD's rule and the reference-only
    rule is pinned."""
    path = write(tmp_path / TRAIN, real_shaped_rows())
    out = list(create_adapter("wit").iter_converted([path]))
    kinds = [(type(o).__name__, o.reason if isinstance(o, Reject) else json.loads(o.meta)["text_field"]) for o in out]
    assert kinds == [("Reject", Reason.EMPTY_TEXT), ("Pair", ATTRIBUTION), ("Pair", ATTRIBUTION), ("Pair", REFERENCE),
                     ("Pair", ALT_TEXT), ("Pair", REFERENCE), ("Pair", ATTRIBUTION), ("Reject", Reason.TOO_SHORT),
                     ("Pair", REFERENCE)]
    assert [o.text for o in out if isinstance(o, Pair)] == [
        "Lesser bulldog bat (Noctilio albiventris)", "Coin of Ukraine", "Mappa del Canes Venatici I Cloud",
        "A bat hanging from a branch", "Lesser bulldog bat", "Lesser bulldog bat (Noctilio albiventris)",
        "Murcilago pescador menor"]
    assert out[0].detail == ("caption_reference_description: empty; caption_attribution_description: no English part; "
                             "caption_alt_text_description: empty")
    assert out[7].detail == ("caption_reference_description: empty; caption_attribution_description: no English part; "
                             "caption_alt_text_description: 1 words < 3")
    # The four real rows: 3 of 4 kept by PMD's rule, 1 of 4 by the reference-only rule; all nine: 7 and 3.
    reference_only = list(create_adapter("wit", {"text_fallback": "false"}).iter_converted([path]))
    assert [type(o).__name__ for o in reference_only] == [
        "Reject", "Reject", "Reject", "Pair", "Reject", "Pair", "Reject", "Reject", "Pair"]
    strict = list(create_adapter("wit", {"min_attribution_words": "6"}).iter_converted([path]))
    assert [o.reason for o in strict if isinstance(o, Reject)] == [Reason.EMPTY_TEXT] + [Reason.TOO_SHORT] * 4


def test_real_shards_as_published(tmp_path):
    """Unchanged, the real rows are all non-English; the test shard ends inside a quoted field (malformed)."""
    train = tmp_path / TRAIN
    train.write_bytes((TFDS / "train-00000-of-00009.tsv").read_bytes())
    test = tmp_path / "wit_v1.test.all-00000-of-00005.tsv"
    test.write_bytes((TFDS / "test-00000-of-00005.tsv").read_bytes())
    out = list(create_adapter("wit").iter_converted([train, test]))
    assert [(o.reason, o.position) for o in out] == [
        (Reason.NOT_ENGLISH, 2), (Reason.NOT_ENGLISH, 4), (Reason.NOT_ENGLISH, 5), (Reason.MALFORMED, 2)]
