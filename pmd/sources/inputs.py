"""Streaming readers for upstream files as they are published: plain, .gz, .bz2, or members of a .zip.

Every reader works in constant memory and turns low-level failures (missing file, truncated compressed stream,
broken zip, JSON that stops half-way) into an `InputError` naming the file and, where known, the line.

Every reader is also bounded whatever the file holds (`pmd.sources.limits`): a line longer than MAX_LINE_BYTES is
skipped without being held and stands in the records as an `OversizedLine` (rejected as `line_too_long`, the rest
of the file still read); a JSON stream nested deeper than MAX_JSON_DEPTH, or with one token or one element over its
limit, is an `InputError` naming the file and the byte.

An input is a local path or a URL on object storage (`s3://`, `gs://`, any fsspec protocol; `pmd.storage`): a URL
is kept as a string (never a `Path`, which would fold `//`), streamed with ranged GETs, and a zip on it is read in
place through a seekable remote file (its central directory, then the members read), never downloaded whole.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import json
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import ijson
import numpy as np

from pmd import storage
from pmd.sources.base import InputError, Lines, OversizedLine, Record
from pmd.sources.limits import CHUNK_BYTES, MAX_LINE_BYTES, JsonScanner, LimitExceeded, ScannedStream, check_json_text

_READ_ERRORS = (EOFError, OSError, zlib.error, zipfile.BadZipFile, tarfile.TarError, ValueError)


def _is_tar(name: str) -> bool:
    return name.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2"))


Input = Path | str  # a local path, or a URL (pmd.storage)


def input_location(path: str | Path) -> Input:
    """An input as the readers keep it: a URL as a string, a local path as a Path."""
    return storage.location(path)


def input_name(path: str | Path) -> str:
    """The file name of an input (the last component of a path or URL)."""
    return storage.basename(path)


def require_file(path: str | Path) -> Input:
    path = input_location(path)
    if storage.is_remote(path):
        try:
            if storage.is_file(path):
                return path
            missing = not storage.is_dir(path)
        except OSError as exc:  # unreachable store, refused credentials: an input that cannot be read
            raise InputError(path, f"cannot be read ({exc})") from exc
        raise InputError(path, "no such file" if missing else "not a regular file")
    if not path.exists():
        raise InputError(path, "no such file")
    if not path.is_file():
        raise InputError(path, "not a regular file")
    return path


def _decompressing(name: str, raw: IO[bytes]) -> IO[bytes]:
    lower = name.lower()
    if lower.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if lower.endswith(".bz2"):
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    return raw


def strip_compression_suffix(name: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar", ".gz", ".bz2", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@contextmanager
def open_zip(path: Input) -> Iterator[zipfile.ZipFile]:
    """A zip archive, local or read in place on object storage (ranged reads of its central directory and of the
    members opened); InputError when it is not one."""
    try:
        # A member is streamed in zipfile's small reads: the big read-ahead keeps that to a GET per 8 MiB.
        raw = storage.open_seekable(path, storage.STREAM_BUFFER)
    except OSError as exc:
        raise InputError(path, f"not a readable zip archive ({exc})") from exc
    with raw:
        try:
            archive = zipfile.ZipFile(raw)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(path, f"not a readable zip archive ({exc})") from exc
        with archive:
            yield archive


_BOM = b"\xef\xbb\xbf"


def _without_bom(stream: IO[bytes]) -> IO[bytes]:
    """The stream past a leading UTF-8 byte-order mark, if it has one: editors on Windows add it, and it would
    otherwise glue onto the first field of a TSV or make a JSON parser refuse the file."""
    peek = getattr(stream, "peek", None)
    try:
        if peek is not None and peek(3)[:3] == _BOM:
            stream.read(3)
    except _READ_ERRORS as exc:
        return _Unreadable(exc)  # fails where the reader reads, whose error handling names the file and line
    return stream


class _Unreadable:
    """A stream that failed before its first byte: every read raises that failure again."""

    def __init__(self, exc: BaseException):
        self._exc = exc

    def read(self, size: int = -1) -> bytes:
        raise self._exc

    readline = read


def iter_streams(path: Input, member_pattern: str | None = None) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield (display name, decompressed binary stream) for a file, or for each matching member of a zip.

    Display names of archive members are `archive.zip!member`, so a rejection points inside the archive. Tar
    archives (SBU's `sbu-captions-all.tar.gz`) are read as a stream, never extracted to disk.
    """
    path = require_file(path)
    file_name = input_name(path)
    if _is_tar(file_name):
        try:
            with storage.open_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as archive:
                found = False
                for member in archive:
                    if not member.isfile():
                        continue
                    if member_pattern is not None and not fnmatch.fnmatch(member.name, member_pattern):
                        continue
                    found = True
                    stream = archive.extractfile(member)
                    if stream is not None:
                        yield f"{path}!{member.name}", _without_bom(_decompressing(member.name, stream))
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise InputError(path, f"truncated or corrupt tar archive ({exc})") from exc
        if not found:
            raise InputError(path, f"tar archive has no member matching {member_pattern or '*'}")
    elif file_name.lower().endswith(".zip"):
        with open_zip(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            if member_pattern is not None:
                names = [n for n in names if fnmatch.fnmatch(n, member_pattern)]
            if not names:
                raise InputError(path, f"zip archive has no member matching {member_pattern or '*'}")
            for name in sorted(names):
                try:
                    with archive.open(name) as member:
                        yield f"{path}!{name}", _without_bom(_decompressing(name, member))
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise InputError(f"{path}!{name}", f"truncated or corrupt archive member ({exc})") from exc
    else:
        with storage.open_stream(path) as raw:
            yield str(path), _without_bom(_decompressing(file_name, raw))


#: Bytes of an over-long line kept to show in its rejection.
_HEAD_BYTES = 2000
_SKIP_PIECE = 1024**2


def _ending_length(tail: bytes) -> int:
    """Bytes of line ending at the end of `tail` (a line's last two bytes): "\n", "\r\n", or a final "\r" at the
    end of the file, the same ending `LineBlock.records` strips."""
    newline = tail.endswith(b"\n")
    rest = tail[:-1] if newline else tail
    return newline + rest.endswith(b"\r")


def read_lines(stream: IO[bytes], max_line: int | None = None) -> Iterator[bytes | OversizedLine]:
    """The lines of a binary stream with their endings, each at most `max_line` (default MAX_LINE_BYTES) bytes
    without its ending; a longer one is read past in 1 MiB pieces (never held) and given as an `OversizedLine`."""
    max_line = MAX_LINE_BYTES if max_line is None else max_line
    head_bytes = min(_HEAD_BYTES, max_line)
    readline = stream.readline
    limit = max_line + 2  # the line, "\r\n"
    while line := readline(limit):
        if len(line) <= max_line:  # the common case: short enough whatever its ending
            yield line
            continue
        if line.endswith(b"\n") or len(line) < limit:
            content = len(line) - _ending_length(line[-2:])
            yield line if content <= max_line else OversizedLine(line[:head_bytes], content)
            continue
        head, length, tail = line[:head_bytes], len(line), line[-2:]
        while piece := readline(_SKIP_PIECE):
            length += len(piece)
            tail = (tail + piece)[-2:]
            if piece.endswith(b"\n"):
                break
        yield OversizedLine(head, length - _ending_length(tail))


def iter_lines(path: Input, member_pattern: str | None = None, skip_header: Callable[[bytes], bool] | None = None,
               ) -> Iterator[Record]:
    """Lines of a text file as bytes without the line ending, each with its 1-based line number.

    Bytes, not str: invalid UTF-8 is a per-row rejection decided by the adapter, not a crash of the whole file.
    A line over MAX_LINE_BYTES comes as an `OversizedLine` raw (the shared path rejects it).
    `skip_header(first_line)` returning True drops the first line of each stream (TSVs with a header row).
    """
    for name, stream in iter_streams(path, member_pattern):
        line_no = 0
        try:
            for line_no, line in enumerate(read_lines(stream), start=1):
                oversized = line.__class__ is OversizedLine
                if line_no == 1 and skip_header is not None and skip_header(line.head if oversized else line):
                    continue
                yield Record(name, line_no, line if oversized else line.rstrip(b"\r\n"))
        except _READ_ERRORS as exc:
            raise InputError(name, f"cannot read past this line: truncated or corrupt ({exc})", line_no) from exc


@dataclass(frozen=True, slots=True)
class LineBlock:
    """Consecutive lines of one file as a single bytes object: cheap to ship to a worker (one pickle of one
    buffer instead of one object per line), expanded into `Record`s where the work happens. An over-long line is
    an empty line in `data` and its `OversizedLine` in `oversized`, by index within the block."""

    input_file: str
    first_line: int
    data: bytes
    lines: int
    oversized: tuple[tuple[int, OversizedLine], ...] = ()

    def records(self) -> Lines:
        parts = self.data.split(b"\n")
        if self.data.endswith(b"\n"):
            parts.pop()
        if b"\r" in self.data:
            parts = [line[:-1] if line.endswith(b"\r") else line for line in parts]
        for index, line in self.oversized:
            parts[index] = line
        return Lines(self.input_file, self.first_line, parts, [index for index, _ in self.oversized])


def iter_line_blocks(path: Input, lines_per_block: int, member_pattern: str | None = None) -> Iterator[LineBlock]:
    """`iter_lines` in blocks of `lines_per_block` lines or CHUNK_BYTES bytes: the same records, with the same
    numbers, once each block's `records()` is called."""
    for name, stream in iter_streams(path, member_pattern):
        line_no = 1
        block: list[bytes] = []
        oversized: list[tuple[int, OversizedLine]] = []
        held = 0
        try:
            for line in read_lines(stream):
                if isinstance(line, OversizedLine):
                    oversized.append((len(block), line))
                    line = b"\n"
                block.append(line)
                held += len(line)
                if len(block) >= lines_per_block or held >= CHUNK_BYTES:
                    yield LineBlock(name, line_no, b"".join(block), len(block), tuple(oversized))
                    line_no += len(block)
                    block, oversized, held = [], [], 0
        except _READ_ERRORS as exc:
            raise InputError(name, f"cannot read past this line: truncated or corrupt ({exc})",
                             line_no + len(block) - 1) from exc
        if block:
            yield LineBlock(name, line_no, b"".join(block), len(block), tuple(oversized))


class _Window:
    """`readline` over the bytes [start, end) of an open file, for `read_lines`."""

    def __init__(self, f: IO[bytes], start: int, end: int):
        f.seek(start)
        self._f, self._left = f, end - start

    def readline(self, limit: int) -> bytes:
        line = self._f.readline(min(limit, self._left)) if self._left > 0 else b""
        self._left -= len(line)
        return line


@dataclass(frozen=True, slots=True)
class LineRange:
    """Consecutive lines of an uncompressed file, by byte range: a worker reads them itself, so the driver ships
    nothing but these five numbers (the file must be visible to the workers: local, on a shared filesystem, or a
    URL on object storage, read with one ranged GET)."""

    input_file: str
    first_line: int
    start: int
    end: int
    lines: int

    def records(self) -> Lines:
        name, first = self.input_file, self.first_line
        with storage.open_seekable(self.input_file) as f:
            if self.end - self.start > 2 * CHUNK_BYTES:
                # Only a range holding an over-long line is this big (ranges are cut at CHUNK_BYTES): read it
                # line by line so that line is skipped, not held.
                raws = [line if isinstance(line, OversizedLine) else line.rstrip(b"\r\n")
                        for line in read_lines(_Window(f, self.start, self.end))]
                return Lines(name, first, raws, [i for i, raw in enumerate(raws) if isinstance(raw, OversizedLine)])
            f.seek(self.start)
            data = f.read(self.end - self.start)
        max_line = MAX_LINE_BYTES
        if b"\r" not in data:
            count, longest = _line_stats(data)
            if longest <= max_line:  # the usual range: kept as the buffer it is
                return Lines.block(name, first, data, count)
        lines = LineBlock(name, first, data, self.lines).records()
        raws = lines.raws
        if raws and max(map(len, raws)) > max_line:  # rare: find which
            over = [i for i, raw in enumerate(raws) if len(raw) > max_line]
            for i in over:
                raws[i] = OversizedLine(raws[i][:min(_HEAD_BYTES, max_line)], len(raws[i]))
            lines = Lines(name, first, raws, over)
        return lines


def _line_stats(data: bytes) -> tuple[int, int]:
    """(lines, bytes of the longest line, newlines not counted) of ``data``, without splitting it into lines."""
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    last = [] if data.endswith(b"\n") else [len(data)]  # a last line without its newline ends at the end
    bounds = np.concatenate((np.array([-1], dtype=np.int64), ends, np.array(last, dtype=np.int64)))
    return len(bounds) - 1, int((np.diff(bounds) - 1).max()) if len(bounds) > 1 else 0


_SCAN_BYTES = 16 * 1024**2


def is_compressed(path: Input) -> bool:
    name = input_name(path)
    return strip_compression_suffix(name) != name


def iter_line_ranges(path: Input, lines_per_range: int) -> Iterator[LineRange]:
    """The same cuts as `iter_line_blocks` on an uncompressed file (by line count), found by counting newlines
    (memchr speed), not by reading lines: each range is yielded as soon as its end is known. A range that would
    span more than CHUNK_BYTES is cut at the last newline seen once a scan buffer takes it past that."""
    path = require_file(path)
    if is_compressed(path):
        raise ValueError(f"{path}: byte ranges need an uncompressed file")
    name = str(path)
    start, pos, line_no, pending, last_newline_end = 0, 0, 1, 0, 0
    last = b""
    with storage.open_stream(path) as f:
        if f.read(3) == _BOM:  # the same lines as iter_lines, which drops a leading BOM
            start = pos = 3
        f.seek(pos)
        while buf := f.read(_SCAN_BYTES):
            newlines = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == ord("\n"))  # one pass, no loop per line
            used = 0  # newlines of this buffer already inside a yielded range
            while pending + len(newlines) - used >= lines_per_range:
                used += lines_per_range - pending
                end = pos + int(newlines[used - 1]) + 1
                yield LineRange(name, line_no, start, end, lines_per_range)
                line_no += lines_per_range
                start, pending = end, 0
            here = len(newlines) - used
            if here:
                last_newline_end = pos + int(newlines[-1]) + 1
            pending += here
            pos += len(buf)
            last = buf[-1:]
            if pending and pos - start > CHUNK_BYTES:
                # Every newline counted in `pending` lies before last_newline_end.
                yield LineRange(name, line_no, start, last_newline_end, pending)
                line_no += pending
                start, pending = last_newline_end, 0
    if start < pos:  # the tail; its last line may lack a newline
        yield LineRange(name, line_no, start, pos, pending + (last != b"\n"))


def _scanned(stream: IO[bytes], prefix: str) -> ScannedStream:
    """The stream as the JSON parser must read it: through the limits, elements at the prefix's depth bounded."""
    return ScannedStream(stream, JsonScanner(item_depth=len(prefix.split(".")) if prefix else 0))


def _where(index: int) -> str:
    return f"after element {index}" if index >= 0 else "before the first element"


def iter_json_items(path: Input, prefix: str, member_pattern: str | None = None) -> Iterator[Record]:
    """Items of a JSON array found at `prefix` (ijson syntax, e.g. `images.item`), streamed, with their index.
    Each Record's `size` is about the bytes its item took (what a chunk's byte budget counts)."""
    for name, stream in iter_streams(path, member_pattern):
        index = -1
        scanned = _scanned(stream, prefix)
        read = 0
        try:
            for index, item in enumerate(ijson.items(scanned, prefix, use_float=True)):
                # Items arrive a parser buffer at a time: the first of a buffer carries the buffer's bytes.
                size, read = scanned.scanner.offset - read, scanned.scanner.offset
                yield Record(name, index, item, size)
        except LimitExceeded as exc:
            raise InputError(name, f"refused {_where(index)} of '{prefix}': {exc}") from exc
        except ijson.JSONError as exc:
            raise InputError(name, f"invalid or truncated JSON {_where(index)} of '{prefix}' ({exc})") from exc
        except _READ_ERRORS as exc:
            raise InputError(name, f"truncated or corrupt file {_where(index)} of '{prefix}' ({exc})") from exc
        if index < 0:
            raise InputError(name, f"no elements at '{prefix}': not the expected JSON layout")


def load_json_value(path: Input, prefix: str, member_pattern: str | None = None) -> Any:
    """A whole (small) JSON value at `prefix`, e.g. a lookup table an adapter needs up front."""
    for name, stream in iter_streams(path, member_pattern):
        try:
            for value in ijson.items(_scanned(stream, prefix), prefix, use_float=True):
                return value
        except LimitExceeded as exc:
            raise InputError(name, f"refused: {exc}") from exc
        except (ijson.JSONError, *_READ_ERRORS) as exc:
            raise InputError(name, f"invalid or truncated JSON ({exc})") from exc
        raise InputError(name, f"no value at '{prefix}': not the expected JSON layout")
    raise InputError(path, "empty input")


def parse_json_line(text: str | bytes) -> Any:
    """One JSONL line (already within MAX_LINE_BYTES) parsed, refusing nesting past MAX_JSON_DEPTH the way the
    stream readers do; ValueError (json.JSONDecodeError is one) for anything that is not a JSON document."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    problem = check_json_text(data)
    if problem is not None:
        raise ValueError(problem)
    return json.loads(text)


def decode_utf8(raw: bytes) -> str | None:
    """The line as str, or None when it is not valid UTF-8 (the caller rejects the row)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None

