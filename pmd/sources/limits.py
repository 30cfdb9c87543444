"""How much one upstream record may make a reader hold, and the byte scanner that enforces it on JSON streams.

Every figure here is a ceiling far above anything the real files hold (docs/hostile-inputs.md gives the reasoning)
and far below what would hurt a worker; past it the reader stops with an `InputError` (JSON: the document cannot
be resynchronised) or rejects the one line (line formats: the rest of the file is still read).

Why a separate scan of the bytes before the JSON parser: ijson builds a prefix string per nesting level
(`item.item.item...`), so a 200 KB file of 100,000 nested brackets costs O(depth²) memory (24 GB) before any
event reaches Python, and yajl buffers a token (a string, a number) whole however long it is. The scan sees each
chunk before the parser does and refuses it first. It is vectorised with numpy (a few ms per MB), so it adds little
to ijson's C parser, which a Python loop over parser events would slow down six-fold.
"""

from __future__ import annotations

from typing import IO

import numpy as np

#: Deepest nesting of JSON arrays/objects accepted. The deepest real layout is 5 (Karpathy
#: `{images: [{sentences: [{tokens: [...]}]}]}`; LN traces `[[{x, y, t}]]` inside a line object is 4).
MAX_JSON_DEPTH = 32
#: Longest single JSON token (a string with its quotes, a number, a literal) accepted, in bytes. The longest real
#: strings are Localized Narratives narratives and RedCaps titles, a few KB.
MAX_JSON_TOKEN_BYTES = 1024**2
#: Largest single streamed JSON element (an array/object at the depth of the items read) in bytes. The largest real
#: ones are Visual Genome image entries with all their regions, tens of KB.
MAX_JSON_ITEM_BYTES = 8 * 1024**2
#: Longest line of a line format accepted, in bytes (without its line ending). WIT has the longest real lines:
#: context descriptions over csv's 128 KiB default field limit exist, a few hundred KB at most.
MAX_LINE_BYTES = 4 * 1024**2
#: Entries of a lookup table an adapter loads whole before streaming (Visual Genome's image_data.json: 108,077;
#: Karpathy val+test images: 10,000): a file claiming more is refused rather than held (~200 bytes an entry).
MAX_LOOKUP_ENTRIES = 1_000_000
#: Bytes of upstream records per unit of ingest work: a chunk is cut at `chunk_records` records or this many
#: bytes, whichever comes first, so a file of long rows cannot make one chunk hold gigabytes.
CHUNK_BYTES = 16 * 1024**2

_QUOTE, _BACKSLASH = 0x22, 0x5C
# One pass of bytes.translate (C speed) classifies every byte; numpy then works on the few that matter.
_OPEN, _CLOSE, _SEPARATOR, _QUOTE_CLASS = 1, 2, 3, 4
_CLASSES = bytearray(256)
for _chars, _class in ((b"[{", _OPEN), (b"]}", _CLOSE), (b",:", _SEPARATOR), (b'"', _QUOTE_CLASS)):
    for _char in _chars:
        _CLASSES[_char] = _class
_CLASSES = bytes(_CLASSES)
# Depth change by class: +1 opens a level, -1 closes one, 0 separates.
_DELTA = np.array([0, 1, -1, 0, 0], dtype=np.int64)


class LimitExceeded(ValueError):
    """A JSON stream past one of the limits; `offset` is the byte (0-based, decompressed) where it was seen."""

    def __init__(self, message: str, offset: int):
        super().__init__(f"{message} (at byte {offset:,})")
        self.offset = offset


class JsonScanner:
    """Tracks string state, nesting depth, token length and item extent across the chunks of one JSON stream.

    `item_depth` is the number of components of the ijson prefix whose items are streamed (`images.item` -> 2):
    every array/object opened at that depth is one element and is held to MAX_JSON_ITEM_BYTES. None: no item limit.
    """

    def __init__(self, item_depth: int | None = None, max_depth: int = MAX_JSON_DEPTH,
                 max_token: int = MAX_JSON_TOKEN_BYTES, max_item: int = MAX_JSON_ITEM_BYTES):
        self.item_depth = item_depth
        self.max_depth, self.max_token, self.max_item = max_depth, max_token, max_item
        self.offset = 0  # bytes scanned so far
        self._in_string = False
        self._backslashes = 0  # backslashes ending the previous chunk (an odd run escapes the next byte)
        self._depth = 0
        self._last_boundary = -1  # offset of the last quote or structural byte outside a string
        self._item_start: int | None = None  # offset where the element now open began

    def feed(self, chunk: bytes) -> None:
        """Scan the next chunk; LimitExceeded when it breaks a limit (or makes an open token/element too long)."""
        n = len(chunk)
        if not n:
            return
        base = self.offset
        classes = np.frombuffer(chunk.translate(_CLASSES), dtype=np.uint8)
        candidates = (classes != 0).nonzero()[0]  # quotes and structural bytes, in order (bool nonzero: 10x faster)
        kinds = classes[candidates]
        quote = kinds == _QUOTE_CLASS
        if self._backslashes or chunk.find(b"\\") >= 0:
            escaped = self._escaped(np.frombuffer(chunk, dtype=np.uint8), candidates[quote])
            if escaped.any():  # an escaped quote is string content: neither a quote nor a boundary
                keep = np.ones(len(candidates), dtype=bool)
                keep[np.flatnonzero(quote)[escaped]] = False
                candidates, kinds, quote = candidates[keep], kinds[keep], quote[keep]
        # A byte is inside a string when an odd number of unescaped quotes (counting the carried state) precede it.
        before = np.cumsum(quote) - quote + int(self._in_string)
        structural = ~quote & ((before & 1) == 0)
        self._in_string = bool((int(np.count_nonzero(quote)) + int(self._in_string)) & 1)
        positions = candidates[structural]
        delta = _DELTA[kinds[structural]]

        depth = self._depth + np.cumsum(delta)
        if len(depth):
            if int(depth.max()) > self.max_depth:
                at = base + int(positions[np.argmax(depth > self.max_depth)])
                raise LimitExceeded(f"JSON nested deeper than {self.max_depth} levels", at)
            self._depth = int(depth[-1])

        # Tokens: no quote or structural byte lies inside one, so the longest gap between two such bytes bounds
        # the longest string, number or literal (strings: quote to quote, since their inner structurals are skipped).
        boundaries = candidates[quote | structural] + base
        edges = np.concatenate(([self._last_boundary], boundaries, [base + n]))
        gaps = np.diff(edges)
        if int(gaps.max()) > self.max_token:
            at = int(edges[np.argmax(gaps > self.max_token)])
            raise LimitExceeded(f"a single JSON value longer than {self.max_token:,} bytes", max(at, 0))
        if len(boundaries):
            self._last_boundary = int(boundaries[-1])

        if self.item_depth is not None:
            self._check_items(positions + base, delta, depth, base + n)
        self.offset = base + n

    def _escaped(self, arr: np.ndarray, quotes: np.ndarray) -> np.ndarray:
        """For each quote position, whether an odd run of backslashes (possibly from earlier chunks) precedes it."""
        n = len(arr)
        index = np.arange(n)
        last_other = np.maximum.accumulate(np.where(arr != _BACKSLASH, index, -1))
        run = np.zeros(len(quotes), dtype=np.int64)
        inner = quotes > 0
        prev = last_other[quotes[inner] - 1]
        run[inner] = np.where(prev >= 0, quotes[inner] - 1 - prev, quotes[inner] + self._backslashes)
        run[~inner] = self._backslashes
        tail = int(last_other[-1])
        self._backslashes = n - 1 - tail if tail >= 0 else n + self._backslashes
        return (run & 1) == 1

    def _check_items(self, positions: np.ndarray, delta: np.ndarray, depth: np.ndarray, end: int) -> None:
        # Crossings between depth k and k+1 alternate (the depth moves by one at a time): up = an element opens.
        k = self.item_depth
        ups = positions[(delta == 1) & (depth == k + 1)]
        downs = positions[(delta == -1) & (depth == k)]
        starts = ups if self._item_start is None else np.concatenate(([self._item_start], ups))
        closed = len(downs)
        if closed:
            lengths = downs - starts[:closed]
            if int(lengths.max()) > self.max_item:
                at = int(starts[np.argmax(lengths > self.max_item)])
                raise LimitExceeded(f"a single JSON element larger than {self.max_item:,} bytes", at)
        self._item_start = int(starts[closed]) if len(starts) > closed else None
        if self._item_start is not None and end - self._item_start > self.max_item:
            raise LimitExceeded(f"a single JSON element larger than {self.max_item:,} bytes", self._item_start)


class ScannedStream:
    """A binary stream whose bytes pass through a `JsonScanner` before the parser reads them. The scan runs on
    1 MiB blocks read ahead (its cost is per call as much as per byte), served to the parser in the sizes it asks."""

    BLOCK = 1024**2

    def __init__(self, stream: IO[bytes], scanner: JsonScanner):
        self._stream = stream
        self.scanner = scanner
        self._block = b""
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson probes the stream type with read(0)
            return b""
        if self._pos >= len(self._block):
            # Bounded reads only: read() of the whole stream would hold it before the scan could refuse it.
            self._block = self._stream.read(self.BLOCK)
            self._pos = 0
            self.scanner.feed(self._block)
        size = size if size is not None and 0 < size else self.BLOCK
        data = self._block[self._pos:self._pos + size]
        self._pos += len(data)
        return data


def check_json_text(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why one JSON document held in memory (a JSONL line) must not be parsed, or None.

    Lines are already capped at MAX_LINE_BYTES, so only depth matters here (json.loads recurses per level and
    raises RecursionError near 1,000). A line with fewer brackets than the limit cannot be too deep: skip the scan.
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return None
    try:
        JsonScanner(None, max_depth=max_depth, max_token=len(data) + 1).feed(data)
    except LimitExceeded as exc:
        return str(exc)
    return None
