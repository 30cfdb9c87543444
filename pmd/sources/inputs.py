"""Streaming readers for upstream files as they are published: plain, .gz, .bz2, or members of a .zip.

Every reader works in constant memory and turns low-level failures (missing file, truncated compressed stream,
broken zip, JSON that stops half-way) into an `InputError` naming the file and, where known, the line.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any

import ijson

from pmd.sources.base import InputError, Record

_READ_ERRORS = (EOFError, OSError, zlib.error, zipfile.BadZipFile, tarfile.TarError, ValueError)


def _is_tar(name: str) -> bool:
    return name.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2"))


def require_file(path: Path) -> Path:
    path = Path(path)
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
def _zip(path: Path) -> Iterator[zipfile.ZipFile]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(path, f"not a readable zip archive ({exc})") from exc
    with archive:
        yield archive


def iter_streams(path: Path, member_pattern: str | None = None) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield (display name, decompressed binary stream) for a file, or for each matching member of a zip.

    Display names of archive members are `archive.zip!member`, so a rejection points inside the archive. Tar
    archives (SBU's `sbu-captions-all.tar.gz`) are read as a stream, never extracted to disk.
    """
    path = require_file(path)
    if _is_tar(path.name):
        try:
            with tarfile.open(path, mode="r|*") as archive:
                found = False
                for member in archive:
                    if not member.isfile():
                        continue
                    if member_pattern is not None and not fnmatch.fnmatch(member.name, member_pattern):
                        continue
                    found = True
                    stream = archive.extractfile(member)
                    if stream is not None:
                        yield f"{path}!{member.name}", _decompressing(member.name, stream)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise InputError(path, f"truncated or corrupt tar archive ({exc})") from exc
        if not found:
            raise InputError(path, f"tar archive has no member matching {member_pattern or '*'}")
    elif path.suffix.lower() == ".zip":
        with _zip(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            if member_pattern is not None:
                names = [n for n in names if fnmatch.fnmatch(n, member_pattern)]
            if not names:
                raise InputError(path, f"zip archive has no member matching {member_pattern or '*'}")
            for name in sorted(names):
                try:
                    with archive.open(name) as member:
                        yield f"{path}!{name}", _decompressing(name, member)
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise InputError(f"{path}!{name}", f"truncated or corrupt archive member ({exc})") from exc
    else:
        with open(path, "rb") as raw:
            yield str(path), _decompressing(path.name, raw)


def iter_lines(path: Path, member_pattern: str | None = None, skip_header: Callable[[bytes], bool] | None = None,
               ) -> Iterator[Record]:
    """Lines of a text file as bytes without the line ending, each with its 1-based line number.

    Bytes, not str: invalid UTF-8 is a per-row rejection decided by the adapter, not a crash of the whole file.
    `skip_header(first_line)` returning True drops the first line of each stream (TSVs with a header row).
    """
    for name, stream in iter_streams(path, member_pattern):
        line_no = 0
        try:
            for line_no, line in enumerate(stream, start=1):
                if line_no == 1 and skip_header is not None and skip_header(line):
                    continue
                yield Record(name, line_no, line.rstrip(b"\r\n"))
        except _READ_ERRORS as exc:
            raise InputError(name, f"cannot read past this line: truncated or corrupt ({exc})", line_no) from exc


@dataclass(frozen=True, slots=True)
class LineBlock:
    """Consecutive lines of one file as a single bytes object: cheap to ship to a worker (one pickle of one
    buffer instead of one object per line), expanded into `Record`s where the work happens."""

    input_file: str
    first_line: int
    data: bytes
    lines: int

    def records(self) -> list[Record]:
        parts = self.data.split(b"\n")
        if self.data.endswith(b"\n"):
            parts.pop()
        name, first = self.input_file, self.first_line
        return [Record(name, first + i, line[:-1] if line.endswith(b"\r") else line) for i, line in enumerate(parts)]


def iter_line_blocks(path: Path, lines_per_block: int, member_pattern: str | None = None) -> Iterator[LineBlock]:
    """`iter_lines` in blocks: the same records, with the same numbers, once each block's `records()` is called."""
    for name, stream in iter_streams(path, member_pattern):
        line_no = 1
        try:
            while lines := list(islice(stream, lines_per_block)):
                yield LineBlock(name, line_no, b"".join(lines), len(lines))
                line_no += len(lines)
        except _READ_ERRORS as exc:
            raise InputError(name, f"cannot read past this line: truncated or corrupt ({exc})", line_no - 1) from exc


@dataclass(frozen=True, slots=True)
class LineRange:
    """Consecutive lines of an uncompressed file, by byte range: a worker reads them itself, so the driver ships
    nothing but these five numbers (the file must be visible to the workers: local, or a shared filesystem)."""

    input_file: str
    first_line: int
    start: int
    end: int
    lines: int

    def records(self) -> list[Record]:
        with open(self.input_file, "rb") as f:
            f.seek(self.start)
            data = f.read(self.end - self.start)
        return LineBlock(self.input_file, self.first_line, data, self.lines).records()


_SCAN_BYTES = 16 * 1024**2


def is_compressed(path: Path) -> bool:
    return strip_compression_suffix(Path(path).name) != Path(path).name


def iter_line_ranges(path: Path, lines_per_range: int) -> Iterator[LineRange]:
    """The same cuts as `iter_line_blocks` on an uncompressed file, found by counting newlines (memchr speed), not
    by reading lines: each range is yielded as soon as its end is known."""
    path = require_file(path)
    if is_compressed(path):
        raise ValueError(f"{path}: byte ranges need an uncompressed file")
    name = str(path)
    start, pos, line_no, pending = 0, 0, 1, 0
    last = b""
    with open(path, "rb") as f:
        while buf := f.read(_SCAN_BYTES):
            offset = 0
            while pending + buf.count(b"\n", offset) >= lines_per_range:
                idx = offset - 1
                for _ in range(lines_per_range - pending):
                    idx = buf.index(b"\n", idx + 1)
                end = pos + idx + 1
                yield LineRange(name, line_no, start, end, lines_per_range)
                line_no += lines_per_range
                start, pending, offset = end, 0, idx + 1
            pending += buf.count(b"\n", offset)
            pos += len(buf)
            last = buf[-1:]
    if start < pos:  # the tail; its last line may lack a newline
        yield LineRange(name, line_no, start, pos, pending + (last != b"\n"))


def iter_json_items(path: Path, prefix: str, member_pattern: str | None = None) -> Iterator[Record]:
    """Items of a JSON array found at `prefix` (ijson syntax, e.g. `images.item`), streamed, with their index."""
    for name, stream in iter_streams(path, member_pattern):
        index = -1
        try:
            for index, item in enumerate(ijson.items(stream, prefix, use_float=True)):
                yield Record(name, index, item)
        except ijson.JSONError as exc:
            raise InputError(name, f"invalid or truncated JSON after element {index} of '{prefix}' ({exc})") from exc
        except _READ_ERRORS as exc:
            raise InputError(name, f"truncated or corrupt file after element {index} ({exc})") from exc
        if index < 0:
            raise InputError(name, f"no elements at '{prefix}': not the expected JSON layout")


def load_json_value(path: Path, prefix: str, member_pattern: str | None = None) -> Any:
    """A whole (small) JSON value at `prefix`, e.g. a lookup table an adapter needs up front."""
    for name, stream in iter_streams(path, member_pattern):
        try:
            for value in ijson.items(stream, prefix, use_float=True):
                return value
        except (ijson.JSONError, *_READ_ERRORS) as exc:
            raise InputError(name, f"invalid or truncated JSON ({exc})") from exc
        raise InputError(name, f"no value at '{prefix}': not the expected JSON layout")
    raise InputError(path, "empty input")


def decode_utf8(raw: bytes) -> str | None:
    """The line as str, or None when it is not valid UTF-8 (the caller rejects the row)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None

