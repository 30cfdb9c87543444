"""Which text an English WIT row gives, by the rule of the PMD-lineage WIT loader (HuggingFace M4's PMD rebuild,
cited in docs/sources.md, "WIT text rule"):

1. `caption_reference_description` if it has at least 2 words;
2. else the English part of `caption_attribution_description` if it has at least 3 words;
3. else `caption_alt_text_description` if it has at least 3 words;
then every non-ASCII character is dropped from the chosen text. No field passing: no pair.

Words are counted as PMD counts them: the pieces of the raw field split on single spaces (`len(text.split(" "))`),
so an empty field counts 1 and a run of two spaces adds an empty piece. This is deliberately not
`pmd.text.word_count`: the floors only reproduce PMD's decisions with PMD's count.

The English part is found as PMD finds it. Commons renders a file description one language after another, each
behind its label: `English: Coin of Ukraine Русский: Юбилейная монета Украины` (a row of the TFDS WIT test shard).
When the lower-cased attribution contains `english:`, it is cut at every `": "`; a piece that starts or ends with
`english` (case-insensitive) is a label and the piece after it is the English text. That piece runs on into the
next label (`Coin of Ukraine Русский`) whenever another piece follows, so its last space-separated word is dropped.
A later label match overrides an earlier one. The known blind spots are PMD's and are kept: `English :` (space
before the colon) is not found, a two-word next label (`Bahasa Indonesia:`) leaves its first word behind, and an
English sentence holding `Note: ` is cut there.

A chosen text that is empty or blank once non-ASCII characters are dropped and whitespace is collapsed (the
cleaning every source gets) is `empty_text`. PMD drops the empty ones too and emits the blank ones as they are; it
never falls back to the next field for either, and neither does this rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmd.sources.base import Reason
from pmd.text import clean_caption

REFERENCE = "caption_reference_description"
ATTRIBUTION = "caption_attribution_description"
ALT_TEXT = "caption_alt_text_description"


def pmd_words(text: str) -> int:
    """PMD's word count of a raw WIT field: its pieces between single spaces."""
    return len(text.split(" "))


def english_attribution(attribution: str) -> str | None:
    """The English part of a WIT attribution description as PMD extracts it (raw, uncleaned); None when it finds
    none (no `english:` in the text, or a label with nothing after it)."""
    if "english:" not in attribution.lower():
        return None
    pieces = attribution.split(": ")
    english = None
    for i, piece in enumerate(pieces):
        label = piece.strip().lower()
        if not (label.startswith("english") or label.endswith("english")) or i + 1 >= len(pieces):
            continue
        english = pieces[i + 1].strip()
        if i + 2 < len(pieces):  # the piece ends with the next piece's language label
            english = " ".join(english.split(" ")[:-1]).strip()
    return english


def ascii_only(text: str) -> str:
    """The text without its non-ASCII characters, as PMD keeps captions."""
    return text.encode("ascii", "ignore").decode("ascii")


@dataclass(frozen=True)
class TextRule:
    """PMD's rule by default; every setting is a `WitOptions` option."""

    min_reference_words: int = 2
    min_attribution_words: int = 3
    min_alt_text_words: int = 3
    fallback: bool = True  # False: the reference description only
    ascii_only: bool = True  # False: non-ASCII characters are kept (not PMD's text)

    def __post_init__(self) -> None:
        floors = (self.min_reference_words, self.min_attribution_words, self.min_alt_text_words)
        if min(floors) < 1:
            raise ValueError(f"word-count floors must be at least 1, got {floors}")


@dataclass(frozen=True)
class TextChoice:
    field: str | None  # the column the text came from; None when the row gives no pair
    text: str
    reason: str | None  # Reason.EMPTY_TEXT or Reason.TOO_SHORT when the row gives no pair
    detail: str  # why the row gives no pair: one verdict per field tried, or the chosen field's


def choose_text(reference: str, attribution: str, alt_text: str, rule: TextRule = TextRule()) -> TextChoice:
    """The text of an English WIT row under `rule` (fields raw, as parsed from the TSV)."""
    candidates = [(REFERENCE, lambda: reference, rule.min_reference_words)]
    if rule.fallback:
        candidates += [(ATTRIBUTION, lambda: english_attribution(attribution), rule.min_attribution_words),
                       (ALT_TEXT, lambda: alt_text, rule.min_alt_text_words)]
    verdicts = []
    any_text = False
    for field, read, floor in candidates:
        raw = read()  # the attribution is parsed only when the reference fails, as in PMD
        if raw is None:
            verdicts.append(f"{field}: no English part")
            continue
        words = pmd_words(raw)
        if words >= floor:
            text = clean_caption(ascii_only(raw) if rule.ascii_only else raw)
            if text:
                return TextChoice(field, text, None, "")
            dropped = "non-ASCII characters dropped and " if rule.ascii_only else ""
            return TextChoice(None, "", Reason.EMPTY_TEXT,
                              f"{field}: chosen ({words} words), blank once {dropped}whitespace collapsed")
        blank = not raw.strip()
        any_text = any_text or not blank
        verdicts.append(f"{field}: {'empty' if blank else f'{words} words < {floor}'}")
    return TextChoice(None, "", Reason.TOO_SHORT if any_text else Reason.EMPTY_TEXT, "; ".join(verdicts))
