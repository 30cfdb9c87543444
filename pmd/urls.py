"""URL dedup before download: every URL is fetched once, by the chunk of its first row, for all rows naming it.

Library code, no Ray (pmd.build_plan schedules it). Before the image stage, the candidates of the URL sources
are regrouped so that a chunk holds its own rows whose URL is seen there first (in source order, then candidate
order) plus every later row, of any source, naming one of those URLs. The image stage then downloads each distinct
URL of a chunk once (pmd.build) and so each URL of the whole build once. Rows keep their own source and candidate
index: accounting, dedup order and failures are those of the row, not of the chunk that fetched it.

Three passes over candidate metadata (never images), each task idempotent with a marker, O(chunks) files:
  1. split   (per scatter group of a source) rows -> `pieces/u-UUUUU/SS-GGGGG.arrow` by hash of the URL
  2. owners  (per URL bucket) the first row of each URL decides the chunk of every row naming it ->
             `moved/SS-GGGGG/u-UUUUU.arrow` by the target chunk's group; counts per source to its marker
  3. chunks  (per target group) -> `chunks/SOURCE/chunk-NNNNN.arrow`, rows in (source, candidate) order
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pmd import atomic, schema, storage
from pmd.build import CANDIDATE_INDEX, SOURCE_INDEX, read_ipc, write_ipc_atomic
from pmd.final import BuildDirs, finished_elsewhere

URLS_DIR = "urls"  # under OUT/work
URL_BUCKET_ROWS = 500_000  # rows per URL bucket: the owners pass holds one bucket's metadata
ROW_SCHEMA = pa.schema([*schema.CANDIDATE_SCHEMA.remove_metadata(), pa.field(SOURCE_INDEX, pa.int32()),
                        pa.field(CANDIDATE_INDEX, pa.int64())])


def n_url_buckets(url_rows: int) -> int:
    return max(1, -(-url_rows // URL_BUCKET_ROWS))


def url_bucket(url: str | None, n_buckets: int) -> int:
    """A row's URL bucket (rows without a URL go to bucket 0: they own themselves)."""
    if not url:
        return 0
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "big") * n_buckets >> 64


class UrlPaths:
    def __init__(self, out: BuildDirs | str | Path):
        self.root = storage.as_path(BuildDirs.of(out).work) / URLS_DIR

    def piece(self, u: int, source_index: int, group: int) -> storage.WorkPath:
        return self.root / "pieces" / f"u-{u:05d}" / f"{source_index:02d}-{group:05d}.arrow"

    def split_marker(self, source_index: int, group: int) -> storage.WorkPath:
        return self.root / "split" / f"{source_index:02d}-{group:05d}.json"

    def moved(self, source_index: int, group: int, u: int) -> storage.WorkPath:
        return self.root / "moved" / f"{source_index:02d}-{group:05d}" / f"u-{u:05d}.arrow"

    def owners_marker(self, u: int) -> storage.WorkPath:
        return self.root / "owners" / f"u-{u:05d}.json"

    def chunks_marker(self, source_index: int, group: int) -> storage.WorkPath:
        return self.root / "chunks-done" / f"{source_index:02d}-{group:05d}.json"

    def chunk(self, source: str, index: int) -> storage.WorkPath:
        return self.root / "chunks" / source / f"chunk-{index:05d}.arrow"


def read_candidates(candidates_dir: storage.WorkPath, start: int, stop: int) -> pa.Table:
    """Candidates [start, stop) of a source, in part order, reading only the parts (and batches) that hold them."""
    tables, offset = [], 0
    for part in sorted(storage.as_path(candidates_dir).glob("part-*.parquet")):
        pf = pq.ParquetFile(storage.open_input(part))
        n = pf.metadata.num_rows
        if offset + n > start and offset < stop:
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            tables.append(pf.read().slice(lo, hi - lo))
        offset += n
        if offset >= stop:
            break
    if not tables:
        return schema.CANDIDATE_SCHEMA.empty_table()
    return pa.concat_tables([t.cast(schema.CANDIDATE_SCHEMA) for t in tables])


def split_group(out: BuildDirs | str, candidates_dir: str, source_index: int, group: int, start: int, stop: int,
                n_buckets: int) -> dict:
    """Pass 1: candidates [start, stop) of one source into URL-bucket pieces."""
    paths = UrlPaths(out)
    marker = paths.split_marker(source_index, group)
    if marker.exists():
        return json.loads(marker.read_text())
    table = read_candidates(storage.as_path(candidates_dir), start, stop)
    table = table.append_column(SOURCE_INDEX, pa.array([source_index] * table.num_rows, pa.int32()))
    table = table.append_column(CANDIDATE_INDEX, pa.array(range(start, start + table.num_rows), pa.int64()))
    table = table.cast(ROW_SCHEMA)
    buckets = [url_bucket(u, n_buckets) for u in table.column(schema.IMAGE_URL).to_pylist()]
    frame = pl.from_arrow(table).with_columns(pl.Series("_u", buckets, pl.Int32))
    for (u,), part in frame.partition_by("_u", as_dict=True, maintain_order=True).items():
        write_ipc_atomic(part.drop("_u").to_arrow().cast(ROW_SCHEMA), paths.piece(int(u), source_index, group))
    summary = {"source_index": source_index, "group": group, "rows": table.num_rows}
    atomic.write_json(summary, marker)
    return summary


def owners_bucket(out: BuildDirs | str, u: int, chunk_rows: int, chunks_per_group: int, source_names: list[str]
                  ) -> dict:
    """Pass 2: decide which chunk fetches each URL of the bucket; rows go to that chunk's group."""
    paths = UrlPaths(out)
    marker = paths.owners_marker(u)
    if marker.exists():
        return json.loads(marker.read_text())
    directory = paths.root / "pieces" / f"u-{u:05d}"
    try:
        pieces = sorted(directory.glob("*.arrow"))
        frame = pl.from_arrow(pa.concat_tables([read_ipc(p) for p in pieces])) if pieces else \
            pl.from_arrow(ROW_SCHEMA.empty_table())
    except FileNotFoundError:
        pieces = None  # consumed meanwhile: another attempt's marker says what they held
    if pieces is None or marker.exists():  # a listing read after another attempt deleted the pieces
        return finished_elsewhere(marker)
    frame = frame.sort(SOURCE_INDEX, CANDIDATE_INDEX)
    # A row without a URL is its own owner (it fails as no_url in its own chunk).
    owner = pl.when(pl.col(schema.IMAGE_URL).is_null()).then(pl.struct(SOURCE_INDEX, CANDIDATE_INDEX)).otherwise(
        pl.struct(SOURCE_INDEX, CANDIDATE_INDEX).first().over(schema.IMAGE_URL))
    frame = frame.with_columns(owner.alias("_owner")).with_columns(
        pl.col("_owner").struct.field(SOURCE_INDEX).alias("_os"),
        pl.col("_owner").struct.field(CANDIDATE_INDEX).alias("_oc")).drop("_owner")
    frame = frame.with_columns((pl.col("_oc") // chunk_rows).alias("_chunk"))
    frame = frame.with_columns((pl.col("_chunk") // chunks_per_group).alias("_group"))
    counts = frame.filter(pl.col(schema.IMAGE_URL).is_not_null()).group_by(SOURCE_INDEX).agg(
        pl.len().alias("urls"), (pl.col("_os") == pl.col(SOURCE_INDEX)).and_(pl.col("_oc") == pl.col(
            CANDIDATE_INDEX)).sum().alias("unique_urls"))
    for (s, g), part in frame.partition_by("_os", "_group", as_dict=True, maintain_order=True).items():
        write_ipc_atomic(part.select(*ROW_SCHEMA.names, "_chunk").to_arrow(), paths.moved(int(s), int(g), u))
    summary = {"bucket": u, "downloads": {source_names[s]: {"urls": n, "unique_urls": k}
                                          for s, n, k in sorted(counts.iter_rows())}}
    atomic.write_json(summary, marker)
    storage.remove_tree(directory)
    return summary


def chunks_group(out: BuildDirs | str, source: str, source_index: int, group: int, chunks: list[int]) -> dict:
    """Pass 3: the group's chunk input files (rows in source, candidate order; a chunk may be empty)."""
    paths = UrlPaths(out)
    marker = paths.chunks_marker(source_index, group)
    if marker.exists():
        return json.loads(marker.read_text())
    directory = paths.root / "moved" / f"{source_index:02d}-{group:05d}"
    try:
        moved = sorted(directory.glob("u-*.arrow"))
        frame = pl.from_arrow(pa.concat_tables([read_ipc(p) for p in moved])) if moved else \
            pl.from_arrow(ROW_SCHEMA.empty_table()).with_columns(pl.lit(0, pl.Int64).alias("_chunk"))
    except FileNotFoundError:
        moved = None
    if moved is None or marker.exists():
        return finished_elsewhere(marker)
    frame = frame.sort(SOURCE_INDEX, CANDIDATE_INDEX)
    sizes: Counter = Counter()
    for c in chunks:
        rows = frame.filter(pl.col("_chunk") == c).drop("_chunk")
        sizes[c] = rows.height
        write_ipc_atomic(rows.to_arrow().cast(ROW_SCHEMA), paths.chunk(source, c))
    summary = {"source_index": source_index, "group": group, "rows": frame.height,
               "chunks": {str(c): n for c, n in sorted(sizes.items())}}
    atomic.write_json(summary, marker)
    storage.remove_tree(directory)
    return summary
