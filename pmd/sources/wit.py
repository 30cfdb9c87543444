"""WIT (Wikipedia-based Image Text): gzipped TSV shards with a 17-column header, English rows only.

Shards: `wit_v1.train.all-0000{0..9}-of-00010.tsv.gz`, `wit_v1.{val,test}.all-0000{0..4}-of-00005.tsv.gz`; the split
comes from the file name (`val` -> `validation`).

Quoting. The TFDS `wit` builder reads the shards with `csv.DictReader(f, delimiter="\\t",
quoting=csv.QUOTE_MINIMAL)`, and its dummy shards (copied from the real ones) show why: a field holding a tab, a
newline or a quote is written in double quotes with inner quotes doubled, and context descriptions often span
several physical lines. A plain split on tabs and newlines would cut such rows apart. So `records()` groups the
physical lines of one logical row (tracking only whether a quoted field is still open, which is all the csv dialect
needs, on bytes so that invalid UTF-8 stays a per-row rejection), and `convert()` parses that row with the same
csv dialect. A quote left open is given up on after `MAX_ROW_LINES` lines or `MAX_ROW_BYTES` bytes: the opening
line becomes its own row (rejected as malformed) and the lines after it are read again, so one stray quote costs
one row, not the rest of the shard.

Keys are `wit/{shard}/{line}`, the 1-based line where the row starts (the header is line 1).

Text: PMD's rule (`pmd/sources/wit_text.py`, settings in `WitOptions`): the reference description, else the English
part of the attribution description, else the alt text, each above PMD's word floor, non-ASCII characters dropped;
`meta.text_field` names the column used.
"""

from __future__ import annotations

import csv
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmd.sources.base import (InputError, OversizedLine, Pair, Reason, Record, Reject, SourceAdapter, decode_line,
                              meta_json, reject)
from pmd.sources.inputs import (decode_utf8, input_location, input_name, iter_lines, require_file,
                                strip_compression_suffix)
from pmd.sources.wit_text import TextRule, choose_text

COLUMNS: tuple[str, ...] = (
    "language",
    "page_url",
    "image_url",
    "page_title",
    "section_title",
    "hierarchical_section_title",
    "caption_reference_description",
    "caption_attribution_description",
    "caption_alt_text_description",
    "mime_type",
    "original_height",
    "original_width",
    "is_main_image",
    "attribution_passes_lang_id",
    "page_changed_recently",
    "context_page_description",
    "context_section_description",
)
_LANGUAGE = COLUMNS.index("language")
_IMAGE_URL = COLUMNS.index("image_url")
_TEXT = COLUMNS.index("caption_reference_description")
_ATTRIBUTION = COLUMNS.index("caption_attribution_description")
_ALT_TEXT = COLUMNS.index("caption_alt_text_description")
META_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in ("language", "image_url",
                                                                     "caption_reference_description"))
_META_FIELDS: tuple[tuple[str, int], ...] = tuple((c, COLUMNS.index(c)) for c in META_COLUMNS)
_INT_COLUMNS = frozenset({"original_height", "original_width"})
_BOOL_COLUMNS = frozenset({"is_main_image", "attribution_passes_lang_id", "page_changed_recently"})

MAX_ROW_LINES = 1000
MAX_ROW_BYTES = 8 * 1024 * 1024

# As in the TFDS builder: long context descriptions exceed csv's default 128 KiB field limit. (Rows are capped at
# MAX_ROW_BYTES by the grouping anyway.)
csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))

_SPLIT = re.compile(r"(?:^|[._-])(train|val|validation|test)(?=[._-]|$)")
_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
_QUOTE, _TAB = 0x22, b"\t"


def split_of(file_name: str) -> str | None:
    """`wit_v1.val.all-00000-of-00005.tsv.gz` -> `validation`; None when the name names no split."""
    match = _SPLIT.search(Path(file_name.split("!")[-1]).name.lower())
    return _SPLITS[match.group(1)] if match else None


def shard_id(file_name: str) -> str:
    """The shard's name without `.tsv` and compression suffixes: part of the key."""
    name = strip_compression_suffix(Path(file_name.split("!")[-1]).name)
    return name[:-4] if name.lower().endswith(".tsv") else name


def quote_open_after(line: bytes, in_quotes: bool = False) -> bool:
    """Whether a quoted field is still open at the end of `line`, reading it the way csv's reader does
    (tab-delimited, `"` quotes a field only at its start, `""` inside quotes is a literal quote)."""
    pos, end = 0, len(line)
    while True:
        if in_quotes or (pos < end and line[pos] == _QUOTE):
            if not in_quotes:
                pos += 1
            in_quotes = False
            while True:
                quote = line.find(b'"', pos)
                if quote < 0:
                    return True
                if quote + 1 < end and line[quote + 1] == _QUOTE:
                    pos = quote + 2
                    continue
                pos = quote + 1
                break
        tab = line.find(_TAB, pos)
        if tab < 0:
            return False
        pos = tab + 1


def group_rows(lines: Iterable[Record]) -> Iterator[Record]:
    """Physical lines -> logical TSV rows (lines joined by `\\n`), positioned at the row's first line."""
    source = iter(lines)
    backlog: deque[Record] = deque()
    pending: list[Record] = []
    size = 0
    while True:
        line = backlog.popleft() if backlog else next(source, None)
        if line is None:
            if not pending:
                return
            # The file ended inside a quoted field: give up on the opening line only and re-read the rest.
            yield pending[0]
            backlog.extend(pending[1:])
            pending, size = [], 0
            continue
        if isinstance(line.raw, OversizedLine):  # a row of its own (rejected as line_too_long)
            if pending:  # the quote left open cannot close across it: give up on the opening line, re-read
                backlog.appendleft(line)
                yield pending[0]
                backlog.extendleft(reversed(pending[1:]))
                pending, size = [], 0
            else:
                yield line
            continue
        if not pending:
            if b'"' not in line.raw or not quote_open_after(line.raw):
                yield line
                continue
            pending, size = [line], len(line.raw)
            continue
        pending.append(line)
        size += len(line.raw) + 1
        if not quote_open_after(line.raw, in_quotes=True):
            yield Record(pending[0].input_file, pending[0].position, b"\n".join(r.raw for r in pending))
            pending, size = [], 0
        elif len(pending) >= MAX_ROW_LINES or size > MAX_ROW_BYTES:
            yield pending[0]
            backlog.extendleft(reversed(pending[1:]))
            pending, size = [], 0


def _meta_value(column: str, value: str) -> Any:
    if column in _INT_COLUMNS:
        if not value:
            return None
        try:
            return int(value)
        except ValueError:
            return value
    if column in _BOOL_COLUMNS:
        lowered = value.lower()
        return True if lowered == "true" else False if lowered == "false" else (None if not value else value)
    return value


@dataclass(frozen=True)
class WitOptions:
    # PMD's text rule (pmd/sources/wit_text.py): the reference description, else the English part of the attribution
    # description, else the alt text. False keeps the reference description only.
    text_fallback: bool = True
    # Word-count floors per field, in PMD's count (pieces between single spaces); the defaults are PMD's.
    min_reference_words: int = 2
    min_attribution_words: int = 3
    min_alt_text_words: int = 3
    # PMD drops every non-ASCII character from the caption ("Café" -> "Caf"); False keeps them.
    ascii_only: bool = True


class WitAdapter(SourceAdapter):
    name = "wit"
    Options = WitOptions
    inputs_help = ("WIT TSV shards wit_v1.{train,val,test}.all-NNNNN-of-NNNNN.tsv.gz "
                   "(17-column header; English rows kept)")

    def __init__(self, options: WitOptions | None = None):
        self.options = options or WitOptions()
        self._rule = TextRule(self.options.min_reference_words, self.options.min_attribution_words,
                              self.options.min_alt_text_words, self.options.text_fallback, self.options.ascii_only)

    def prepare(self, inputs: Sequence[Path]) -> None:
        """Nothing to load: a record converts from itself and the options."""
        return None

    def records(self, inputs: Sequence[Path]) -> Iterator[Record]:
        shards: dict[str, Path] = {}
        for path in map(input_location, inputs):
            name = input_name(path)
            if not strip_compression_suffix(name).lower().endswith(".tsv"):
                raise InputError(path, f"not a WIT shard; expected {self.inputs_help}")
            if split_of(name) is None:
                raise InputError(path, "cannot tell the split (train, val or test) from the file name")
            shard = shard_id(name)
            if shard in shards:
                raise InputError(path, f"shard {shard} given twice (also {shards[shard]}): keys would repeat")
            shards[shard] = require_file(path)
        for path in shards.values():
            yield from self._shard_records(path)

    def _shard_records(self, path: Path) -> Iterator[Record]:
        headers_seen = 0

        def check_header(line: bytes) -> bool:
            nonlocal headers_seen
            headers_seen += 1
            _check_header(path, line)
            return True

        yield from group_rows(iter_lines(path, skip_header=check_header))
        if not headers_seen:
            raise InputError(path, "empty file: no WIT header row")

    def convert(self, record: Record, context: None) -> Iterator[Pair | Reject]:
        line = decode_line(record)
        if isinstance(line, Reject):
            yield line
            return
        if quote_open_after(record.raw):
            yield reject(record, Reason.MALFORMED, "quoted field never closed")
            return
        try:
            fields = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_MINIMAL))
        except csv.Error as exc:
            yield reject(record, Reason.MALFORMED, f"csv: {exc}")
            return
        if len(fields) != len(COLUMNS):
            yield reject(record, Reason.WRONG_FIELD_COUNT, f"expected {len(COLUMNS)} fields, got {len(fields)}")
            return
        key = f"{self.name}/{shard_id(record.input_file)}/{record.position}"
        language = fields[_LANGUAGE]
        if language != "en":
            # ~28M of WIT's 37.6M rows: the position finds the row again, so the row text is not kept.
            yield Reject(Reason.NOT_ENGLISH, record.input_file, record.position, f"language={language}", key=key)
            return
        url = fields[_IMAGE_URL].strip()
        if not url.lower().startswith(("http://", "https://")):
            yield reject(record, Reason.NO_URL, f"not an http(s) URL: {url[:100]!r}", key=key)
            return
        choice = choose_text(fields[_TEXT], fields[_ATTRIBUTION], fields[_ALT_TEXT], self._rule)
        if choice.field is None:
            yield reject(record, choice.reason, choice.detail, key=key)
            return
        text = choice.text
        meta = {column: _meta_value(column, fields[i]) for column, i in _META_FIELDS}
        meta["text_field"] = choice.field
        yield Pair(
            key=key,
            text=text,
            split=split_of(record.input_file) or "train",
            meta=meta_json(meta),
            image_url=url,
        )


def _check_header(path: Path, line: bytes) -> None:
    header = decode_utf8(line.rstrip(b"\r\n"))
    if header is None:
        raise InputError(path, "header row is not valid UTF-8", 1)
    names = header.lstrip("\ufeff").split("\t")
    if tuple(names) == COLUMNS:
        return
    missing = [c for c in COLUMNS if c not in names]
    unexpected = [c for c in names if c not in COLUMNS]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {', '.join(repr(c[:60]) for c in unexpected[:5])}")
    if not problems:
        problems.append("columns in a different order or repeated")
    raise InputError(path, f"not the 17-column WIT header ({'; '.join(problems)})", 1)
