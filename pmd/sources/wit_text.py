"""Which text a WIT row gives: the reference description, else the English part of the attribution description,
else the alt text, each kept only above its word-count floor (docs/sources.md, "WIT text rule").

The attribution description is the Commons file description as rendered, one language after another, each behind
its label: `English: Coin of Ukraine Русский: Юбилейная монета Украины` (a row of the TFDS WIT test shard). The
English part runs from `English:` to the next language label. A label is recognised as a known language name
(`Deutsch:`, `Italiano:`, ...) or as one word with a non-ASCII letter (`Русский:`, `Français :`), so an English
sentence holding `Note:` keeps it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pmd.sources.base import Reason
from pmd.text import clean_caption, word_count

REFERENCE = "caption_reference_description"
ATTRIBUTION = "caption_attribution_description"
ALT_TEXT = "caption_alt_text_description"

# Language names Commons writes with ASCII letters only (the others are caught by their non-ASCII letters).
_ASCII_LABELS = (
    "Afrikaans", "Alemannisch", "Asturianu", "Bahasa Indonesia", "Bahasa Melayu", "Bosanski", "Brezhoneg", "Cymraeg",
    "Dansk", "Deutsch", "Eesti", "Esperanto", "Euskara", "Frysk", "Gaeilge", "Galego", "Hrvatski", "Ido",
    "Interlingua", "Italiano", "Kiswahili", "Latina", "Magyar", "Malti", "Nederlands", "Norsk", "Occitan", "Polski",
    "Rumantsch", "Shqip", "Srpski", "Suomi", "Svenska", "Tagalog", "Walon", "Zazaki",
)
_LABEL = re.compile(
    r"(?:^|(?<=\s))(?:" + "|".join(re.escape(n) for n in _ASCII_LABELS) + r"|[^\W\d_]*[^\x00-\x7f][^\W\d_]*)"
    r"(?:\s*[(（][^()（）]{1,40}[)）])?\s?:(?=\s|$)")
_ENGLISH = re.compile(r"(?:^|(?<=\s))English\s?:")


def english_attribution(attribution: str) -> str:
    """The English part of a WIT attribution description (cleaned), or "" when it has none."""
    match = _ENGLISH.search(attribution)
    if match is None:
        return ""
    rest = attribution[match.end():]
    following = _LABEL.search(rest)
    return clean_caption(rest[:following.start()] if following else rest)


@dataclass(frozen=True)
class TextFloors:
    """Minimum word counts per field; a field below its floor is passed over for the next one."""

    reference: int
    attribution: int
    alt_text: int


@dataclass(frozen=True)
class TextChoice:
    field: str | None  # the column the text came from; None when no field passed
    text: str
    reason: str | None  # Reason.EMPTY_TEXT or Reason.TOO_SHORT when no field passed
    detail: str  # one verdict per field tried, for the rejection


def choose_text(reference: str, attribution: str, alt_text: str, floors: TextFloors,
                fallback: bool = True) -> TextChoice:
    """The first field whose cleaned text meets its floor, in PMD's order; without `fallback`, the reference only."""
    candidates = [(REFERENCE, clean_caption(reference), floors.reference)]
    if fallback:
        candidates += [(ATTRIBUTION, english_attribution(attribution), floors.attribution),
                       (ALT_TEXT, clean_caption(alt_text), floors.alt_text)]
    verdicts = []
    any_text = False
    for field, text, floor in candidates:
        words = word_count(text)
        if text and words >= floor:
            return TextChoice(field, text, None, "")
        any_text = any_text or bool(text)
        verdicts.append(f"{field}: {'empty' if not text else f'{words} words < {floor}'}")
    return TextChoice(None, "", Reason.TOO_SHORT if any_text else Reason.EMPTY_TEXT, "; ".join(verdicts))
