"""The final phase of `pmd build`: finished chunks -> deduplicated, globally shuffled shards, failures, accounting.

Library code, no Ray: every function here is one task's work on files under OUT/work/final; `pmd.build_plan`
schedules them and holds only counts and small per-group/per-bucket summaries (never a row per candidate).

The corpus order is a total order on kept rows, fixed by the finished chunks and the configuration alone:
    (bucket, shuffle_hash, key)    bucket = image_bucket(image_sha256, n_buckets), shuffle_hash = blake2b(seed:key)
cut into runs of `shard_rows`. `bucket` is a range partition of the (uniform) image digest whose boundaries are known
before any image is fetched, so the work is an external sort in two passes with O(chunks + shards) files:

  A. scatter (one task per group of consecutive chunks of one source): each ok row is appended to its bucket's
     piece `pieces/bucket-B/group-S-G.arrow` (images included); failed rows go to `failed/SOURCE/group-G...arrow`
     (metadata). Then the group's marker is written and its chunk files are deleted: no second copy of an image
     outlives the pass. groups x buckets <= PIECES_PER_INPUT x (chunks + shards). With the work on object storage
     the group's pieces are one object, `packs/SOURCE/group-G.pack` (each bucket's byte range in the marker), as
     a shuffle writes one file and an index per map task: a PUT per group, not per (group, bucket). The packs are
     deleted once every bucket is written (`release_packs`).
  B1. dedup (one task per bucket, metadata columns only, memory-mapped): every (image_sha256, text) group lies in
     one bucket (same digest, same bucket), so the rule "first in (source order, candidate order)" is decided
     inside the bucket; the kept count per bucket gives every bucket's global row offset.
  B2. write (one task per bucket): kept rows sorted by (shuffle_hash, key) at global positions offset.., cut at the
     global shard boundaries; shards wholly inside the bucket are written, the ends that straddle a neighbour are
     written as fragments that `merge_shard` joins. Then the bucket's pieces are deleted.
  On object storage B1 fetches each piece whole (one GET: a range of its group's pack) and writes the bucket's
  kept rows in corpus order as one object, `ordered/bucket-B.arrow`, which B2 reads instead of the pieces while
  the bucket's pieces and decision inputs are the ones it names (`_ordered_rows`): a bucket's pieces are read
  once, not twice.

Every image is read from disk twice after the image stage (chunk in A, piece in B2; a straddling shard's rows once
more from its fragment), every output is written under a temporary name and renamed, and every pass has a marker
written after its outputs: a killed build resumes at the first unfinished task and writes the same bytes.
Rows of one image stay in one bucket (about BUCKET_SHARDS shards), which is what lets dedup and unique-image
counts be local; within that the order is a uniform shuffle of the whole corpus.

Takedown requests recorded in OUT/takedowns (`pmd.takedown.TakedownFilter`) are decided in B1 and B2 after dedup:
a kept row a request names becomes a failure with stage and reason `takedown` (in the bucket's duplicates file),
so no build, rebuild or retry ever writes it to a shard.

`retry_group` (`--retry-failures`) downloads again the transient failures of a scattered group and adds the rows
that now succeed as extra pieces; a finished build is first taken back to pieces (`unbuild_shard`,
`reopen_bucket`), so the shards after a retry are exactly those of a build whose first attempt had succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pmd import atomic, placeholders, schema, storage
from pmd.takedown import TAKEDOWN, TakedownFilter, removed_rows
from pmd.build import (CANDIDATE_INDEX, CHUNK_SCHEMA, DETAIL, REASON, SHUFFLE_HASH, SOURCE_INDEX, STAGE, TEXT_HASH,
                       ChunkTask, ipc_writer, read_chunk, read_ipc, read_ipc_from, retry_rows, write_ipc_atomic)
from pmd.http_client import is_transient
from pmd.reasons import Reason, Stage
from pmd.shards import describe_file, shard_name, shuffle_hash, text_hash, write_shard_file

log = logging.getLogger(__name__)

WORK_DIR = "work"  # OUT/work: the work state of a build whose OUT is a local directory
FINAL_DIR = "final"  # under the work directory
WORK_FORMAT = 2  # of OUT/work: 2 = bucketed final phase (a work directory of another format is not reused)
BUCKET_SHARDS = 4  # expected kept rows per bucket, in shards: a B2 task holds one bucket in memory
PIECES_PER_INPUT = 2  # piece files allowed per (chunk + shard): sets how many chunks a scatter group takes
SHARDS_IN_FLIGHT = 2  # shards of one bucket written at once when OUT or the work is on object storage
IN_FLIGHT_SHARE = 0.2  # share of groups/buckets in flight at once: bounds the data present twice on disk
FAILURE_ROW_GROUP_ROWS = 100_000
RETRY_SLICE_ROWS = 2_000  # rows a retry task downloads and processes at once (about one chunk)
PACKS_DIR = "packs"  # under the final directory: the scatter groups' packs (work on object storage)
FLUSH_BYTES = 1 << 20  # a bucket's buffered rows are appended to its piece past this size...
BUFFER_BYTES = 256 << 20  # ... and all buffers past this total: scatter memory is bounded, whatever the bucket count

METADATA_COLUMNS = [n for n in CHUNK_SCHEMA.names if n != schema.IMAGE]
PIECE_SCHEMA = CHUNK_SCHEMA.remove_metadata()
FAILED_SCHEMA = pa.schema([PIECE_SCHEMA.field(n) for n in METADATA_COLUMNS])
KEPT_SCHEMA = pa.schema([pa.field(schema.KEY, pa.string()), pa.field(SOURCE_INDEX, pa.int32()),
                         pa.field(CANDIDATE_INDEX, pa.int64())])
DUPLICATE = (Stage.DEDUP, Reason.DUPLICATE)


# ------------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """How the final phase cuts the work: a pure function of the configuration and the ingest counts."""

    n_buckets: int
    chunks_per_group: int
    shard_rows: int
    row_group_rows: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_layout(chunks_per_source: list[int], candidates: int, shard_rows: int, row_group_rows: int) -> Layout:
    """Buckets of ~BUCKET_SHARDS shards of candidates; groups as large as the piece-file budget requires."""
    chunks = max(1, sum(chunks_per_source))
    shards = max(1, -(-candidates // shard_rows))
    n_buckets = max(1, -(-candidates // (BUCKET_SHARDS * shard_rows)))
    groups = max(1, min(chunks, PIECES_PER_INPUT * (chunks + shards) // n_buckets))
    return Layout(n_buckets, -(-chunks // groups), shard_rows, row_group_rows)


def group_ranges(layout: Layout, n_chunks: int) -> list[range]:
    """The chunk indices of each scatter group of a source with `n_chunks` chunks."""
    k = layout.chunks_per_group
    return [range(g, min(g + k, n_chunks)) for g in range(0, n_chunks, k)]


def image_bucket(sha256_hex: str, n_buckets: int) -> int:
    """The bucket of an image: a range of its (uniformly distributed) digest, so boundaries are known a priori."""
    return int(sha256_hex[:16], 16) * n_buckets >> 64


@dataclass(frozen=True)
class FinalPaths:
    work: storage.WorkPath  # the build's work directory: a local directory or a prefix on object storage

    @property
    def root(self) -> storage.WorkPath:
        return self.work / FINAL_DIR

    def bucket_dir(self, b: int) -> Path:
        return self.root / "pieces" / f"bucket-{b:05d}"

    def pack(self, source: str, g: int) -> Path:
        """A scatter group's pieces back to back in one object (work on object storage): `_PieceWriters`."""
        return self.root / PACKS_DIR / source / f"group-{g:05d}.pack"

    @property
    def packs_consumed(self) -> Path:
        """The packs whose rows are all in shards now: never read again (`release_packs`)."""
        return self.root / "packs-consumed.json"

    def group_marker(self, source: str, g: int) -> Path:
        return self.root / "groups" / source / f"group-{g:05d}.json"

    def failed(self, source: str, g: int, attempt: int) -> Path:
        return self.root / "failed" / source / f"group-{g:05d}-a{attempt:02d}.arrow"

    def dedup(self, b: int) -> Path:
        return self.root / "dedup" / f"bucket-{b:05d}.json"

    def duplicates(self, b: int) -> Path:
        return self.root / "dedup" / f"bucket-{b:05d}-duplicates.arrow"

    def kept(self, b: int) -> Path:
        return self.root / "kept" / f"bucket-{b:05d}.arrow"

    def ordered(self, b: int) -> Path:
        """The bucket's kept rows in corpus order, written by B1 when the work is on object storage."""
        return self.root / "ordered" / f"bucket-{b:05d}.arrow"

    def written(self, b: int) -> Path:
        return self.root / "written" / f"bucket-{b:05d}.json"

    def fragment_dir(self, shard: int) -> Path:
        return self.root / "fragments" / f"shard-{shard:05d}"

    def entry(self, shard: int) -> Path:
        return self.root / "entries" / f"shard-{shard:05d}.json"

    def failures_marker(self, source: str) -> Path:
        """failures/SOURCE.parquet's manifest entry and the digest of what it was written from (pmd.build_plan)."""
        return self.root / "failures" / f"{source}.json"

    @property
    def unbuild_state(self) -> Path:
        return self.root / "unbuild.json"


@dataclass(frozen=True)
class BuildDirs:
    """Where a build's files go: OUT (shards, failures, the manifest, takedown records: a local path or an object
    storage URL) and its work state (OUT/work by default, on disk or on the same store: `pmd.layout`). A plain
    path stands for a local OUT with its work under it."""

    out: str
    work: str

    @classmethod
    def of(cls, value: BuildDirs | str | Path) -> BuildDirs:
        if isinstance(value, BuildDirs):
            return value
        return cls(str(value), storage.join(value, WORK_DIR))

    @property
    def paths(self) -> FinalPaths:
        return FinalPaths(storage.as_path(self.work))

    def output(self, relative: str) -> str | Path:
        """A file of the corpus (`shards/shard-00000.parquet`) in OUT."""
        return storage.location(storage.join(self.out, *relative.split("/")))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def finished_elsewhere(marker: storage.WorkPath) -> dict:
    """The result of a task whose inputs another attempt of it consumed (Ray re-running a task beside its first
    attempt): that attempt wrote its marker before deleting them, so the marker exists, and it is the result. A
    task that consumes its inputs checks its marker again after reading them: inputs found missing (or a listing
    come back empty) while its marker exists mean another attempt finished, never that there were none."""
    if not marker.is_file():
        raise FileNotFoundError(f"{marker}: the task's inputs are gone and no attempt of it has finished")
    return json.loads(marker.read_text())


def _raise_open_files_limit() -> None:
    """A scatter task keeps one piece open per bucket: thousands at PMD's size, over the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _each(fn: Callable, items: list, remote: bool, in_flight: int | None = None) -> Iterable:
    """`fn(item)` for each item, in order. On object storage several at once (`storage.in_order`): each is a round
    trip to the store, and one after another they add up; on disk one by one."""
    return storage.in_order(fn, items, in_flight) if remote else map(fn, items)


class _PieceWriters:
    """One Arrow IPC file per bucket, appended in record batches; temporary names until `commit`.

    With `pack` (the work on object storage) the bucket files are local scratch of this task, and `commit` uploads
    them back to back as one object, the group's pack; `ranges` then holds each bucket's (offset, length, rows) in
    it, which the group's marker records. One PUT per group instead of one per (group, bucket): at 1M candidates
    48 instead of 1,150, each a request the store serves (docs/benchmarks.md)."""

    def __init__(self, paths: FinalPaths, name: str, pack: storage.WorkPath | None = None):
        self.paths, self.name, self.pack = paths, name, pack
        self.open: dict[int, tuple[atomic.AtomicFile | IO[bytes], pa.ipc.RecordBatchFileWriter]] = {}
        self.ranges: dict[int, tuple[int, int, int]] = {}
        self.buffers: dict[int, list[pa.Table]] = {}
        self.buffered: dict[int, int] = {}
        self.total = 0
        self.rows: Counter = Counter()

    def add(self, bucket: int, table: pa.Table) -> None:
        self.buffers.setdefault(bucket, []).append(table)
        size = table.nbytes
        self.buffered[bucket] = self.buffered.get(bucket, 0) + size
        self.total += size
        self.rows[bucket] += table.num_rows
        if self.buffered[bucket] >= FLUSH_BYTES:
            self._flush(bucket)
        if self.total >= BUFFER_BYTES:
            for b in list(self.buffers):
                self._flush(b)

    def _flush(self, bucket: int) -> None:
        tables = self.buffers.pop(bucket, [])
        self.total -= self.buffered.pop(bucket, 0)
        if not tables:
            return
        if bucket not in self.open:
            if self.pack is not None:
                scratch = tempfile.TemporaryFile(prefix="pmd-piece-")  # gone with the task, whatever ends it
                self.open[bucket] = (scratch, ipc_writer(scratch, PIECE_SCHEMA))
            else:
                f = atomic.AtomicFile(self.paths.bucket_dir(bucket) / self.name)
                self.open[bucket] = (f, ipc_writer(f.file, PIECE_SCHEMA))
        self.open[bucket][1].write_table(pa.concat_tables(tables).combine_chunks())

    def abort(self) -> None:
        """Drop every piece not committed (a task that stops half way leaves no piece of its own)."""
        for f, _ in self.open.values():
            if isinstance(f, atomic.AtomicFile):
                f.abort()
            else:
                f.close()
        self.open.clear()
        self.buffers.clear()

    def commit(self) -> dict[int, int]:
        for b in list(self.buffers):
            self._flush(b)
        if self.pack is not None:
            self._commit_pack()
            return dict(sorted(self.rows.items()))
        files = []
        for _, (f, writer) in sorted(self.open.items()):
            writer.close()
            files.append(f)
        for _ in _each(atomic.AtomicFile.commit, files, bool(files) and files[0].remote):  # one PUT per bucket
            pass
        return dict(sorted(self.rows.items()))

    def _commit_pack(self) -> None:
        """The bucket files in bucket order as one object, streamed from the scratch files (no local copy of the
        whole). Its bytes are a function of the group's chunks alone (same tables, same flushes, same encoding), so
        two attempts of one group upload the same pack."""
        if not self.open:
            return
        buckets = sorted(self.open)
        for b in buckets:
            self.open[b][1].close()
        sizes = atomic.write_concatenated([self.open[b][0] for b in buckets], self.pack)
        offset = 0
        for b, size in zip(buckets, sizes):
            self.ranges[b] = (offset, size, self.rows[b])
            offset += size
            self.open[b][0].close()
        self.open.clear()


def _scatter_ok_rows(table: pa.Table, layout: Layout, writers: _PieceWriters) -> None:
    """Append the table's rows (all with an image) to their buckets' pieces, in their current order per bucket."""
    if not table.num_rows:
        return
    buckets = pa.array([image_bucket(s, layout.n_buckets) for s in table.column(schema.IMAGE_SHA256).to_pylist()],
                       pa.int32())
    order = pc.sort_indices(pa.table({"b": buckets, "i": pa.array(range(table.num_rows), pa.int64())}),
                            sort_keys=[("b", "ascending"), ("i", "ascending")])
    table = table.take(order)
    sorted_buckets = buckets.take(order).to_numpy()
    start = 0
    n = len(sorted_buckets)
    while start < n:
        b = int(sorted_buckets[start])
        end = start
        while end < n and sorted_buckets[end] == b:
            end += 1
        writers.add(b, table.slice(start, end - start))
        start = end


def _as_piece(table: pa.Table) -> pa.Table:
    return table.select(PIECE_SCHEMA.names).cast(PIECE_SCHEMA).replace_schema_metadata(None)


def _by_source(pairs: Counter, source_names: list[str]) -> dict[str, dict[str, int]]:
    """{(source_index, reason): n} -> {source: {reason: n}}, sorted."""
    result: dict[str, dict[str, int]] = {}
    for (i, reason), n in sorted(pairs.items()):
        result.setdefault(source_names[i], {})[reason] = n
    return result


# ------------------------------------------------------------------------------------------------------ pass A
def scatter_group(out: BuildDirs | str, source: str, source_index: int, group: int, chunk_paths: list[str],
                  layout: Layout, source_names: list[str]) -> dict:
    """Pass A for one group of chunks of one source; returns (and writes) the group's marker. Idempotent."""
    paths = BuildDirs.of(out).paths
    marker = paths.group_marker(source, group)
    if marker.is_file():
        summary = _read_json(marker)
    else:
        _raise_open_files_limit()
        started = time.perf_counter()
        name = f"group-{source_index:02d}-{group:05d}.arrow"
        remote = storage.is_remote(str(paths.root))
        writers = _PieceWriters(paths, name, paths.pack(source, group) if remote else None)
        failed_path = paths.failed(source, group, 1)
        rows: Counter = Counter()
        tagged: Counter = Counter()
        try:
            with atomic.atomic_file(failed_path) as f, ipc_writer(f, FAILED_SCHEMA) as failed_writer:
                # On object storage the next chunk is fetched while this one is scattered.
                for table in _each(lambda c: read_chunk(storage.as_path(c)), chunk_paths,
                                   bool(chunk_paths) and storage.is_remote(chunk_paths[0]), in_flight=2):
                    rows.update(table.column(SOURCE_INDEX).to_pylist())
                    ok = pc.is_null(table.column(REASON))
                    failed = table.filter(pc.invert(ok)).select(METADATA_COLUMNS)
                    if failed.num_rows:
                        failed_writer.write_table(failed.cast(FAILED_SCHEMA).replace_schema_metadata(None))
                        tagged.update(zip(failed.column(SOURCE_INDEX).to_pylist(),
                                          failed.column(REASON).to_pylist()))
                    _scatter_ok_rows(_as_piece(table.filter(ok)), layout, writers)
                bucket_rows = writers.commit()
        except FileNotFoundError:
            writers.abort()
            return finished_elsewhere(marker)  # another attempt consumed the chunks, its marker written first
        summary = {"source": source, "source_index": source_index, "group": group, "chunks": len(chunk_paths),
                   "rows_by_source": {source_names[i]: n for i, n in sorted(rows.items())},
                   "ok": sum(bucket_rows.values()), "failures_by_source": _by_source(tagged, source_names),
                   "failed_file": failed_path.name, "attempts": 1, "retried_by_source": {},
                   "buckets": {str(b): n for b, n in bucket_rows.items()},
                   "seconds": round(time.perf_counter() - started, 3)}
        if remote:
            summary["pack"] = {str(b): list(r) for b, r in writers.ranges.items()}
        atomic.write_json(summary, marker)
    storage.delete_many(chunk_paths)  # the marker is durable: the chunks' rows live in the pieces now
    return summary


# ------------------------------------------------------------------------------------------------------- dedup
def dedup(meta: pl.DataFrame) -> pl.DataFrame:
    """`meta` with `kept_key`: the key of the first row of its (image_sha256, text_hash) group in (source_index,
    candidate_index) order. A row is kept iff kept_key == key. Pure and independent of the row order of `meta`."""
    ordered = meta.sort([SOURCE_INDEX, CANDIDATE_INDEX])
    return ordered.with_columns(pl.col(schema.KEY).first().over([schema.IMAGE_SHA256, TEXT_HASH]).alias("kept_key"))


def _bucket_pieces(paths: FinalPaths, b: int) -> list[storage.WorkPath]:
    return sorted(paths.bucket_dir(b).glob("*.arrow"))


#: A bucket's piece in a group's pack: [source, group, offset, length, rows].
PackRange = list


def consumed_packs(out: BuildDirs | str) -> set[str]:
    """The packs ("SOURCE/group-G") that `release_packs` recorded as consumed."""
    try:
        return set(json.loads(BuildDirs.of(out).paths.packs_consumed.read_text())["packs"])
    except FileNotFoundError:
        return set()


def _pack_name(source: str, group: int) -> str:
    return f"{source}/group-{group:05d}"


def pack_ranges(markers: Iterable[dict], consumed: set[str]) -> dict[int, list[PackRange]]:
    """Bucket -> its pieces in the groups' packs, from the group markers, in (source, group) order; the packs in
    `consumed` are left out (their rows are in shards, or back in their buckets' own pieces after an unbuild)."""
    ranges: dict[int, list[PackRange]] = {}
    for m in sorted(markers, key=lambda m: (m["source_index"], m["group"])):
        if _pack_name(m["source"], m["group"]) in consumed:
            continue
        for b, (offset, length, rows) in m.get("pack", {}).items():
            ranges.setdefault(int(b), []).append([m["source"], m["group"], offset, length, rows])
    return ranges


def release_packs(out: BuildDirs | str, packed: dict[int, list[PackRange]]) -> None:
    """Once every bucket is written (each pack's rows are in shards): the packs are recorded as consumed, then
    deleted. A pack serves every bucket of its group, so it outlives the buckets written before the last; and
    an unbuild (before a retry or a takedown's rebuild) writes the buckets' rows back as pieces of their own,
    which must not meet the packs' copies of them: the record, written first, is what keeps them apart."""
    paths = BuildDirs.of(out).paths
    if not storage.is_remote(str(paths.root)):
        return
    names = {_pack_name(s, g) for ranges in packed.values() for s, g, *_ in ranges}
    consumed = consumed_packs(out)
    if not names <= consumed:
        atomic.write_json({"packs": sorted(consumed | names)}, paths.packs_consumed)
    storage.remove_tree(paths.root / PACKS_DIR)


def _read_packed(paths: FinalPaths, piece: PackRange, columns: list[str] | None) -> pa.Table:
    source, group, offset, length, rows = piece
    path = paths.pack(source, group)
    table = read_ipc_from(pa.py_buffer(storage.read_range(path, offset, length)), columns)
    if table.num_rows != rows:
        raise RuntimeError(f"{path}: {table.num_rows} rows at {offset}, its group's marker says {rows}")
    return table


def _bucket_table(paths: FinalPaths, pieces: list[storage.WorkPath], packed: list[PackRange],
                  columns: list[str] | None) -> pa.Table:
    """The bucket's pieces as one table: its ranges of the groups' packs, then its own piece files (a retry's, an
    unbuild's), in the order given; dozens, fetched several at once on object storage."""
    remote = storage.is_remote(str(paths.root))
    tables = list(_each(lambda p: _read_packed(paths, p, columns) if isinstance(p, list) else read_ipc(p, columns),
                        [*packed, *pieces], remote))
    if not tables:
        target = pa.schema([PIECE_SCHEMA.field(c) for c in columns]) if columns else PIECE_SCHEMA
        return target.empty_table()
    return pa.concat_tables(tables)


def _decide(table: pa.Table, takedowns: TakedownFilter | None = None,
            placeholder_min_urls: int = placeholders.DEFAULT_PLACEHOLDER_MIN_URLS
            ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(kept rows sorted in corpus order with their row number in `table`, duplicate rows with kept_key, rows
    taken down with the id of the request naming them in `request`, placeholder rows).

    Placeholders come first (pmd.placeholders: an image served for `placeholder_min_urls` distinct URLs is no
    pair at all, nor a duplicate of one). Takedowns come after dedup: a row that would be kept but that a recorded
    request names is taken down, and its duplicates stay duplicates (the pair is gone, not replaced by a copy of
    it)."""
    meta = pl.from_arrow(table.select([schema.KEY, schema.IMAGE_SHA256, schema.IMAGE_URL, TEXT_HASH, SHUFFLE_HASH,
                                       SOURCE_INDEX, CANDIDATE_INDEX])).with_row_index("row")
    requests = takedowns.match(table) if takedowns else [None] * table.num_rows
    meta = placeholders.mark(meta.with_columns(pl.Series("request", requests, dtype=pl.String)),
                             placeholder_min_urls)
    fake = meta.filter(pl.col(placeholders.PLACEHOLDER))
    decided = dedup(meta.filter(~pl.col(placeholders.PLACEHOLDER)))
    first = decided.filter(pl.col("kept_key") == pl.col(schema.KEY))
    kept = first.filter(pl.col("request").is_null()).sort([SHUFFLE_HASH, schema.KEY])
    taken = first.filter(pl.col("request").is_not_null())
    duplicates = decided.filter(pl.col("kept_key") != pl.col(schema.KEY))
    return kept, duplicates, taken, fake


def _failure_rows(table: pa.Table, rows: pl.DataFrame, stage: str, reason: str, details: list[str]) -> pa.Table:
    """`table`'s rows numbered in `rows` as failures (metadata columns) with this stage, reason and details."""
    out = table.take(pa.array(rows.get_column("row").to_numpy(), pa.int64())) if rows.height else \
        FAILED_SCHEMA.empty_table()
    for name, values in ((STAGE, [stage] * out.num_rows), (REASON, [reason] * out.num_rows), (DETAIL, details)):
        out = out.set_column(out.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return out.select(FAILED_SCHEMA.names).cast(FAILED_SCHEMA)


def dedup_bucket(out: BuildDirs | str, b: int, source_names: list[str], takedowns: TakedownFilter | None = None,
                 placeholder_min_urls: int = placeholders.DEFAULT_PLACEHOLDER_MIN_URLS,
                 packed: list[PackRange] = ()) -> dict:
    """Pass B1: decide the bucket's duplicates and takedowns (metadata only); writes and returns the bucket's
    summary. The decided failures (duplicates, then rows taken down) go to one file, paths.duplicates(b).
    `packed`: the bucket's pieces in the groups' packs (`pack_ranges`)."""
    paths = BuildDirs.of(out).paths
    if paths.dedup(b).is_file():
        return _read_json(paths.dedup(b))
    pieces = _bucket_pieces(paths, b)
    # On object storage every piece is one GET of the whole object anyway: B1 keeps the images it fetched and
    # writes the kept rows, in corpus order, as one object, so that B2 reads one object instead of every piece.
    # On disk B1 reads the metadata columns alone (memory-mapped), and B2 the pieces.
    ordered = storage.is_remote(str(paths.root))
    table = _bucket_table(paths, pieces, list(packed), None if ordered else METADATA_COLUMNS)
    kept, duplicates, taken, fake = _decide(table, takedowns, placeholder_min_urls)
    if ordered:
        rows = table.take(pa.array(kept.get_column("row").to_numpy(), pa.int64()))
        write_ipc_atomic(rows.replace_schema_metadata(_ordered_metadata(pieces, packed, takedowns,
                                                                        placeholder_min_urls)), paths.ordered(b))
    rows = _failure_rows(table, duplicates, *DUPLICATE,
                         [f"same image and text as {k}" for k in duplicates.get_column("kept_key").to_list()])
    if taken.height or fake.height:
        gone = _failure_rows(table, taken, TAKEDOWN, TAKEDOWN,
                             [takedowns.detail(r) for r in taken.get_column("request").to_list()] if takedowns
                             else [])
        fakes = _failure_rows(table, fake, DUPLICATE[0], placeholders.PLACEHOLDER,
                              [placeholders.detail(d, n) for d, n in
                               fake.select(schema.IMAGE_SHA256, placeholders.PLACEHOLDER_URLS).iter_rows()])
        rows = pa.concat_tables([rows, gone, fakes])
        rows = rows.take(pc.sort_indices(rows, sort_keys=[(SOURCE_INDEX, "ascending"),
                                                          (CANDIDATE_INDEX, "ascending")]))
    write_ipc_atomic(rows, paths.duplicates(b))  # in (source_index, candidate_index) order
    kept_meta = kept.select(SOURCE_INDEX, schema.IMAGE_SHA256)
    by_source = kept_meta.group_by(SOURCE_INDEX).agg(pl.len().alias("n"), pl.col(schema.IMAGE_SHA256).n_unique()
                                                     .alias("u"))
    dup_by_source = duplicates.group_by(SOURCE_INDEX).len()
    summary = {
        "bucket": b, "kept": kept.height,
        "kept_by_source": {source_names[i]: n for i, n, _ in sorted(by_source.iter_rows())},
        "unique_by_source": {source_names[i]: u for i, _, u in sorted(by_source.iter_rows())},
        "unique_images": kept_meta.get_column(schema.IMAGE_SHA256).n_unique() if kept.height else 0,
        "duplicates_by_source": {source_names[i]: n for i, n in sorted(dup_by_source.iter_rows())},
        "takedowns_by_source": {source_names[i]: n for i, n in sorted(taken.group_by(SOURCE_INDEX).len().iter_rows())},
        "takedowns_by_request": _by_request(taken, source_names),
        "placeholders_by_source": {source_names[i]: n
                                   for i, n in sorted(fake.group_by(SOURCE_INDEX).len().iter_rows())},
        "takedown_requests": [r.id for r in takedowns.requests] if takedowns else [],
    }
    atomic.write_json(summary, paths.dedup(b))
    return summary


def _ordered_metadata(pieces: list[storage.WorkPath], packed: list[PackRange], takedowns: TakedownFilter | None,
                      placeholder_min_urls: int) -> dict[bytes, bytes]:
    """What an ordered file was decided from: B2 uses it only when its bucket's pieces and its decision inputs
    (takedown requests, the placeholder threshold) are still these."""
    return {b"pieces": json.dumps([*(list(p) for p in packed), *sorted(p.name for p in pieces)]).encode(),
            b"decisions": json.dumps([[r.id for r in takedowns.requests] if takedowns else [],
                                      placeholder_min_urls]).encode()}


def _ordered_rows(paths: FinalPaths, b: int, pieces: list[storage.WorkPath], packed: list[PackRange],
                  takedowns: TakedownFilter | None, placeholder_min_urls: int) -> pa.Table | None:
    """B1's ordered file of the bucket when it still holds what B2 would decide from the pieces, else None."""
    if not storage.is_remote(str(paths.root)):
        return None
    try:
        table = read_ipc(paths.ordered(b))
    except FileNotFoundError:
        return None
    if (table.schema.metadata or {}) != _ordered_metadata(pieces, packed, takedowns, placeholder_min_urls):
        return None
    return table.replace_schema_metadata(None)


def _by_request(taken: pl.DataFrame, source_names: list[str]) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = {}
    for request, i, n in sorted(taken.group_by(["request", SOURCE_INDEX]).len().iter_rows()):
        result.setdefault(request, {})[source_names[i]] = n
    return result


# ------------------------------------------------------------------------------------------------------- write
def bucket_shards(offset: int, kept: int, total: int, shard_rows: int) -> list[tuple[int, int, int, bool]]:
    """(shard, first row in the bucket, end row in the bucket, whole) for each shard the bucket's rows fall in;
    `whole`: the shard's rows all come from this bucket."""
    result = []
    for s in range(offset // shard_rows, -(-(offset + kept) // shard_rows)) if kept else []:
        lo, hi = s * shard_rows, min((s + 1) * shard_rows, total)
        start, end = max(lo, offset), min(hi, offset + kept)
        result.append((s, start - offset, end - offset, start == lo and end == hi))
    return result


def _shard_table(table: pa.Table) -> pa.Table:
    return table.select(list(schema.SHARD_COLUMNS)).cast(schema.SHARD_SCHEMA)


def _publish(dirs: BuildDirs, rel: str, write: Callable[[str | Path], None]) -> dict:
    """Write the corpus file `rel` with `write(location)`; returns its manifest entry. For an OUT on object storage
    the file is written and described (rows, bytes, sha256) on local disk and then uploaded in one PUT: the object
    is never read back, so a shard crosses the network once."""
    if not storage.is_remote(dirs.out):
        write(dirs.output(rel))
        return describe_file(dirs.out, rel).to_dict()
    # Local scratch of this task only (a node's disk may vanish between tasks; the work may itself be remote).
    with tempfile.TemporaryDirectory(prefix="pmd-upload-") as staging:
        local = Path(staging) / rel
        write(local)
        entry = describe_file(staging, rel).to_dict()
        storage.upload(local, dirs.output(rel))
    return entry


def _write_shard(dirs: BuildDirs, shard: int, table: pa.Table, row_group_rows: int) -> dict:
    entry = _publish(dirs, shard_name(shard), lambda path: write_shard_file(table, path, row_group_rows))
    atomic.write_json(entry, dirs.paths.entry(shard))
    return entry


def write_bucket(out: BuildDirs | str, b: int, offset: int, total: int, layout: Layout,
                 takedowns: TakedownFilter | None = None,
                 placeholder_min_urls: int = placeholders.DEFAULT_PLACEHOLDER_MIN_URLS,
                 packed: list[PackRange] = ()) -> dict:
    """Pass B2: the bucket's kept rows into its whole shards and the fragments of the shards it shares. `packed`:
    as for `dedup_bucket`; the packs themselves outlive this task (`release_packs`)."""
    dirs = BuildDirs.of(out)
    paths = dirs.paths
    if paths.written(b).is_file():
        return _read_json(paths.written(b))
    started = time.perf_counter()
    try:
        pieces = _bucket_pieces(paths, b)
        packed = list(packed)
        table = _ordered_rows(paths, b, pieces, packed, takedowns, placeholder_min_urls)
        decided = table is not None
        if not decided:
            table = _bucket_table(paths, pieces, packed, None)
    except FileNotFoundError:
        table = None  # consumed meanwhile by another attempt
    if table is None or paths.written(b).is_file():  # a listing read after another attempt deleted the pieces
        return finished_elsewhere(paths.written(b))
    if decided:
        order = pa.array(range(table.num_rows), pa.int64())
    else:
        kept, *_ = _decide(table, takedowns, placeholder_min_urls)  # dedup_bucket's decisions, same inputs
        order = pa.array(kept.get_column("row").to_numpy(), pa.int64())
    write_ipc_atomic(table.select(KEPT_SCHEMA.names).take(order).cast(KEPT_SCHEMA), paths.kept(b))

    def write_one(span: tuple[int, int, int, bool]) -> int | None:
        shard, start, end, whole = span
        rows = table.take(order[start:end])
        if rows.column(schema.IMAGE).null_count:
            raise RuntimeError(f"bucket {b}: a kept row has no image (a duplicate re-entered without its image)")
        if not whole:
            write_ipc_atomic(_shard_table(rows), paths.fragment_dir(shard) / f"bucket-{b:05d}.arrow")
            return None
        if not paths.entry(shard).is_file() or not storage.is_file(dirs.output(shard_name(shard))):
            _write_shard(dirs, shard, _shard_table(rows), layout.row_group_rows)
        return shard

    # On object storage one shard is encoded while the one before is uploaded.
    spans = bucket_shards(offset, len(order), total, layout.shard_rows)
    written = [shard for shard in _each(write_one, spans, storage.is_remote(dirs.out) or storage.is_remote(dirs.work),
                                        in_flight=SHARDS_IN_FLIGHT) if shard is not None]
    summary = {"bucket": b, "offset": offset, "kept": len(order), "shards": written,
               "seconds": round(time.perf_counter() - started, 3)}
    atomic.write_json(summary, paths.written(b))
    paths.ordered(b).unlink(missing_ok=True)
    storage.remove_tree(paths.bucket_dir(b))
    return summary


def merge_shard(out: BuildDirs | str, shard: int, row_group_rows: int) -> dict:
    """A shard whose rows straddle buckets: its fragments in bucket order, then the fragments are deleted."""
    dirs = BuildDirs.of(out)
    paths = dirs.paths
    if paths.entry(shard).is_file() and storage.is_file(dirs.output(shard_name(shard))):
        entry = _read_json(paths.entry(shard))
    else:
        try:
            fragments = sorted(paths.fragment_dir(shard).glob("bucket-*.arrow"))
            table = pa.concat_tables([read_ipc(p) for p in fragments]).combine_chunks() if fragments else None
        except FileNotFoundError:
            table = None
        # Another attempt merged them (shard, then entry, then the fragments deleted): a listing read while it
        # deleted may be partial, so its entry decides once the fragments are read.
        if paths.entry(shard).is_file() and storage.is_file(dirs.output(shard_name(shard))):
            return _read_json(paths.entry(shard))
        if table is None:
            raise FileNotFoundError(f"shard {shard}: neither the shard nor its fragments exist")
        entry = _write_shard(dirs, shard, table, row_group_rows)
    storage.remove_tree(paths.fragment_dir(shard))
    return entry


# ---------------------------------------------------------------------------------------------------- failures
def write_failures(out: BuildDirs | str, source: str, source_index: int, failed_files: list[str], n_buckets: int
                   ) -> dict:
    """failures/SOURCE.parquet, streamed: image-stage failures group by group (each in candidate order), then
    duplicates bucket by bucket (each in candidate order). Returns its manifest entry."""
    dirs = BuildDirs.of(out)
    paths = dirs.paths
    rel = f"failures/{source}.parquet"

    def tables() -> Iterable[pa.Table]:
        for f in failed_files:  # every group's: a chunk fetches URLs for rows of other sources too
            failed = read_ipc(storage.as_path(f))
            yield failed.filter(pc.equal(failed.column(SOURCE_INDEX), source_index))
        for b in range(n_buckets):
            dups = read_ipc(paths.duplicates(b))
            yield dups.filter(pc.equal(dups.column(SOURCE_INDEX), source_index))

    def write(path: str | Path) -> None:
        with atomic.atomic_file(path) as f:
            with pq.ParquetWriter(f, schema.FAILURE_SCHEMA, compression="zstd") as writer:
                pending, n, written = [], 0, 0
                for t in tables():
                    if t.num_rows:
                        pending.append(t.select(schema.FAILURE_SCHEMA.names).cast(schema.FAILURE_SCHEMA))
                        n += t.num_rows
                    if n >= FAILURE_ROW_GROUP_ROWS:
                        writer.write_table(pa.concat_tables(pending), row_group_size=FAILURE_ROW_GROUP_ROWS)
                        pending, written, n = [], written + n, 0
                if pending or not written:  # an empty file still has its schema and one (empty) row group
                    writer.write_table(pa.concat_tables(pending) if pending else schema.FAILURE_SCHEMA.empty_table(),
                                       row_group_size=FAILURE_ROW_GROUP_ROWS)

    return _publish(dirs, rel, write)


# ------------------------------------------------------------------------------------------------------- retry
def retry_group(out: BuildDirs | str, source: str, group: int, attempt: int, task: ChunkTask, layout: Layout,
                source_names: list[str]) -> dict:
    """Download attempt number `attempt` of the group's transient failures; rows that now succeed become pieces of
    their buckets, the others stay failures with their new reason. `task` gives the options (its candidates are
    ignored). Idempotent: a group whose marker already records `attempt` is left as it is."""
    dirs = BuildDirs.of(out)
    paths = dirs.paths
    marker = paths.group_marker(source, group)
    summary = _read_json(marker)
    if summary["attempts"] >= attempt:
        return summary
    failed_path = paths.failed(source, group, 0).with_name(summary["failed_file"])
    try:
        failed = read_ipc(failed_path)
    except FileNotFoundError:
        # Another attempt of this round finished meanwhile: it wrote the marker before deleting the old failures.
        summary = _read_json(marker)
        if summary["attempts"] >= attempt:
            return summary
        raise
    transient = pa.array([is_transient(r) for r in failed.column(REASON).to_pylist()], pa.bool_())
    position = pa.array(range(failed.num_rows), pa.int64())  # rows keep their place in the failures
    again = failed.append_column("_pos", position).filter(transient)
    # By URL, so the rows naming one URL are in one slice (one download); a task holds one slice's images.
    again = again.take(pc.sort_indices(again, sort_keys=[(schema.IMAGE_URL, "ascending"), ("_pos", "ascending")]))
    writers = _PieceWriters(paths, f"retry-{summary['source_index']:02d}-{group:05d}-a{attempt:02d}.arrow")
    kept_failed = [failed.filter(pc.invert(transient)).append_column("_pos", position.filter(pc.invert(transient)))]
    urls = again.column(schema.IMAGE_URL).to_pylist()
    start = 0
    while start < again.num_rows:
        end = min(start + RETRY_SLICE_ROWS, again.num_rows)
        while end < again.num_rows and urls[end] is not None and urls[end] == urls[end - 1]:
            end += 1
        rows = again.slice(start, end - start)
        result = retry_rows(dataclasses.replace(
            task, candidates=rows, candidate_index=rows.column(CANDIDATE_INDEX).to_pylist(),
            path=storage.as_path(dirs.work) / "images" / source / f"retry-{group:05d}"))
        ok = pc.is_null(result.column(REASON))
        _scatter_ok_rows(_as_piece(result.filter(ok)), layout, writers)
        kept_failed.append(result.select(METADATA_COLUMNS).append_column("_pos", rows.column("_pos")).filter(
            pc.invert(ok)))
        start = end
    new_buckets = writers.commit()
    remaining = pa.concat_tables([t.select([*METADATA_COLUMNS, "_pos"]).cast(FAILED_SCHEMA.append(
        pa.field("_pos", pa.int64()))) for t in kept_failed])
    remaining = remaining.take(pc.sort_indices(remaining, sort_keys=[("_pos", "ascending")])).drop_columns(["_pos"])
    new_failed = paths.failed(source, group, attempt)
    write_ipc_atomic(remaining, new_failed)
    reasons = Counter(zip(remaining.column(SOURCE_INDEX).to_pylist(), remaining.column(REASON).to_pylist()))
    buckets = Counter({int(b): n for b, n in summary["buckets"].items()})
    buckets.update(new_buckets)
    retried = Counter(summary["retried_by_source"])
    retried.update(source_names[i] for i in again.column(SOURCE_INDEX).to_pylist())
    summary = dict(summary, ok=summary["ok"] + sum(new_buckets.values()),
                   failures_by_source=_by_source(reasons, source_names), failed_file=new_failed.name,
                   attempts=attempt, retried_by_source=dict(sorted(retried.items())),
                   buckets={str(b): n for b, n in sorted(buckets.items())})
    atomic.write_json(summary, marker)
    if failed_path != new_failed:
        failed_path.unlink(missing_ok=True)
    return summary


def unbuild_shard(out: BuildDirs | str, shard: int, layout: Layout, seed: int, buckets: list[tuple[int, int, int]]
                  ) -> None:
    """Take a written shard back to pieces of its buckets (before a retry changes the corpus). `buckets`: (bucket,
    offset, kept) of the buckets whose rows the shard holds. The pieces are durable before the shard is deleted.

    Rows are matched to the buckets' kept indexes by key. A kept row missing from the shard must be one that
    `pmd takedown` removed in place (its metadata is in OUT/takedowns/*.removed.parquet): it re-enters its bucket
    without its image, so that dedup_bucket decides it again, and takes it down again. Anything else means the
    shard is not the one this build wrote."""
    dirs = BuildDirs.of(out)
    paths = dirs.paths
    path = dirs.output(shard_name(shard))
    if not storage.is_file(path):
        return
    try:
        table = pq.read_table(storage.open_input(path))
    except FileNotFoundError:
        return  # another attempt unbuilt it meanwhile (its pieces are durable before it deletes the shard)
    lo = shard * layout.shard_rows
    hi = min(lo + layout.shard_rows, max((o + k for _, o, k in buckets), default=lo))
    where = {k: i for i, k in enumerate(table.column(schema.KEY).to_pylist())}
    seen: list[int] = []
    for b, offset, kept in buckets:
        start, end = max(lo, offset), min(hi, offset + kept)
        if end <= start:
            continue
        order = read_ipc(paths.kept(b)).slice(start - offset, end - start)
        keys = order.column(schema.KEY).to_pylist()
        present = pa.array([k in where for k in keys], pa.bool_())
        at = [where[k] for k in keys if k in where]
        seen += at
        parts = [_unbuilt_piece(table.take(pa.array(at, pa.int64())), order.filter(present), seed)]
        missing = order.filter(pc.invert(present))
        if missing.num_rows:
            names = missing.column(schema.KEY).to_pylist()
            removed = removed_rows(dirs.out, names)
            if removed.num_rows != len(names):
                raise RuntimeError(f"{path}: rows do not match bucket {b}'s kept index; was the shard replaced?")
            position = {k: i for i, k in enumerate(removed.column(schema.KEY).to_pylist())}
            removed = removed.take(pa.array([position[k] for k in names], pa.int64()))
            removed = removed.append_column(schema.IMAGE, pa.nulls(removed.num_rows, pa.binary()))
            parts.append(_unbuilt_piece(removed, missing, seed))
        write_ipc_atomic(pa.concat_tables(parts), paths.bucket_dir(b) / f"shard-{shard:05d}.arrow")
    if seen != list(range(table.num_rows)):  # every row, in the order written, once
        raise RuntimeError(f"{path}: rows do not match the buckets' kept indexes; was the shard replaced?")
    storage.delete(path)
    paths.entry(shard).unlink(missing_ok=True)


def _unbuilt_piece(rows: pa.Table, order: pa.Table, seed: int) -> pa.Table:
    """Shard rows (or removed rows, image null) as a bucket piece; `order`: their kept-index rows, aligned."""
    piece = {name: rows.column(name) for name in schema.SHARD_COLUMNS}
    piece[STAGE] = piece[REASON] = piece[DETAIL] = pa.nulls(rows.num_rows, pa.string())
    piece[TEXT_HASH] = pa.array([text_hash(t) for t in rows.column(schema.TEXT).to_pylist()], pa.uint64())
    piece[SOURCE_INDEX] = order.column(SOURCE_INDEX)
    piece[CANDIDATE_INDEX] = order.column(CANDIDATE_INDEX)
    piece[SHUFFLE_HASH] = pa.array([shuffle_hash(seed, k) for k in rows.column(schema.KEY).to_pylist()],
                                   pa.uint64())
    return pa.table({n: piece[n] for n in PIECE_SCHEMA.names}).cast(PIECE_SCHEMA)


def forget_decided(out: BuildDirs | str, buckets: list[int]) -> None:
    """Before a retry round adds pieces to buckets decided but not yet written: their decisions (summary, duplicates,
    B1's ordered file) were made without those rows, and dedup decides them again. The markers go first, so a run
    killed in between finds the buckets undecided, never a marker beside missing outputs."""
    paths = BuildDirs.of(out).paths
    storage.delete_many([str(paths.dedup(b)) for b in buckets])
    storage.delete_many([str(p) for b in buckets for p in (paths.duplicates(b), paths.ordered(b))])


def reopen_bucket(out: BuildDirs | str, b: int) -> None:
    """After its shards were unbuilt: the bucket's old duplicates become a (metadata-only) piece again, and its
    decisions are forgotten. A duplicate never wins against its kept row, so it needs no image; a row taken down
    (in the same file) is taken down again, so it needs none either."""
    paths = BuildDirs.of(out).paths
    try:
        dups = read_ipc(paths.duplicates(b)) if paths.duplicates(b).is_file() else None
    except FileNotFoundError:
        dups = None  # another attempt reopened the bucket meanwhile: its piece is written, the file deleted last
    if dups is not None:
        if dups.num_rows:
            piece = {n: dups.column(n) for n in METADATA_COLUMNS}
            piece[STAGE] = piece[REASON] = piece[DETAIL] = pa.nulls(dups.num_rows, pa.string())
            piece[schema.IMAGE] = pa.nulls(dups.num_rows, pa.binary())
            write_ipc_atomic(pa.table({n: piece[n] for n in PIECE_SCHEMA.names}).cast(PIECE_SCHEMA),
                       paths.bucket_dir(b) / "duplicates.arrow")
    for p in (paths.ordered(b), paths.kept(b), paths.written(b), paths.dedup(b), paths.duplicates(b)):
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- manifest
def accounting(source_names: list[str], ingest_counts: dict[str, dict], groups: Iterable[dict],
               buckets: Iterable[dict], url_counts: dict[str, dict[str, int]]) -> tuple[dict, dict, dict]:
    """(accounting per source, totals, downloads per source) from the ingest counts and the pass summaries.

    `url_counts`: per source, URL rows and the distinct URLs first named by it (pmd.urls' owners pass)."""
    reasons = {s: Counter() for s in source_names}
    retried = Counter()
    attempts = {s: 0 for s in source_names}
    for g in groups:
        for s, by_reason in g["failures_by_source"].items():
            reasons[s].update(by_reason)
        retried.update(g["retried_by_source"])
        attempts[g["source"]] = max(attempts[g["source"]], g["attempts"])
    pairs, unique = Counter(), Counter()
    unique_total = 0
    for b in buckets:
        pairs.update(b["kept_by_source"])
        unique.update(b["unique_by_source"])
        for s, n in b["duplicates_by_source"].items():
            reasons[s]["duplicate"] += n
        for s, n in b.get("takedowns_by_source", {}).items():
            reasons[s][TAKEDOWN] += n
        for s, n in b.get("placeholders_by_source", {}).items():
            reasons[s][placeholders.PLACEHOLDER] += n
        unique_total += b["unique_images"]
    result = {}
    for s in source_names:
        counts = ingest_counts[s]
        result[s] = {
            "input_rows": counts["pairs"] + counts["rejects"],
            "pairs": pairs[s],
            "rejects": counts["rejects"],
            "failures": sum(reasons[s].values()),
            "rejects_by_reason": dict(sorted(counts["rejects_by_reason"].items())),
            "failures_by_reason": dict(sorted((k, v) for k, v in reasons[s].items() if v)),
            "unique_images": unique[s],
        }
    totals = {k: sum(a[k] for a in result.values()) for k in ("input_rows", "pairs", "rejects", "failures")}
    totals["unique_images"] = unique_total
    total_reasons: Counter = Counter()
    for a in result.values():
        total_reasons.update(a["failures_by_reason"])
    totals["failures_by_reason"] = dict(sorted(total_reasons.items()))
    downloads = {}
    for s in source_names:
        urls = url_counts.get(s, {}).get("urls", 0)
        unique_urls = url_counts.get(s, {}).get("unique_urls", 0)
        downloads[s] = {"attempts": attempts[s], "urls": urls, "unique_urls": unique_urls,
                        "saved_by_url_dedup": urls - unique_urls, "retried": retried[s]}
    return result, totals, downloads
