"""One way to write a file: a reader sees the old file, or no file, or the whole new one, never a part.

Local disk: the bytes go to a temporary name in the same directory (`.NAME.tmp-OWNER`, OWNER = the writer's pid
unless given), are fsynced, then renamed over NAME. The temp name starts with a dot and does not end in the final
suffix, so no glob for `*.parquet`, `*.json` or `*.tar` ever picks up a partial file, and `remove_temp_files`
finds what a killed writer left. Object storage (a URL that `pmd.storage` resolves): a PUT is atomic, so the
object is written under its final name directly, from a local temporary file once it is complete.

Every writer of the project goes through here: shards, work files, markers, manifests, tars, tokenizers,
checkpoints, exported models, fetched assets. (A resumable download's `NAME.part`, pmd.fetch, is a different thing:
a partial file kept on purpose so that the next attempt continues it.)
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pmd import storage

TEMP_MARK = ".tmp-"

# ----------------------------------------------------------------------------------------------- disk full
# A write that finds no space (ENOSPC, EDQUOT) or a store's quota error raises OutOfSpace naming the file it was
# writing; the partial temporary is removed, what was committed before stays, so the rerun after space is freed
# resumes. Object stores report quotas in words, not errno: these are the words of S3-compatible stores (MinIO,
# Ceph RGW), GCS and HTTP 507.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = re.compile(r"no space left|quota ?exceeded|storage ?full|insufficient storage|HTTP status 507",
                         re.IGNORECASE)
#: Test hook (fault injection): `PATTERN[@N]` makes the Nth commit (default the first) in each process of an
#: atomic write whose target matches the fnmatch PATTERN fail with ENOSPC. An environment variable, so that the
#: spawned pool workers and Ray workers of a build inherit it.
FAULT_ENV = "PMD_FAULT_ENOSPC"
_fault_counts: dict[str, int] = {}


class OutOfSpace(OSError):
    """No space left (or a quota reached) writing `filename`, in `phase` (what the command was doing)."""

    def __init__(self, filename: str, detail: str = "no space left on device", phase: str | None = None):
        super().__init__(errno.ENOSPC, detail, filename)
        self.detail, self.phase = detail, phase

    def __reduce__(self):  # across a process pool: the arguments, not OSError's (errno, strerror, filename)
        return OutOfSpace, (self.filename, self.detail, self.phase)

    def __str__(self) -> str:
        return (f"{self.detail} writing {self.filename}" + (f" (phase {self.phase})" if self.phase else "")
                + "; what was finished is kept: free space and rerun the same command to resume")


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and (exc.errno in _FULL_ERRNOS or bool(_FULL_WORDS.search(str(exc))))


def out_of_space(exc: BaseException | None) -> OSError | None:
    """The out-of-space error behind `exc` (itself, a cause or context, or the cause a Ray task error carries)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)  # a RayTaskError's: the task's own exception, with its filename
        if isinstance(inner, BaseException) and inner is not exc and (found := out_of_space(inner)) is not None:
            return found
        if is_out_of_space(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def stop_when_full(phase: Callable[[str], str | None]) -> Iterator[None]:
    """Turn an out-of-space error anywhere below (any process) into one OutOfSpace naming the file and the phase
    `phase(filename)` gives: the one line a command prints."""
    try:
        yield
    except BaseException as exc:
        full = out_of_space(exc)
        if full is None:
            raise
        filename = str(full.filename or "?")
        detail = full.detail if isinstance(full, OutOfSpace) else (full.strerror or "no space left on device")
        raise OutOfSpace(filename, detail, phase(filename)) from None


def phase_of(path: str, roots: Sequence[str | os.PathLike]) -> str | None:
    """The phase a build file belongs to: its first path component under the deepest of `roots` holding it
    (`work/images/coco/chunk-00001.arrow` under the work directory -> `images`; `OUT/shards/...` -> `shards`;
    `OUT/manifest.json` -> `manifest`)."""
    for root in sorted((str(r).rstrip("/") for r in roots), key=len, reverse=True):
        if path.startswith(root + "/") or path.startswith(root + os.sep):
            first = path[len(root) + 1:].replace(os.sep, "/").split("/")[0]
            return first.lstrip(".").split(TEMP_MARK)[0].rsplit(".", 1)[0] or None
    return None


def _inject_fault(target: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    pattern, _, nth = spec.rpartition("@") if "@" in spec else (spec, "", "1")
    if fnmatch.fnmatch(target, pattern):
        _fault_counts[spec] = _fault_counts.get(spec, 0) + 1
        if _fault_counts[spec] == int(nth):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({FAULT_ENV})", target)


def _full(exc: OSError, target: str) -> OutOfSpace:
    return OutOfSpace(target, exc.strerror if exc.errno in _FULL_ERRNOS and exc.strerror else str(exc))


def temp_path(path: Path, owner: str | int | None = None) -> Path:
    """The temporary sibling of `path`. `owner` defaults to this process's pid; writers that share one temporary
    (every rank of a distributed checkpoint) name a common owner."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid() if owner is None else owner}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: on POSIX the new directory entry is only on disk once the directory is synced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform or filesystem that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A file being written: `file` is open for binary writing; `commit` puts it in place, `abort` drops it.

    For writers that keep several outputs open at once (one per bucket); `atomic_file` is the usual way in."""

    def __init__(self, target: str | os.PathLike):
        self.target = str(target)
        self.remote = storage.is_remote(self.target)
        if self.remote:
            fd, name = tempfile.mkstemp(prefix="pmd-upload-")
            self.tmp = Path(name)
            self.file: IO[bytes] = os.fdopen(fd, "wb")
        else:
            final = Path(self.target)
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = temp_path(final)
            self.file = open(self.tmp, "wb")

    def commit(self) -> None:
        try:
            self._commit()
        except OSError as e:
            if not is_out_of_space(e):
                raise
            self.abort()  # frees the space the partial file held
            raise _full(e, self.target) from e

    def _commit(self) -> None:
        self.file.flush()
        _inject_fault(self.target)
        if self.remote:
            self.file.close()
            try:
                storage.upload(self.tmp, self.target)
            finally:
                self.tmp.unlink(missing_ok=True)
            return
        os.fsync(self.file.fileno())
        self.file.close()
        final = Path(self.target)
        os.replace(self.tmp, final)
        _fsync_directory(final.parent)

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:  # the close flushes what is buffered: on a full disk that fails too
            pass
        self.tmp.unlink(missing_ok=True)


def write_concatenated(sources: list[IO[bytes]], target: str | os.PathLike) -> list[int]:
    """Open binary files, back to back, as one file at `target`, which appears whole or not at all as with
    `atomic_file`; returns each source's length. On object storage the bytes stream from the sources to the store:
    no local copy of the whole, which for a scatter group's pack at PMD's size would be tens of GB of scratch."""
    if not storage.is_remote(str(target)):
        with atomic_file(target) as out:
            return storage.copy_concatenated(sources, out)
    _inject_fault(str(target))
    return storage.upload_concatenated(sources, target)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[IO[bytes]]:
    """`with atomic_file(path) as f: f.write(...)`: the file appears under its name when the block ends without
    an exception, and not at all otherwise."""
    f = AtomicFile(target)
    try:
        yield f.file
    except BaseException as e:
        f.abort()
        if isinstance(e, OSError) and is_out_of_space(e) and not isinstance(e, OutOfSpace):
            raise _full(e, f.target) from e
        raise
    f.commit()


def write_bytes(data: bytes, target: str | os.PathLike) -> None:
    with atomic_file(target) as f:
        f.write(data)


def write_json(data: Mapping | Sequence, target: str | os.PathLike) -> None:
    """JSON with two-space indentation and a final newline (the format of every JSON file the project writes)."""
    write_bytes((json.dumps(data, indent=2) + "\n").encode(), target)


def write_parquet(table: pa.Table, target: str | os.PathLike, **options: Any) -> None:
    """`options` go to pyarrow.parquet.write_table (row_group_size, compression, ...)."""
    with atomic_file(target) as f:
        pq.write_table(table, f, **options)


def write_parquet_row_groups(groups: Sequence[pa.Table], target: str | os.PathLike, schema: pa.Schema,
                             **options: Any) -> None:
    """One row group per table given (a rewrite that keeps a file's row groups)."""
    with atomic_file(target) as f:
        with pq.ParquetWriter(f, schema, **options) as writer:
            for group in groups:
                writer.write_table(group, row_group_size=max(group.num_rows, 1))


def write_ipc(table: pa.Table, target: str | os.PathLike, options: pa.ipc.IpcWriteOptions | None = None) -> None:
    """An Arrow IPC file (random access format) holding `table`."""
    with atomic_file(target) as f:
        with pa.ipc.new_file(f, table.schema, options=options) as writer:
            writer.write_table(table)


@contextmanager
def atomic_directory(path: str | os.PathLike, owner: str | int | None = None, create: bool = True) -> Iterator[Path]:
    """Fill the yielded temporary directory; when the block ends without an exception it replaces `path` (an
    older directory of that name is removed first). `create=False`: the caller creates it (several writers
    sharing one temporary name: see `temp_path`). On an exception the temporary directory is left for
    `remove_temp_files` (another writer may still hold it)."""
    final = Path(path)
    tmp = temp_path(final, owner)
    if create:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    yield tmp
    replace_directory(tmp, final)


def replace_directory(tmp: Path, final: Path) -> None:
    """Move a complete temporary directory into place. Between the removal of an older `final` and the rename
    there is an instant without one: readers treat a missing directory as absent, never as partial."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_directory(final.parent)


def remove_temp_files(directory: str | os.PathLike) -> int:
    """Temporary files and directories left under `directory` by killed writers; returns how many were removed.
    Object storage has none (objects are written whole), so a URL removes nothing."""
    if storage.is_remote(str(directory)):
        return 0
    directory = Path(directory)
    removed = 0
    if directory.exists():
        for p in sorted(directory.rglob(f".*{TEMP_MARK}*"), key=lambda p: len(p.parts), reverse=True):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    return removed
