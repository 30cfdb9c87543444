"""The adapter protocol: upstream files -> records -> pairs or rejections.

An adapter is split in three so the expensive part can run anywhere (in-process or as Ray tasks):
- `prepare(inputs) -> context` loads what converting a record needs besides the record itself (Visual Genome's
  image data, the Karpathy decontamination ids), once, on the driver, checking the inputs it reads. The context is a
  plain picklable value, small enough to ship to every worker once (docs/sources.md lists each adapter's); None
  for adapters that need nothing.
- `records(inputs)` streams raw records out of the upstream files, in order, each with its position, in constant
  memory. It raises `InputError` for what cannot be read at all (missing file, wrong format, truncated archive).
- `convert(record, context)` turns one record into zero or more `Pair`s and/or `Reject`s. It is a pure function
  of its arguments and the adapter's options (never of what `prepare` or `records` did on this instance), so a
  fresh instance in another process given the same context gives the same rows; it never raises for a bad row:
  a bad row is a `Reject` with a reason.
Adapters hold nothing but their options, and never write files: the ingest stage does.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from pmd import redact, schema
from pmd.reasons import Reason

#: What `prepare` returns and `convert` takes: any picklable value (None when the adapter needs nothing).
Context = Any


class InputError(Exception):
    """An input that cannot be read at all. The message names the file (and the line when there is one)."""

    def __init__(self, path: str | Path, message: str, position: int | None = None):
        self.path = str(path)
        self.position = position
        where = f"{self.path}:{position}" if position is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class Record:
    """One raw upstream record. `raw` is bytes for line formats, a parsed JSON value for JSON formats."""

    input_file: str
    position: int
    raw: Any
    #: Bytes the record took in its file, when the reader knows (JSON elements); else estimated by `nbytes`.
    size: int = field(default=0, compare=False)

    def nbytes(self) -> int:
        """About how many upstream bytes this record holds: what a chunk's byte budget counts."""
        if self.size:
            return self.size
        raw = self.raw
        parts = raw.values() if isinstance(raw, dict) else raw if isinstance(raw, (tuple, list)) else (raw,)
        return sum(len(p) if isinstance(p, (bytes, str)) else len(p.head) if isinstance(p, OversizedLine) else 16
                   for p in parts)


@dataclass(frozen=True, slots=True)
class OversizedLine:
    """Stands for the `raw` of a line longer than `limits.MAX_LINE_BYTES`: its first bytes and its full length.
    The rest of the line was skipped, never held; the shared path (`SourceAdapter.convert_limited`) rejects it
    before any adapter rule sees it."""

    head: bytes
    length: int


class Lines(Sequence[Record]):
    """Consecutive lines of one input as a sequence of `Record`s made on access: a chunk of a line source holds its
    lines (bytes, or an `OversizedLine`) in one list instead of one object per line. `oversized` lists the indices of
    the `OversizedLine`s, so the shared limits need not look at every line, and a columnar adapter takes `raws` and
    `positions` as columns. `Lines.block` keeps a chunk read as one buffer as that buffer: the list of lines is made
    only when something asks for it, and `joined()` is the buffer itself (a CSV reader's input, no split and join)."""

    __slots__ = ("input_file", "first_line", "_raws", "_joined", "_count", "oversized")

    def __init__(self, input_file: str, first_line: int, raws: list, oversized: Sequence[int] = ()):
        self.input_file, self.first_line, self._raws = input_file, first_line, raws
        self._joined: bytes | None = None
        self._count = len(raws)
        self.oversized = tuple(oversized)

    @classmethod
    def block(cls, input_file: str, first_line: int, data: bytes, count: int) -> Lines:
        """The ``count`` lines of ``data``: whole lines, each ended by a newline (the last one may lack it), no CR,
        none over-long (the caller checked, and counted them in the same pass)."""
        lines = cls(input_file, first_line, [])
        lines._raws, lines._joined, lines._count = None, data[:-1] if data.endswith(b"\n") else data, count
        return lines

    @property
    def raws(self) -> list:
        if self._raws is None:
            self._raws = self._joined.split(b"\n") if self._count else []
        return self._raws

    def joined(self) -> bytes:
        """The lines joined by newlines (only for lines that are all bytes: no `OversizedLine`)."""
        return self._joined if self._joined is not None else b"\n".join(self.raws)

    @property
    def positions(self) -> range:
        return range(self.first_line, self.first_line + self._count)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        return Record(self.input_file, self.first_line + index, self.raws[index])

    def __iter__(self) -> Iterator[Record]:
        name, first = self.input_file, self.first_line
        return (Record(name, first + i, raw) for i, raw in enumerate(self.raws))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Lines):
            return (self.input_file, self.first_line, self.raws) == (other.input_file, other.first_line, other.raws)
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable raws, as a list

    def __repr__(self) -> str:
        return f"Lines({self.input_file!r}, first_line={self.first_line}, {self._count} lines)"


@dataclass(frozen=True, slots=True)
class Crop:
    """The region of the image a pair is about, in pixels of the upright full-size image (the `crop` column)."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Pair:
    key: str
    text: str
    split: str
    meta: str
    image_url: str | None = None
    image_ref: str | None = None
    lang: str | None = None
    lang_score: float | None = None
    #: Set by adapters whose text describes a region (Visual Genome); the image stage crops to it.
    crop: Crop | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str
    input_file: str
    position: int
    detail: str = ""
    record: str | None = None
    key: str | None = None
    lang: str | None = None
    lang_score: float | None = None


MAX_RECORD_CHARS = 2000


def record_text(raw: Any) -> str:
    """The raw record as text for a rejects table: enough to find and inspect the row, capped in size."""
    if isinstance(raw, OversizedLine):
        raw = raw.head
    elif isinstance(raw, tuple):  # SBU's text layout: (url line, caption line)
        raw = b"\t".join(part.head if isinstance(part, OversizedLine) else part for part in raw)
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", errors="backslashreplace")
    elif isinstance(raw, str):
        text = raw
    else:
        text = json.dumps(raw, ensure_ascii=False, default=str)
    text = text.rstrip("\r\n")
    return text if len(text) <= MAX_RECORD_CHARS else text[:MAX_RECORD_CHARS] + "…"


def reject(record: Record, reason: str, detail: str = "", key: str | None = None, **extra: Any) -> Reject:
    return Reject(
        reason=reason,
        input_file=record.input_file,
        position=record.position,
        detail=detail,
        record=record_text(record.raw),
        key=key,
        **extra,
    )


# One encoder for every row: json.dumps with non-default arguments builds a new encoder per call.
_META_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)


def decode_line(record: Record) -> str | Reject:
    """A line record as text, or the rejection every line format gives for invalid UTF-8 and blank lines."""
    try:
        line = record.raw.decode("utf-8")
    except UnicodeDecodeError:
        return reject(record, Reason.INVALID_UTF8)
    if not line.strip():
        return reject(record, Reason.MALFORMED, "blank line")
    return line


def meta_json(fields: dict[str, Any]) -> str:
    """The `meta` column: the upstream fields a pair does not otherwise carry, as compact sorted JSON."""
    return _META_ENCODER.encode(fields)


def _table(columns: dict[str, list], table_schema: pa.Schema) -> pa.Table:
    # pyarrow 26 converts a Python list of long str to `string` ~20x slower than to `large_string`
    # (0.39 s vs 0.02 s for 70k 300-char strings): convert to large_string, then cast (cheap).
    arrays = []
    for f in table_schema:
        if f.type == pa.string():
            arrays.append(pa.array(columns[f.name], type=pa.large_string()).cast(pa.string()))
        else:
            arrays.append(pa.array(columns[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=table_schema)


def pairs_table(pairs: Sequence[Pair], source: str) -> pa.Table:
    """Candidates in CANDIDATE_SCHEMA: the pair columns and the crop."""
    columns = {
        schema.KEY: [p.key for p in pairs],
        schema.SOURCE: [source] * len(pairs),
        schema.TEXT: [p.text for p in pairs],
        schema.IMAGE_URL: [p.image_url for p in pairs],
        schema.IMAGE_REF: [p.image_ref for p in pairs],
        schema.SPLIT: [p.split for p in pairs],
        schema.META: [p.meta for p in pairs],
        schema.LANG: [p.lang for p in pairs],
        schema.LANG_SCORE: [p.lang_score for p in pairs],
        schema.CROP: [None if p.crop is None else (p.crop.x, p.crop.y, p.crop.width, p.crop.height) for p in pairs],
    }
    # A credential in an upstream URL is never stored (nor sent: the row is fetched without it).
    return redact.url_columns(_table(columns, schema.CANDIDATE_SCHEMA), (schema.IMAGE_URL, schema.META))


def rejects_table(rejects: Sequence[Reject], source: str) -> pa.Table:
    columns = {
        schema.KEY: [r.key for r in rejects],
        schema.SOURCE: [source] * len(rejects),
        schema.REASON: [r.reason for r in rejects],
        schema.DETAIL: [r.detail for r in rejects],
        schema.INPUT_FILE: [r.input_file for r in rejects],
        schema.POSITION: [r.position for r in rejects],
        schema.RECORD: [r.record for r in rejects],
        schema.LANG: [r.lang for r in rejects],
        schema.LANG_SCORE: [r.lang_score for r in rejects],
    }
    return redact.url_columns(_table(columns, schema.REJECT_SCHEMA), (schema.RECORD, schema.DETAIL))


@dataclass(frozen=True, slots=True)
class CaptionLimits:
    """The longest caption (after cleaning) a source's pair may have; the figures live in manifests/sources.toml."""

    max_chars: int
    max_words: int

    def problem(self, text: str) -> str | None:
        """Why `text` is too long, or None. Characters first: a huge text is refused without splitting it."""
        if len(text) > self.max_chars:
            return f"{len(text):,} characters > {self.max_chars:,}"
        words = len(text.split())
        if words > self.max_words:
            return f"{words:,} words > {self.max_words:,}"
        return None

    def too_long_mask(self, texts: pa.Array | pa.ChunkedArray) -> pa.Array:
        """`problem(text) is not None` for a column of texts (the columnar path). Lengths are counted in columns;
        words only where a text is long enough to hold too many (2 * max_words + 1 characters), with str.split,
        so a "word" is exactly what `problem` counts (Arrow's whitespace split keeps empty pieces)."""
        chars = pc.utf8_length(texts)
        mask = pc.greater(chars, self.max_chars).to_pylist()
        maybe = pc.and_(pc.less_equal(chars, self.max_chars), pc.greater_equal(chars, 2 * self.max_words + 1))
        rows = pc.indices_nonzero(maybe).to_pylist()
        if rows:
            for row, text in zip(rows, pc.take(texts, rows).to_pylist()):
                mask[row] = len(text.split()) > self.max_words
        return pa.array(mask, type=pa.bool_())


@lru_cache(maxsize=None)
def caption_limits(source: str) -> CaptionLimits:
    from pmd.catalog import catalog_entry  # the catalog imports schema only; imported late to keep base light

    entry = catalog_entry(source)
    return CaptionLimits(entry.max_caption_chars, entry.max_caption_words)


def oversized_reject(record: Record) -> Reject | None:
    """The rejection of a record holding a line over `limits.MAX_LINE_BYTES`, or None for every other record."""
    raw = record.raw
    parts = raw if isinstance(raw, tuple) else (raw,)
    for part in parts:
        if isinstance(part, OversizedLine):
            from pmd.sources.limits import MAX_LINE_BYTES

            return reject(record, Reason.LINE_TOO_LONG, f"{part.length:,} bytes > {MAX_LINE_BYTES:,}")
    return None


def _too_long(record: Record, pair: Pair, problem: str) -> Reject:
    return reject(record, Reason.TOO_LONG, problem, key=pair.key, lang=pair.lang, lang_score=pair.lang_score)


class SourceAdapter(abc.ABC):
    """Base class of the twelve source adapters. Subclasses set `name` and implement `prepare`, `records` and
    `convert`; an instance holds its options only."""

    name: ClassVar[str]
    #: One line saying which upstream files the adapter takes, shown in errors and `pmd sources`.
    inputs_help: ClassVar[str] = ""
    #: True when `records(inputs)` is exactly the lines of each input in turn (`iter_lines`): the ingest stage may
    #: then read and ship lines in blocks (`iter_line_blocks`), much cheaper than one object per line.
    line_records: ClassVar[bool] = False

    @abc.abstractmethod
    def prepare(self, inputs: Sequence[Path]) -> Context:
        """Load what `convert` needs besides the record (None when nothing). Runs once, before any record is read;
        raises `InputError` for an input it needs that is missing or cannot be read."""

    @abc.abstractmethod
    def records(self, inputs: Sequence[Path]) -> Iterator[Record]:
        """The raw records of the inputs, in order, in constant memory."""

    @abc.abstractmethod
    def convert(self, record: Record, context: Context) -> Iterable[Pair | Reject]:
        """One record's pairs and rejections; depends only on (record, context, options)."""

    def convert_limited(self, record: Record, context: Context) -> Iterator[Pair | Reject]:
        """`convert` inside the limits every source shares, the path the ingest stage takes: an over-long line is
        rejected before the adapter sees it, and a pair whose caption is over the source's limits becomes a
        `too_long` rejection (never truncated)."""
        oversized = oversized_reject(record)
        if oversized is not None:
            yield oversized
            return
        limits = caption_limits(self.name)
        for out in self.convert(record, context):
            problem = limits.problem(out.text) if isinstance(out, Pair) else None
            yield out if problem is None else _too_long(record, out, problem)

    def convert_tables_limited(self, records: Sequence[Record], context: Context) -> tuple[pa.Table, pa.Table]:
        """The same limits around a columnar adapter's `convert_tables` (one output row per record)."""
        # A line chunk knows where its over-long lines are; any other sequence is looked at record by record.
        over = (records.oversized if isinstance(records, Lines)
                else [i for i, r in enumerate(records) if oversized_reject(r) is not None])
        rejected = [oversized_reject(records[i]) for i in over]
        skip = set(over)
        kept = [r for i, r in enumerate(records) if i not in skip] if skip else records
        pairs, rejects = self.convert_tables(kept, context)  # type: ignore[attr-defined]
        limits = caption_limits(self.name)
        mask = limits.too_long_mask(pairs.column(schema.TEXT)) if pairs.num_rows else None
        if mask is not None and pc.any(mask).as_py():
            too_long = pairs.filter(mask)
            pairs = pairs.filter(pc.invert(mask))
            rejected.extend(self._locate_too_long(kept, context, too_long, limits))
        if rejected:
            rejects = pa.concat_tables([rejects_table(rejected, self.name), rejects])
        return pairs, rejects

    def _locate_too_long(self, records: Sequence[Record], context: Context, too_long: pa.Table,
                         limits: CaptionLimits) -> list[Reject]:
        """Rejections for over-long pairs of the columnar path, with the record each came from. Rare (a few per
        million rows), so the records that could have produced them are converted again one by one to find it:
        a cleaned caption is never longer than its raw record, which rules out the short records."""
        wanted = set(too_long.column(schema.KEY).to_pylist())
        shortest = min(limits.max_chars, limits.max_words)
        found: list[Reject] = []
        for record in records:
            if not wanted:
                break
            raw = record.raw
            if isinstance(raw, (bytes, str)) and len(raw) <= shortest:
                continue
            for out in self.convert(record, context):
                if isinstance(out, Pair) and out.key in wanted:
                    problem = limits.problem(out.text)
                    if problem is not None:
                        wanted.discard(out.key)
                        found.append(_too_long(record, out, problem))
        if wanted:
            raise RuntimeError(f"{self.name}: over-long pairs {sorted(wanted)[:3]} came from no record of the chunk")
        return found

    def iter_converted(self, inputs: Sequence[Path]) -> Iterator[Pair | Reject]:
        """All three steps in-process, inside the shared limits: the simplest way to read a source (tests, small
        inputs)."""
        context = self.prepare(inputs)
        for record in self.records(inputs):
            yield from self.convert_limited(record, context)
