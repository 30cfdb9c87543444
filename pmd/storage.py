"""Where a corpus lives: a local path, or a URL on object storage (`s3://bucket/prefix`, `gs://...`, any fsspec
protocol), behind one small set of functions that take either.

Filesystems come from pyarrow.fs: its S3 and GCS clients are the ones pyarrow's Parquet and dataset readers use
natively (ranged reads of a footer and of single row groups, no Python in the data path), and they read the
standard credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION, ~/.aws). Any other protocol goes through fsspec (`fsspec.filesystem(protocol)`, wrapped in
pyarrow's FSSpecHandler), so a filesystem an fsspec plugin provides (az://, hf://, memory://...) works the same way.
On S3 three calls go through botocore's client instead, configured the same way (`s3_client`): a whole-object read,
a file check and a delete are one request each there, where pyarrow's client sends two or more (docs/benchmarks.md).

Storage options (`pmd ... --storage-option KEY=VALUE`, or the JSON object in the environment variable
PMD_STORAGE_OPTIONS) are keyword arguments of that filesystem's constructor (S3: pyarrow.fs.S3FileSystem's
endpoint_override, region, access_key, ...). They travel in the environment so that Ray workers resolve URLs the way
the driver does. A value that parses as JSON (true, 3, ...) is passed parsed, anything else as a string.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
OPTIONS_ENV = "PMD_STORAGE_OPTIONS"
# What a Ray cluster's workers get from the driver's environment (pipelines/ray_runtime.py); not the credentials.
PROPAGATED_ENV = (OPTIONS_ENV, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
_PYARROW_SCHEMES = {"s3": pafs.S3FileSystem, "gs": pafs.GcsFileSystem, "gcs": pafs.GcsFileSystem}


# `--storage-option KEY=VALUE` of every command that takes a build location.
STORAGE_OPTION_ARGS = ("--storage-option",)
STORAGE_OPTION_KWARGS = {"action": "append", "default": [], "metavar": "KEY=VALUE",
                         "help": "option of the object-storage filesystem (repeatable), e.g. "
                                 "endpoint_override=http://127.0.0.1:9000; see docs/build.md"}


class StorageError(ValueError):
    """Storage options that do not make a filesystem."""


def is_remote(location: str | os.PathLike) -> bool:
    """A URL with a scheme other than file:// (a Windows drive letter is not a scheme)."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"


def parse_options(pairs: list[str]) -> dict[str, object]:
    """`KEY=VALUE` strings (the command line's --storage-option) -> constructor keyword arguments."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StorageError(f"storage option {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def set_options(options: Mapping[str, object]) -> None:
    """Make `options` the storage options of this process and of the processes it starts (Ray workers)."""
    if options:
        os.environ[OPTIONS_ENV] = json.dumps(dict(options), sort_keys=True)
    else:
        os.environ.pop(OPTIONS_ENV, None)


def add_options(pairs: list[str]) -> None:
    """Command-line `KEY=VALUE` options on top of those already in the environment."""
    if pairs:
        set_options({**json.loads(_options()), **parse_options(pairs)})


def _options() -> str:
    return os.environ.get(OPTIONS_ENV, "{}")


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, options_json: str, endpoint: str | None, pid: int) -> pafs.FileSystem:
    """One filesystem per scheme, options and process: a client made before a fork (a DataLoader worker) is not
    used after it."""
    try:
        options = json.loads(options_json)
    except ValueError as e:
        raise StorageError(f"{OPTIONS_ENV} is not a JSON object ({e})") from None
    try:
        if scheme == "s3" and "endpoint_override" not in options:
            # The AWS SDKs' standard variable (boto3, botocore, the CLI); pyarrow's client does not read it itself.
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options["endpoint_override"] = endpoint
        if scheme == "s3":
            # A stream opened for writing starts no multipart upload until a part is full: an object smaller than
            # a part (every marker, most work files) is one PutObject instead of create + upload-part + complete,
            # a third of the requests (benchmarks/bench_scale.py's requests by kind). Errors then surface at write
            # or close, which the atomic writer's commit reaches before a marker is written.
            options.setdefault("allow_delayed_open", True)
        if scheme in _PYARROW_SCHEMES:
            return _PYARROW_SCHEMES[scheme](**options)
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme, **options)))
    except (TypeError, ValueError, ImportError) as e:
        raise StorageError(f"cannot open a {scheme}:// filesystem with options {sorted(options)}: {e}") from None


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or a URL."""
    text = str(location)
    if not is_remote(text):
        if text.startswith("file://"):
            text = urlsplit(text).path
        return pafs.LocalFileSystem(), str(Path(text).absolute())
    parts = urlsplit(text)
    fs = _filesystem(parts.scheme, _options(),
                     os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"), os.getpid())
    if parts.scheme in _PYARROW_SCHEMES:
        return fs, (parts.netloc + parts.path).rstrip("/")
    return fs, text.split("://", 1)[1].rstrip("/")


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location/part/...` for a path or a URL (object keys always use `/`)."""
    if not is_remote(location):
        return str(Path(location).joinpath(*parts))
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def basename(location: str | os.PathLike) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_remote(location) else Path(location).name


def location(value: str | os.PathLike) -> str | Path:
    """A command-line or config value as the build keeps it: URLs as strings, paths as Paths."""
    return str(value) if is_remote(value) else Path(value)


def _info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    """A file (never a directory or a prefix). On S3 one HEAD: pyarrow's file info of a missing key adds a LIST of
    the prefix (is it a directory?), and a build asks this of every marker not yet written."""
    if _via_botocore(location):
        return _s3_head(str(location))
    return _info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    """A directory; on object storage, a prefix that holds at least one object."""
    if not is_remote(location):
        return Path(location).is_dir()
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        return True
    return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)))


def size(location: str | os.PathLike) -> int:
    info = _info(location)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    return info.size


def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_remote(location):
        return Path(location).read_bytes()
    if _via_botocore(location):
        return _s3_get(str(location))
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()  # compression=None: a .gz object is its own bytes, not pyarrow's guess
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no such file") from None


def read_range(location: str | os.PathLike, offset: int, length: int) -> bytes:
    """`length` bytes of a file from `offset`: on S3 one ranged GET (a scatter group's pack holds every bucket's
    piece of the group back to back: `pmd.final`). A range past the end of the file is an error, not fewer bytes."""
    if length <= 0:
        return b""
    if not is_remote(location):
        with open(location, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    elif _via_botocore(location):
        data = _s3_request(str(location), lambda **a: s3_client().get_object(
            Range=f"bytes={offset}-{offset + length - 1}", **a)["Body"].read())
    else:
        fs, path = resolve(location)
        try:
            with fs.open_input_file(path) as f:
                data = f.read_at(length, offset)
        except FileNotFoundError:
            raise FileNotFoundError(f"{location}: no such file") from None
    if len(data) != length:
        raise OSError(f"{location}: {length} bytes at {offset} asked, {len(data)} read (the file is shorter)")
    return data


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def open_input(location: str | os.PathLike | RemotePath):
    """A random-access file (pyarrow NativeFile) for pyarrow's readers; a local path opens as itself."""
    location = str(location)
    if not is_remote(location):
        return pafs.LocalFileSystem().open_input_file(str(location))
    fs, path = resolve(location)
    return fs.open_input_file(path)


#: Read-ahead of a sequential read on object storage (a metadata file streamed, a compressed archive): one ranged
#: GET per this many bytes.
STREAM_BUFFER = 8 << 20
#: Read-ahead of random access on object storage (a zip member's local header, a byte range of a file): one
#: ranged GET per miss, so zipfile's small reads of a header cost one request; a read larger than this (a member's
#: data) is one GET of exactly its size.
SEEK_BUFFER = 64 << 10


def open_seekable(location: str | os.PathLike, buffer_size: int = SEEK_BUFFER) -> IO[bytes]:
    """A seekable binary file: a local path as `open(path, "rb")`; an object read in place by ranged GETs, each
    read that misses the buffer fetching `buffer_size` bytes (or the read's own size, if larger). Nothing is
    downloaded beyond what is read: a zip's central directory and three of its members cost a few requests."""
    if not is_remote(location):
        return open(location, "rb")
    fs, path = resolve(location)
    try:
        raw = fs.open_input_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no such file") from None
    return io.BufferedReader(raw, buffer_size=buffer_size)  # pyarrow's NativeFile is a raw io.IOBase


#: Ranged GETs in flight at once when reading many members of one archive (`read_ranges`): a store's latency,
#: not its bandwidth, bounds one reader; this many requests overlap it.
RANGES_IN_FLIGHT = 16


class RangeFile(io.RawIOBase):
    """A remote object as a seekable file whose reads are served from byte ranges already fetched (`hold`, e.g.
    by `read_ranges`), else by one ranged GET of at least `readahead` bytes. zipfile reads a member as a header
    and then its data; with the member's whole range held that is no request at all."""

    def __init__(self, native, readahead: int = SEEK_BUFFER):
        self._f, self._size, self._pos, self._readahead = native, native.size(), 0, readahead
        self._held: dict[int, bytes] = {}  # start -> bytes, a few ranges
        self._last: tuple[int, bytes] = (0, b"")

    def hold(self, start: int, data: bytes) -> None:
        self._held[start] = data

    def release(self, start: int) -> None:
        self._held.pop(start, None)

    def _block(self, pos: int) -> tuple[int, bytes] | None:
        start, data = self._last
        if start <= pos < start + len(data):
            return self._last
        for start, data in self._held.items():
            if start <= pos < start + len(data):
                return start, data
        return None

    def readinto(self, buffer) -> int:
        view, filled = memoryview(buffer).cast("B"), 0
        while filled < len(view) and self._pos < self._size:
            block = self._block(self._pos)
            if block is None:
                want = min(max(len(view) - filled, self._readahead), self._size - self._pos)
                block = self._last = (self._pos, self._f.read_at(want, self._pos))
                if not block[1]:
                    break
            start, data = block
            piece = data[self._pos - start:self._pos - start + len(view) - filled]
            view[filled:filled + len(piece)] = piece
            filled += len(piece)
            self._pos += len(piece)
        return filled

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def read_at(self, nbytes: int, offset: int) -> bytes:
        return self._f.read_at(nbytes, offset)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_ranges(location: str | os.PathLike):
    """A remote object as a `RangeFile`, or a local file as pyarrow's (both have `read_at` and `size`)."""
    if not is_remote(location):
        return pafs.LocalFileSystem().open_input_file(str(location))
    fs, path = resolve(location)
    return RangeFile(fs.open_input_file(path))


def read_ranges(f, ranges: list[tuple[int, int]], in_flight: int | None = None):
    """(start, bytes or the OSError that reading it raised) for each (start, length) of `ranges`, in order, with
    up to `in_flight` ranged reads overlapping (pyarrow's read_at is thread-safe and releases the GIL)."""
    def read(item: tuple[int, int]) -> tuple[int, bytes | OSError]:
        try:
            return item[0], f.read_at(item[1], item[0])
        except OSError as e:
            return item[0], e

    return in_order(read, ranges, in_flight)


def in_order(fn, items: list, in_flight: int | None = None):
    """`fn(item)` for each item, yielded in order, up to `in_flight` (default RANGES_IN_FLIGHT) running at once in
    threads (I/O: requests to a store) and at most that many results held ahead of the consumer."""
    from concurrent.futures import ThreadPoolExecutor

    in_flight = in_flight or RANGES_IN_FLIGHT
    if not items:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(in_flight, len(items)))) as pool:
        pending = [pool.submit(fn, item) for item in items[:in_flight]]
        for i in range(len(items)):
            result = pending[i].result()
            pending[i] = None  # type: ignore[call-overload] - not held once yielded
            if i + in_flight < len(items):
                pending.append(pool.submit(fn, items[i + in_flight]))
            yield result


def open_stream(location: str | os.PathLike) -> IO[bytes]:
    """`open_seekable` for a sequential read: big read-ahead, so a metadata file streams in few requests."""
    return open_seekable(location, STREAM_BUFFER)


def fingerprint(location: str | os.PathLike) -> dict:
    """What identifies an input's content without reading it: for a local file its absolute path, size and
    mtime; for an object its URL, size and ETag (one HEAD; the Last-Modified time where a store gives no ETag);
    for a folder or prefix, the same of every file under it, as one digest."""
    if not is_remote(location):
        path = Path(location)
        st = path.stat()
        return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        entry: dict = {"path": str(location), "bytes": info.size}
        etag = _etag(fs, path)
        if etag is not None:
            entry["etag"] = etag
        else:
            entry["mtime_ns"] = info.mtime_ns
        return entry
    infos = sorted((i for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
                    if i.type == pafs.FileType.File), key=lambda i: i.path)
    if not infos:
        raise FileNotFoundError(f"{location}: no such file or prefix")
    listing = json.dumps([[i.path, i.size, i.mtime_ns] for i in infos]).encode()
    return {"path": str(location), "files": len(infos), "bytes": sum(i.size for i in infos),
            "listing_sha256": hashlib.sha256(listing).hexdigest()}


#: Keys of an fsspec filesystem's `info()` that change when an object's content does (s3fs, gcsfs, adlfs, ...).
_FSSPEC_VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash", "content_md5", "version_id", "LastModified",
                        "last_modified", "mtime", "created")


def _etag(fs: pafs.FileSystem, path: str) -> str | None:
    """The object's ETag: from the metadata pyarrow's S3 client keeps from its HEAD request (no data read), or for
    an fsspec filesystem from its `info()` (the first version-like key it has)."""
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, pafs.FSSpecHandler):
        try:
            info = fs.handler.fs.info(path)
        except (OSError, NotImplementedError):
            return None
        for key in _FSSPEC_VERSION_KEYS:
            if info.get(key) not in (None, ""):
                return f"{key}:{info[key]}".replace('"', "")
        return None
    try:
        with fs.open_input_file(path) as f:
            metadata = f.metadata()
    except (OSError, NotImplementedError):
        return None
    for key in ("ETag", b"ETag", "etag", b"etag"):
        value = metadata.get(key)
        if value:
            return (value.decode() if isinstance(value, bytes) else str(value)).strip('"')
    return None


def list_files(location: str | os.PathLike, suffix: str = "", recursive: bool = False) -> list[str]:
    """Files under a directory (or prefix) whose name ends in `suffix`, as locations of the same kind, sorted.
    Names starting with a dot (temporary files) are left out. A missing directory lists nothing."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    base = str(location).rstrip("/") if is_remote(location) else str(Path(location))
    found = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(suffix) or info.base_name.startswith("."):
            continue
        # fsspec filesystems may report their paths with a leading "/" (memory://) where `path` has none
        relative = info.path.lstrip("/")[len(path.lstrip("/")):].lstrip("/") if is_remote(location) else \
            info.path[len(path):].lstrip("/")
        found.append(join(base, *relative.split("/")))
    return sorted(found, key=lambda p: p.split("/"))  # as paths sort: by component


def delete(location: str | os.PathLike) -> None:
    """Remove a file; a missing one is not an error."""
    if not is_remote(location):
        Path(location).unlink(missing_ok=True)
        return
    if _via_botocore(location):
        _s3_delete(str(location))
        return
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_many(locations: Iterable[str | os.PathLike]) -> None:
    """Remove several files; missing ones are not an error. On S3 one multi-object DELETE per 1,000 keys of a
    bucket instead of a request per file."""
    locations = [str(loc) for loc in locations]
    if not locations or not all(_via_botocore(loc) for loc in locations):
        for loc in locations:
            delete(loc)
        return
    by_bucket: dict[str, list[str]] = {}
    for loc in locations:
        bucket, key = _s3_key(loc)
        by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
        for start in range(0, len(keys), 1000):
            try:
                _s3_delete_keys(f"s3://{bucket}", bucket, keys[start:start + 1000])
            except FileNotFoundError:  # no such bucket
                pass


def upload(local: Path, location: str | os.PathLike) -> None:
    """Copy a complete local file to `location` in one streamed PUT (multipart for large files)."""
    if not is_remote(location):
        Path(resolve(location)[1]).parent.mkdir(parents=True, exist_ok=True)
    with open(local, "rb") as src:
        upload_concatenated([src], location)


def upload_concatenated(sources: list[IO[bytes]], location: str | os.PathLike) -> list[int]:
    """Open local files (binary, read from their start), back to back as one object at `location`, in one
    streamed PUT (multipart for a large one): no local copy of the whole. Returns each source's length."""
    fs, path = resolve(location)
    with fs.open_output_stream(path, compression=None) as dst:
        return copy_concatenated(sources, dst)


def copy_concatenated(sources: list[IO[bytes]], dst) -> list[int]:  # type: ignore[no-untyped-def]
    """Open binary files, each from its start, written back to back to `dst` (anything with `write`); returns each
    source's length."""
    sizes = []
    for src in sources:
        src.seek(0)
        n = 0
        while block := src.read(8 << 20):
            dst.write(block)
            n += len(block)
        sizes.append(n)
    return sizes


def sha256(location: str | os.PathLike, block: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    if not is_remote(location):
        with open(location, "rb") as f:
            while data := f.read(block):
                digest.update(data)
        return digest.hexdigest()
    fs, path = resolve(location)
    with fs.open_input_stream(path, compression=None) as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


class RemotePath:
    """A location on object storage with the few `pathlib.Path` operations the build's work state uses (join,
    name, exists, read, list, delete), so that the work layout is one set of names whatever the store.

    No rename, no append, no memory map: an object is written whole, once, through pmd.atomic (`str(path)` is the
    URL, which pmd.atomic and pyarrow's readers take). `mkdir` is a no-op: prefixes exist by their objects. There
    is no `__fspath__` on purpose, so that no code opens a URL as a local file by mistake."""

    __slots__ = ("url",)

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:
        return self.url.split("/") < other.url.split("/")

    def __reduce__(self):
        return RemotePath, (self.url,)

    def __truediv__(self, part: str | os.PathLike) -> RemotePath:
        return RemotePath(join(self.url, *str(part).split("/")))

    @property
    def name(self) -> str:
        return basename(self.url)

    @property
    def stem(self) -> str:
        """The name without its last suffix, as Path.stem (task names are made of their markers' stems)."""
        name = self.name
        return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.url.rsplit("/", 1)[0])

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def exists(self) -> bool:
        return exists(self.url)

    def is_file(self) -> bool:
        return is_file(self.url)

    def is_dir(self) -> bool:
        return is_dir(self.url)

    def read_bytes(self) -> bytes:
        return read_bytes(self.url)

    def read_text(self) -> str:
        return read_text(self.url)

    def iterdir(self) -> Iterator[RemotePath]:
        fs, path = resolve(self.url)
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)):
            yield self / info.base_name

    def glob(self, pattern: str) -> list[RemotePath]:
        """The objects directly under this prefix whose name matches `pattern` (fnmatch), one LIST request."""
        return sorted(RemotePath(p) for p in list_files(self.url) if fnmatch.fnmatchcase(basename(p), pattern))

    def unlink(self, missing_ok: bool = False) -> None:
        if not missing_ok and not self.exists():
            raise FileNotFoundError(f"{self.url}: no such object")
        delete(self.url)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        pass


WorkPath = Path | RemotePath


def as_path(location: str | os.PathLike | RemotePath) -> WorkPath:
    """A location as the work layout handles it: a Path on local disk, a RemotePath for a URL (a URL must never go
    through `Path()`, which folds `s3://b` into `s3:/b`)."""
    if isinstance(location, (Path, RemotePath)):
        return location
    return RemotePath(str(location)) if is_remote(location) else Path(location)


def remove_tree(location: str | os.PathLike | RemotePath) -> None:
    """A directory (or every object under a prefix) and what it holds; a missing one is not an error."""
    if not is_remote(str(location)):
        shutil.rmtree(str(location), ignore_errors=True)
        return
    if _via_botocore(str(location)):
        try:
            _s3_remove_prefix(str(location))
        except FileNotFoundError:  # no such bucket
            pass
        return
    fs, path = resolve(str(location))
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
# ------------------------------------------------------------------------------------- conditional writes
# A small object written only if it is still what the caller last read (compare-and-swap): what pmd.lease builds
# one writer per corpus on. `version` is an opaque string from `read_versioned`; None means "absent".
#   local disk: create = link(2) of a complete temporary file (fails if the name exists, also over NFS);
#     replace = rename the current file aside to a unique name (only one renamer of an inode succeeds), check it
#     is the version read, then link the new one in (a concurrent creator that saw the name free in that instant
#     wins and the replace fails: safe, one writer either way).
#   s3:// : PUT with If-None-Match: * (create) or If-Match: ETAG (replace), DELETE with If-Match; S3 and
#     S3-compatible stores evaluate the condition atomically (HTTP 412 when it does not hold).
#   any other store (gs://, fsspec): read, compare, write. Not atomic: two writers acting within one round trip
#     of each other can both succeed (docs/build.md "One writer per corpus" names this window).
class PreconditionFailed(Exception):
    """The object is not (or no longer) in the version the caller expected."""


_S3_UNCONDITIONAL: set[str] = set()  # buckets whose store answered 501 to a conditional PUT


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def s3_client():
    """A botocore S3 client configured as pyarrow's S3 filesystem is (storage options, AWS_* variables): pyarrow
    exposes no conditional PUT, botocore does."""
    return _s3_client(_options(), os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
                      os.environ.get("AWS_DEFAULT_REGION"), os.getpid())


@functools.lru_cache(maxsize=4)
def _s3_client(options_json: str, env_endpoint: str | None, env_region: str | None, pid: int):
    import botocore.config
    import botocore.session

    options = json.loads(options_json)
    endpoint = options.get("endpoint_override") or env_endpoint
    if endpoint and "://" not in str(endpoint):
        endpoint = f"{options.get('scheme', 'https')}://{endpoint}"
    config = botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"},
                                    s3={"addressing_style": "path" if endpoint else "auto"})
    return botocore.session.get_session().create_client(
        "s3", region_name=options.get("region") or env_region or "us-east-1",
        endpoint_url=endpoint, aws_access_key_id=options.get("access_key"),
        aws_secret_access_key=options.get("secret_key"), aws_session_token=options.get("session_token"),
        config=config)


def _s3_key(location: str) -> tuple[str, str]:
    parts = urlsplit(location)
    return parts.netloc, parts.path.lstrip("/")


def _s3_status(error: Exception) -> int:
    return int(getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


#: The pyarrow S3 options that `s3_client` applies the same way. With any other (anonymous access, a role, a proxy)
#: a whole-object read stays with pyarrow's client, which honours them.
_BOTOCORE_OPTIONS = frozenset({"endpoint_override", "region", "access_key", "secret_key", "session_token", "scheme",
                               "allow_bucket_creation", "allow_delayed_open"})


def _via_botocore(location: str | os.PathLike) -> bool:
    """An S3 location whose storage options botocore's client applies as pyarrow's would."""
    return urlsplit(str(location)).scheme == "s3" and _botocore_mirrors(_options())


@functools.lru_cache(maxsize=16)
def _botocore_mirrors(options_json: str) -> bool:
    try:
        options = json.loads(options_json)
    except ValueError:
        return False  # pyarrow's path reports the bad options
    return isinstance(options, dict) and set(options) <= _BOTOCORE_OPTIONS


@contextlib.contextmanager
def _s3_errors(location: str) -> Iterator[None]:
    """botocore's errors of a request about `location` as the built-in OSErrors that the callers (and the retry
    policy) expect: 404 FileNotFoundError, 403 PermissionError, anything else OSError."""
    import botocore.exceptions

    try:
        yield
    except botocore.exceptions.ClientError as e:
        status = _s3_status(e)
        if status == 404:
            raise FileNotFoundError(f"{location}: no such file") from None
        if status == 403:
            raise PermissionError(f"{location}: access denied ({e})") from None
        raise OSError(f"{location}: {e}") from None
    except botocore.exceptions.BotoCoreError as e:  # no connection, a timeout, a body cut short
        raise OSError(f"{location}: {e}") from None


def _s3_request(location: str, call: Callable[..., object]):
    """`call(Bucket=, Key=)` of the location's object, its errors mapped by `_s3_errors`."""
    bucket, key = _s3_key(location)
    with _s3_errors(location):
        return call(Bucket=bucket, Key=key)


def _s3_get(location: str) -> bytes:
    """The whole object in one GET. pyarrow's input stream sends a HEAD and then ranged GETs of 256 KiB: 17 requests
    for 4 MiB, and about 8x the CPU of one GET on the client and on the store alike (docs/benchmarks.md)."""
    return _s3_request(location, lambda **a: s3_client().get_object(**a)["Body"].read())


def _s3_head(location: str) -> bool:
    if not _s3_key(location)[1] or location.endswith("/"):
        return False
    try:
        _s3_request(location, s3_client().head_object)
    except FileNotFoundError:
        return False
    return True


def _s3_delete(location: str) -> None:
    """One DELETE (S3 answers a missing key with success too). pyarrow's delete_file sends a HEAD first and then
    writes an empty marker object for the parent "directory" when it was the prefix's last key."""
    try:
        _s3_request(location, s3_client().delete_object)
    except FileNotFoundError:
        pass  # a bucket that is not there


def _s3_remove_prefix(location: str) -> None:
    """Every object under the prefix: a LIST and a multi-object DELETE per 1,000 keys. pyarrow's delete_dir
    sends the same and then PUTs an empty marker object for the parent "directory"."""
    bucket, key = _s3_key(location)
    prefix = key.rstrip("/") + "/" if key else ""
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    with _s3_errors(location):
        for page in pages:
            keys = [o["Key"] for o in page.get("Contents", [])]
            if keys:
                _s3_delete_keys(location, bucket, keys)


def _s3_delete_keys(location: str, bucket: str, keys: list[str]) -> None:
    """One multi-object DELETE (at most 1,000 keys); S3 reports a missing key as deleted."""
    with _s3_errors(location):
        done = s3_client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys],
                                                                 "Quiet": True})
    if done.get("Errors"):
        error = done["Errors"][0]
        raise OSError(f"{location}: could not delete {error.get('Key')}: {error.get('Code')} "
                      f"{error.get('Message', '')}".rstrip())


def read_versioned(location: str | os.PathLike) -> tuple[bytes, str] | None:
    """(bytes, version) of a small object, None when there is none."""
    text = str(location)
    if urlsplit(text).scheme == "s3":
        def get(**where) -> tuple[bytes, str]:
            reply = s3_client().get_object(**where)
            return reply["Body"].read(), reply["ETag"]

        try:
            return _s3_request(text, get)
        except FileNotFoundError:
            return None
    try:
        data = read_bytes(location)
    except FileNotFoundError:
        return None
    return data, _digest(data)


def put_if(location: str | os.PathLike, data: bytes, version: str | None) -> str:
    """Write `data` if the object is in `version` (None: if there is none); returns the new version. Raises
    PreconditionFailed otherwise."""
    text = str(location)
    if urlsplit(text).scheme == "s3":
        import botocore.exceptions

        bucket, key = _s3_key(text)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            if bucket not in _S3_UNCONDITIONAL:
                return s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except botocore.exceptions.ClientError as e:
            # 412: the condition does not hold; 409: a concurrent conditional write to the key; 404: gone (If-Match)
            if _s3_status(e) in (404, 409, 412):
                raise PreconditionFailed(text) from None
            if _s3_status(e) != 501:
                raise OSError(f"{location}: {e}") from None
            _S3_UNCONDITIONAL.add(bucket)
            log.warning("%s: this S3 store has no conditional writes (If-None-Match/If-Match); the lease falls back to "
                        "read-compare-write, which two writers starting at once can both pass (docs/build.md)", text)
        # a store without conditional writes: the generic path below (versions are still ETags: read_versioned)
    if is_remote(text):
        current = read_versioned(text)
        if (current is None) != (version is None) or (current is not None and current[1] != version):
            raise PreconditionFailed(text)
        from pmd import atomic  # pmd.atomic imports this module

        atomic.write_bytes(data, text)
        return read_versioned(text)[1]  # an S3 object's version is its ETag, not the digest
    return _local_put_if(Path(text), data, version)


def _local_put_if(path: Path, data: bytes, version: str | None) -> str:
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    new = path.with_name(f".{path.name}.new-{token}")
    with open(new, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if version is not None:
            aside = path.with_name(f".{path.name}.old-{token}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                raise PreconditionFailed(str(path)) from None
            if _digest(aside.read_bytes()) != version:  # changed since it was read: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink()
                raise PreconditionFailed(str(path))
            aside.unlink()
        try:
            os.link(new, path)
        except FileExistsError:
            raise PreconditionFailed(str(path)) from None
    finally:
        new.unlink(missing_ok=True)
    return _digest(data)


def delete_if(location: str | os.PathLike, version: str) -> None:
    """Remove the object if it is still in `version`; otherwise leave it (it is someone else's now)."""
    text = str(location)
    if urlsplit(text).scheme == "s3":
        import botocore.exceptions

        bucket, key = _s3_key(text)
        try:
            if bucket not in _S3_UNCONDITIONAL:
                s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=version)
                return
        except botocore.exceptions.ClientError as e:
            if _s3_status(e) in (404, 409, 412):
                return
            if _s3_status(e) != 501:
                raise OSError(f"{location}: {e}") from None
            _S3_UNCONDITIONAL.add(bucket)
    if is_remote(text):
        current = read_versioned(text)
        if current is not None and current[1] == version:
            delete(text)
        return
    import uuid

    path = Path(text)
    aside = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _digest(aside.read_bytes()) != version:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink()
