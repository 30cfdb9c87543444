"""Read image members straight out of the upstream archives (COCO, Visual Genome, ADE20K, Flickr30k zips and tars)
without extracting them to disk.

An ``ArchiveIndex`` maps an ``image_ref`` (the member path a source adapter writes, e.g.
``val2014/COCO_val2014_000000391895.jpg``) to a (source, member) pair. Sources are zip files, tar files (plain or
compressed) and directories of loose files; a directory's archives are indexed too (not archives inside archives).

Building the index:
- zip: reads the central directory only (no member data).
- plain .tar: one pass over the member headers (seeking over the data), remembering each member's data offset so
  reads are random access.
- compressed tar (.tar.gz/.tgz/.tar.bz2/.tar.xz): reads and decompresses the whole file once (there is no other way
  to list a compressed tar); reads are one sequential pass per ``read_many`` call.
- directory: one ``os.walk`` (sorted, symlinks not followed); the ref of a loose file is its path relative to the
  directory, with ``/`` separators.

On object storage (an `s3://`, `gs://` or other fsspec URL, `pmd.storage`) the same archives are read in place,
never downloaded whole: a zip through a seekable remote file (ranged GETs of its central directory, then of each
member read); a plain tar's headers by ranged reads (one small read per member), its members by one ranged GET
each; a compressed tar streamed. A prefix is a directory. Since listing a remote tar costs a request per member,
``build(paths, cache=LOCATION)`` keeps each remote archive's member list as a small JSON file under LOCATION
(local or remote), named by the archive's fingerprint (URL, size, ETag): a changed object is indexed again.

Resolving a ref: an exact match on the normalised member name (leading ``./`` and ``/`` dropped) first; else a
*unique* match on a path suffix of at least two components, so an archive that stores ``images/VG_100K_2/1.jpg``
still resolves ``VG_100K_2/1.jpg``. A suffix shared by several members is ambiguous and resolves to nothing (the
error string says which members). When the same member name appears in several sources, the first source given
to ``build`` wins (directory contents in sorted order).

Errors from ``read_many`` are strings ``"reason"`` or ``"reason: detail"``, with reason ``missing_member``,
``archive_error`` or ``too_large`` (the failure-table reason is the part before the first colon).

Size cap: a member whose declared size (zip central directory, tar header, file size on disk) is over
``max_bytes`` (``ImageOptions.max_image_bytes``, 32 MiB by default) is ``too_large`` before a byte of it is read,
and every read asks for at most ``max_bytes + 1`` bytes, so a member whose header understates it (or a file that
grows) is ``too_large`` too, never held whole. A 4 GiB member of zeros costs nothing to refuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pmd import atomic, storage
from pmd.images import ImageOptions
from pmd.reasons import Reason

log = logging.getLogger(__name__)

MISSING = Reason.MISSING_MEMBER
ARCHIVE_ERROR = Reason.ARCHIVE_ERROR
TOO_LARGE = Reason.TOO_LARGE
#: The default cap on one member's bytes: the image stage's own (a member is an image's encoded bytes).
DEFAULT_MAX_BYTES: int = ImageOptions.max_image_bytes

_ZIP = "zip"
_TAR = "tar"  # uncompressed: random access by data offset
_TAR_STREAM = "tar_stream"  # compressed: sequential only
_DIR = "dir"

_COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
_STATE_FORMAT = "pmd-archive-index"
_STATE_VERSION = 1
#: Where under the build's work location the member lists of remote archives are kept (`build(cache=...)`).
ARCHIVE_INDEX_DIR = "archive-index"
#: Read-ahead of a remote tar's header scan: a header block and a long name or pax header after it.
_TAR_HEADER_BUFFER = 4 << 10


class ArchiveError(ValueError):
    """An --images path that is neither a directory nor an archive pmd reads."""


def _archive_kind(path: Path | str) -> str | None:
    name = storage.basename(path).lower()
    if name.endswith(".zip"):
        return _ZIP
    if name.endswith(".tar"):
        return _TAR
    if name.endswith(_COMPRESSED_TAR_SUFFIXES):
        return _TAR_STREAM
    return None


def _normalise(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _error(reason: str, exc: BaseException | str) -> str:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return f"{reason}: {detail}"


def _too_large(member: str, declared: int | None, max_bytes: int) -> str:
    size = f"declares {declared:,} bytes" if declared is not None else "holds more bytes than its header says"
    return _error(TOO_LARGE, f"{member} {size}, over max_image_bytes={max_bytes:,}")


def _read_capped(stream, max_bytes: int) -> bytes | None:
    """The whole stream, or None once it holds more than ``max_bytes`` (at most max_bytes + 1 bytes are read)."""
    data = stream.read(max_bytes + 1)
    return None if len(data) > max_bytes else data


@dataclass
class _Source:
    kind: str
    path: str
    members: list[str]  # raw member names as stored (what to open), in archive order
    offsets: list[tuple[int, int]] | None = None  # plain tar only: (data offset, size) per member
    size: int | None = None  # archive size in bytes when indexed (plain tar offsets are only valid for it)
    # Per process, never serialised: the open ZipFile (and the file under it) and the pid that opened it.
    _zip: zipfile.ZipFile | None = field(default=None, repr=False, compare=False)
    _zip_raw: object = field(default=None, repr=False, compare=False)
    _zip_pid: int | None = field(default=None, repr=False, compare=False)

    def to_state(self) -> dict:
        state: dict = {"kind": self.kind, "path": self.path, "members": self.members}
        if self.offsets is not None:
            state["offsets"] = [list(o) for o in self.offsets]
        if self.size is not None:
            state["size"] = self.size
        return state

    @classmethod
    def from_state(cls, state: dict) -> _Source:
        offsets = state.get("offsets")
        return cls(
            kind=state["kind"],
            path=state["path"],
            members=list(state["members"]),
            offsets=[(int(o), int(s)) for o, s in offsets] if offsets is not None else None,
            size=state.get("size"),
        )

    def zip_file(self) -> zipfile.ZipFile:
        # Reopened after a fork: a shared file descriptor would share its offset with the parent.
        if self._zip is None or self._zip_pid != os.getpid():
            # Local: a file. Remote: a RangeFile, into which _read_zip puts each member's range fetched ahead.
            raw = storage.open_ranges(self.path) if storage.is_remote(self.path) else open(self.path, "rb")
            try:
                self._zip = zipfile.ZipFile(raw)
            except BaseException:
                raw.close()
                raise
            self._zip_raw, self._zip_pid = raw, os.getpid()
        return self._zip

    def close(self) -> None:
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
            self._zip_raw.close()
        self._zip = self._zip_raw = None
        self._zip_pid = None


def _scan(path: Path | str, cache: str | Path | None = None) -> list[_Source]:
    if storage.is_remote(path):
        return _scan_remote(str(path), cache)
    kind = _archive_kind(path)
    if kind == _ZIP:
        with zipfile.ZipFile(path) as zf:
            members = [info.filename for info in zf.infolist() if not info.is_dir()]
        return [_Source(_ZIP, str(path), members, size=path.stat().st_size)]
    if kind == _TAR:
        members, offsets = [], []
        # "r:" seeks over member data: only the 512-byte headers are read.
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if info.isreg() and not info.issparse():
                    members.append(info.name)
                    offsets.append((info.offset_data, info.size))
        return [_Source(_TAR, str(path), members, offsets, size=path.stat().st_size)]
    if kind == _TAR_STREAM:
        with tarfile.open(path, "r|*") as tf:
            members = [info.name for info in tf if info.isreg()]
        return [_Source(_TAR_STREAM, str(path), members, size=path.stat().st_size)]
    if path.is_dir():
        loose: list[str] = []
        nested: list[Path] = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            rel_root = Path(root).relative_to(path)
            for name in sorted(files):
                full = Path(root) / name
                if _archive_kind(full) is not None:
                    nested.append(full)
                else:
                    loose.append((rel_root / name).as_posix())
        sources = [_Source(_DIR, str(path), loose)] if loose else []
        for archive in nested:
            sources.extend(_scan(archive))
        return sources
    if not path.exists():
        raise FileNotFoundError(f"archive or directory not found: {path}")
    raise ArchiveError(f"{path}: not a directory nor a .zip/.tar/.tar.gz/.tgz/.tar.bz2/.tar.xz archive")


def _scan_remote(url: str, cache: str | Path | None) -> list[_Source]:
    """`_scan` of an object (an archive, through its cached member list when there is one) or of a prefix."""
    if storage.is_file(url):
        if _archive_kind(url) is None:
            raise ValueError(f"{url}: not a directory nor a .zip/.tar/.tar.gz/.tgz/.tar.bz2/.tar.xz archive")
        return [_remote_archive(url, cache)]
    files = storage.list_files(url, recursive=True)
    if not files:
        raise FileNotFoundError(f"archive or directory not found: {url}")
    base = url.rstrip("/") + "/"
    loose = [f[len(base):] for f in files if _archive_kind(f) is None]
    sources = [_Source(_DIR, url.rstrip("/"), loose)] if loose else []
    for archive in files:
        if _archive_kind(archive) is not None:
            sources.append(_remote_archive(archive, cache))
    return sources


def _remote_archive(url: str, cache: str | Path | None) -> _Source:
    fingerprint = storage.fingerprint(url)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]
    cached = storage.join(cache, f"{key}.json") if cache is not None else None
    if cached is not None and storage.exists(cached):
        state = json.loads(storage.read_text(cached))
        if state.get("fingerprint") == fingerprint and state.get("version") == _STATE_VERSION:
            log.info("member list of %s from %s", url, cached)
            return _Source.from_state(state["source"])
    source = _scan_remote_archive(url, fingerprint["bytes"])
    if cached is not None:
        atomic.write_json({"format": _STATE_FORMAT, "version": _STATE_VERSION, "fingerprint": fingerprint,
                           "source": source.to_state()}, cached)
    return source


def _scan_remote_archive(url: str, size: int) -> _Source:
    kind = _archive_kind(url)
    if kind == _ZIP:
        with storage.open_seekable(url) as raw, zipfile.ZipFile(raw) as zf:
            members = [info.filename for info in zf.infolist() if not info.is_dir()]
        return _Source(_ZIP, url, members, size=size)
    if kind == _TAR:
        members, offsets = [], []
        # A small read-ahead: tarfile seeks over each member's data, so every header is one ranged GET.
        with storage.open_seekable(url, _TAR_HEADER_BUFFER) as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            for info in tf:
                if info.isreg() and not info.issparse():
                    members.append(info.name)
                    offsets.append((info.offset_data, info.size))
        return _Source(_TAR, url, members, offsets, size=size)
    with storage.open_stream(url) as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
        members = [info.name for info in tf if info.isreg()]
    return _Source(_TAR_STREAM, url, members, size=size)


#: Bytes past a zip member's data fetched with it: its local header's extra field may be longer than the central
#: directory's (a short fetch is still correct: the rest is one more GET), and a data descriptor follows it.
_ZIP_SPAN_SLACK = 1024


def _zip_span(info: zipfile.ZipInfo) -> int:
    """Bytes from a member's local header to the end of its data, as the central directory tells them."""
    return (zipfile.sizeFileHeader + len(info.filename.encode("utf-8")) + len(info.extra) + info.compress_size
            + _ZIP_SPAN_SLACK)


def _read_at(f, nbytes: int, offset: int) -> bytes | OSError:
    try:
        return f.read_at(nbytes, offset)
    except OSError as e:
        return e


class ArchiveIndex:
    """Maps an image_ref (archive member path, e.g. 'val2014/COCO_val2014_000000391895.jpg', 'VG_100K_2/1.jpg',
    'ADEChallengeData2016/images/training/ADE_train_00000001.jpg', 'flickr30k-images/1000092795.jpg',
    'train2017/000000000009.jpg') to where it can be read.

    Open zip handles are cached per process between ``read_many`` calls; ``close()`` (or ``with``) releases them.
    Pickling goes through ``to_state`` so an index can be shipped to Ray workers without rescanning.
    """

    def __init__(self, sources: list[_Source]):
        self._sources = sources
        # normalised name -> (source index, member index); the first source that has the name wins.
        self._exact: dict[str, tuple[int, int]] = {}
        for s_idx, source in enumerate(sources):
            for m_idx, member in enumerate(source.members):
                self._exact.setdefault(_normalise(member), (s_idx, m_idx))
        # proper suffix of >= 2 components -> the one normalised name it came from, or a tuple of the names
        # (ambiguous).
        self._suffix: dict[str, str | tuple[str, ...]] = {}
        for name in self._exact:
            parts = name.split("/")
            for k in range(1, len(parts) - 1):
                suffix = "/".join(parts[k:])
                seen = self._suffix.get(suffix)
                if seen is None:
                    self._suffix[suffix] = name
                elif isinstance(seen, str):
                    self._suffix[suffix] = (seen, name)
                elif len(seen) < 3:  # a few names are enough for the error message
                    self._suffix[suffix] = (*seen, name)

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def build(cls, paths: Sequence[Path | str], cache: Path | str | None = None) -> ArchiveIndex:
        """Index zip files, tar files (plain or compressed) and directories (loose files and the archives in them),
        local or on object storage; `cache`: where remote archives' member lists are kept between builds."""
        sources: list[_Source] = []
        for path in paths:
            found = _scan(storage.location(path) if storage.is_remote(path) else Path(path).resolve(), cache)
            log.info("indexed %s: %d members", path, sum(len(s.members) for s in found))
            sources.extend(found)
        return cls(sources)

    def to_state(self) -> dict:
        """JSON-able: source kinds, paths and member names (and plain-tar offsets); no handles, no rescanning."""
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "sources": [s.to_state() for s in self._sources],
        }

    @classmethod
    def from_state(cls, state: dict) -> ArchiveIndex:
        if state.get("format") != _STATE_FORMAT or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not an ArchiveIndex state of version {_STATE_VERSION}: "
                f"format={state.get('format')!r} version={state.get('version')!r}"
            )
        return cls([_Source.from_state(s) for s in state["sources"]])

    def __getstate__(self) -> dict:
        return self.to_state()

    def __setstate__(self, state: dict) -> None:
        self.__init__([_Source.from_state(s) for s in state["sources"]])

    def close(self) -> None:
        for source in self._sources:
            source.close()

    def __enter__(self) -> ArchiveIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        """Distinct member names (exact refs)."""
        return len(self._exact)

    def refs(self) -> list[str]:
        """Every distinct member name (normalised), in index order: what a caller reading a whole set iterates."""
        return list(self._exact)

    def __contains__(self, ref: object) -> bool:
        return isinstance(ref, str) and isinstance(self._resolve(ref), tuple)

    def _resolve(self, ref: str) -> tuple[int, int] | str:
        """(source index, member index), or the error string."""
        name = _normalise(ref)
        hit = self._exact.get(name)
        if hit is not None:
            return hit
        match = self._suffix.get(name)
        if match is None:
            return MISSING
        if isinstance(match, tuple):
            return _error(MISSING, f"ambiguous suffix {name!r} matches {', '.join(repr(m) for m in match)}")
        return self._exact[match]

    def locate(self, ref: str) -> tuple[str, str]:
        """(archive or directory path, member name as stored); KeyError if the ref is absent or ambiguous."""
        hit = self._resolve(ref)
        if isinstance(hit, str):
            raise KeyError(f"{ref!r}: {hit}")
        source = self._sources[hit[0]]
        return source.path, source.members[hit[1]]

    # ------------------------------------------------------------------------------------------------ reading
    def read_many(self, refs: Iterable[str], max_bytes: int = DEFAULT_MAX_BYTES,
                  ) -> Iterator[tuple[str, bytes | None, str | None]]:
        """Yield ``(ref, data, error)`` once per requested ref (duplicates once per request), grouped by source.

        Zip members are read in central-directory offset order from one open ZipFile; plain tar members by seek;
        compressed tars in one sequential pass that stops once every wanted member is read; loose files with
        open(). A bad member yields an ``archive_error`` for that ref only; an unreadable archive, for its refs.
        A member over ``max_bytes`` (declared or read) yields ``too_large`` and is never held whole.
        """
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        # source index -> member index -> the refs (as given) that asked for it
        wanted: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        for ref in refs:
            hit = self._resolve(ref)
            if isinstance(hit, str):
                yield ref, None, hit
            else:
                wanted[hit[0]][hit[1]].append(ref)
        for s_idx in sorted(wanted):
            source = self._sources[s_idx]
            reader = {_ZIP: self._read_zip, _TAR: self._read_tar, _TAR_STREAM: self._read_tar_stream,
                      _DIR: self._read_dir}[source.kind]
            for m_idx, data, error in reader(source, wanted[s_idx], max_bytes):
                for ref in wanted[s_idx][m_idx]:
                    yield ref, data, error

    @staticmethod
    def _read_zip(source: _Source, members: dict[int, list[str]], max_bytes: int,
                  ) -> Iterator[tuple[int, bytes | None, str | None]]:
        try:
            zf = source.zip_file()
            infos = []
            for m_idx in members:
                infos.append((zf.getinfo(source.members[m_idx]), m_idx))
        except Exception as e:  # noqa: BLE001 - the archive is gone, changed or corrupt: fail its refs, not the batch
            source.close()
            for m_idx in members:
                yield m_idx, None, _error(ARCHIVE_ERROR, e)
            return
        infos.sort(key=lambda item: item[0].header_offset)  # sequential on disk
        raw = source._zip_raw if isinstance(source._zip_raw, storage.RangeFile) else None
        # On object storage each member's whole range (local header + data) is fetched ahead, several at once:
        # a store's latency per request, not its bandwidth, is what a member read costs.
        fetched = storage.read_ranges(raw, [(info.header_offset, _zip_span(info)) for info, _ in infos
                                            if info.file_size <= max_bytes]) if raw is not None else None
        for info, m_idx in infos:
            if info.file_size > max_bytes:
                yield m_idx, None, _too_large(info.filename, info.file_size, max_bytes)
                continue
            if fetched is not None:
                start, block = next(fetched)
                if isinstance(block, OSError):
                    yield m_idx, None, _error(ARCHIVE_ERROR, block)
                    continue
                raw.hold(start, block)
            try:
                # Reading to the end checks the CRC: a flipped byte is BadZipFile, a mangled stream zlib.error.
                with zf.open(info) as member:
                    data = _read_capped(member, max_bytes)
            except Exception as e:  # noqa: BLE001 - one bad member must not fail the others
                yield m_idx, None, _error(ARCHIVE_ERROR, e)
            else:
                yield (m_idx, None, _too_large(info.filename, None, max_bytes)) if data is None else (m_idx, data, None)
            finally:
                if fetched is not None:
                    raw.release(info.header_offset)

    @staticmethod
    def _read_tar(source: _Source, members: dict[int, list[str]], max_bytes: int,
                  ) -> Iterator[tuple[int, bytes | None, str | None]]:
        assert source.offsets is not None
        order = sorted(members, key=lambda m: source.offsets[m][0])
        try:
            f = storage.open_ranges(source.path)  # random access; on object storage one ranged GET per read_at
            size = f.size()
        except OSError as e:
            for m_idx in order:
                yield m_idx, None, _error(ARCHIVE_ERROR, e)
            return
        with f:
            if source.size is not None and size != source.size:
                # Offsets from another version of the file would read the wrong bytes.
                for m_idx in order:
                    yield m_idx, None, _error(ARCHIVE_ERROR, f"{source.path} changed size since it was indexed")
                return
            small = [source.offsets[m] for m in order if source.offsets[m][1] <= max_bytes]
            # Remote: several members' GETs in flight at once; local: one read after the other.
            fetched = (storage.read_ranges(f, small) if storage.is_remote(source.path)
                       else ((o, _read_at(f, n, o)) for o, n in small))
            for m_idx in order:
                offset, length = source.offsets[m_idx]
                if length > max_bytes:
                    yield m_idx, None, _too_large(source.members[m_idx], length, max_bytes)
                    continue
                _, data = next(fetched)
                if isinstance(data, OSError):
                    yield m_idx, None, _error(ARCHIVE_ERROR, data)
                    continue
                if len(data) != length:
                    yield m_idx, None, _error(ARCHIVE_ERROR, f"truncated member: {len(data)} of {length} bytes")
                else:
                    yield m_idx, data, None

    @staticmethod
    def _read_tar_stream(
        source: _Source, members: dict[int, list[str]], max_bytes: int
    ) -> Iterator[tuple[int, bytes | None, str | None]]:
        # One member name may be asked for under one member index only (the first occurrence in the index).
        pending: dict[str, int] = {source.members[m_idx]: m_idx for m_idx in members}
        try:
            with storage.open_stream(source.path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
                for info in tf:
                    m_idx = pending.get(info.name)
                    if m_idx is None or not info.isreg():
                        continue
                    # A corrupt compressed stream fails here or on the next header; either way the rest of the
                    # archive is unreadable, which the outer handler reports for every member still pending.
                    if info.size > max_bytes:  # skipped by the next header read, never decompressed into memory
                        yield pending.pop(info.name), None, _too_large(info.name, info.size, max_bytes)
                        if not pending:
                            break
                        continue
                    fobj = tf.extractfile(info)
                    data = _read_capped(fobj, max_bytes) if fobj is not None else b""
                    if data is None:
                        yield pending.pop(info.name), None, _too_large(info.name, None, max_bytes)
                    elif len(data) != info.size:
                        yield pending.pop(info.name), None, _error(ARCHIVE_ERROR, "truncated member")
                    else:
                        yield pending.pop(info.name), data, None
                    if not pending:
                        break  # nothing more wanted: do not decompress the rest
        except Exception as e:  # noqa: BLE001 - truncated/corrupt archive: fail what was not read yet
            for m_idx in list(pending.values()):
                yield m_idx, None, _error(ARCHIVE_ERROR, e)
            return
        for m_idx in pending.values():  # listed when indexed but not found now: the file changed
            yield m_idx, None, _error(MISSING, f"not found in {source.path} (changed since indexed?)")

    @staticmethod
    def _read_dir(source: _Source, members: dict[int, list[str]], max_bytes: int,
                  ) -> Iterator[tuple[int, bytes | None, str | None]]:
        if storage.is_remote(source.path):
            yield from ArchiveIndex._read_remote_dir(source, members, max_bytes)
            return
        root = Path(source.path)
        for m_idx in members:
            name = source.members[m_idx]
            try:
                with open(root / name, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    data = _read_capped(f, max_bytes) if size <= max_bytes else None
                if data is None:
                    yield m_idx, None, _too_large(name, size if size > max_bytes else None, max_bytes)
                    continue
            except FileNotFoundError:
                yield m_idx, None, _error(MISSING, f"{source.members[m_idx]} vanished from {source.path}")
            except OSError as e:
                yield m_idx, None, _error(ARCHIVE_ERROR, e)
            else:
                yield m_idx, data, None

    @staticmethod
    def _read_remote_dir(source: _Source, members: dict[int, list[str]], max_bytes: int,
                         ) -> Iterator[tuple[int, bytes | None, str | None]]:
        def read(m_idx: int) -> tuple[int, bytes | None, str | None]:
            name = source.members[m_idx]
            try:
                with storage.open_input(storage.join(source.path, name)) as f:
                    size = f.size()  # from the HEAD that opened it: a large object is refused unread
                    data = _read_capped(f, max_bytes) if size <= max_bytes else None
            except FileNotFoundError:
                return m_idx, None, _error(MISSING, f"{name} vanished from {source.path}")
            except OSError as e:
                return m_idx, None, _error(ARCHIVE_ERROR, e)
            if data is None:
                return m_idx, None, _too_large(name, size if size > max_bytes else None, max_bytes)
            return m_idx, data, None

        yield from storage.in_order(read, list(members))  # several objects' requests in flight at once
