"""The ingest stage's work, free of any scheduler: chunks of upstream records -> Parquet parts of pairs and rejects.

`ingest_source` submits one task per chunk to an executor (pmd.executor; `pipelines/ingest.py` chooses it:
in-process or Ray); this module decides what a chunk produces, so every executor writes byte-for-byte the same
rows.

Layout of one source's output:
    DIR/SOURCE/candidates/part-00000.parquet ...   pairs (CANDIDATE_SCHEMA), one part per chunk of records
    DIR/SOURCE/rejects/part-00000.parquet ...      rejected rows (REJECT_SCHEMA) with their reason
    DIR/SOURCE/ingest.json                         inputs, options, counts; written last: its presence = done
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from pmd import atomic, schema, storage
from pmd.reasons import Reason
from pmd.sources.base import Context, Pair, Record, Reject, SourceAdapter, pairs_table, record_text, rejects_table
from pmd.sources.inputs import LineBlock, LineRange, is_compressed, iter_line_blocks, iter_line_ranges
from pmd.sources.limits import CHUNK_BYTES

CANDIDATES_DIR = "candidates"
REJECTS_DIR = "rejects"
SUMMARY_FILE = "ingest.json"
CHUNK_RECORDS = 50_000  # upstream records per chunk (one task, one part file) unless told otherwise
_PART_ROW_GROUP = 65_536  # candidate parts are read whole by the build, not streamed
NO_OUTPUT = Reason.NO_OUTPUT  # an adapter produced nothing for a record: recorded, never silently dropped


@dataclass
class IngestCounts:
    """rows = pairs + rejects. A record (line, JSON element) may give several rows (COCO: one per sentence)."""

    records: int = 0
    pairs: int = 0
    rejects: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    pairs_by_split: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.pairs + self.rejects

    def add(self, other: IngestCounts) -> None:
        self.records += other.records
        self.pairs += other.pairs
        self.rejects += other.rejects
        for mine, theirs in ((self.rejects_by_reason, other.rejects_by_reason),
                             (self.pairs_by_split, other.pairs_by_split)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = self.rows
        d["rejects_by_reason"] = dict(sorted(self.rejects_by_reason.items()))
        d["pairs_by_split"] = dict(sorted(self.pairs_by_split.items()))
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> IngestCounts:
        return cls(records=d["records"], pairs=d["pairs"], rejects=d["rejects"],
                   rejects_by_reason=dict(d["rejects_by_reason"]), pairs_by_split=dict(d.get("pairs_by_split", {})))


def chunked(records: Iterable[Record], size: int, max_bytes: int = CHUNK_BYTES) -> Iterator[list[Record]]:
    """Lists of `size` records, cut earlier once they hold `max_bytes` of upstream data (`Record.nbytes`)."""
    chunk: list[Record] = []
    held = 0
    for record in records:
        chunk.append(record)
        held += record.nbytes()
        if len(chunk) >= size or held >= max_bytes:
            yield chunk
            chunk, held = [], 0
    if chunk:
        yield chunk


def iter_chunks(adapter: SourceAdapter, inputs: Sequence[Path | str], size: int
                ) -> Iterator[list[Record] | LineBlock | LineRange]:
    """The units of work of an ingest, in order: blocks of `size` lines for line-based adapters, else lists of
    `size` records. Both paths (local, Ray) cut the same chunks, so they write the same parts."""
    if adapter.line_records:
        for path in inputs:
            # Uncompressed files are cut by byte range and read by the workers; compressed ones must be
            # decompressed in one stream, so their lines travel as blocks.
            yield from iter_line_blocks(path, size) if is_compressed(path) else iter_line_ranges(path, size)
    else:
        yield from chunked(adapter.records(inputs), size)


def chunk_size(chunk: Sequence[Record] | LineBlock | LineRange) -> int:
    return chunk.lines if isinstance(chunk, (LineBlock, LineRange)) else len(chunk)


def convert_chunk(adapter: SourceAdapter, context: Context, records: Sequence[Record]
                  ) -> tuple[pa.Table, pa.Table, IngestCounts]:
    """(pairs, rejects, counts) of one chunk, inside the limits every source shares (over-long lines and captions
    are rejections). `context` is what `adapter.prepare` returned. Adapters with a columnar path
    (`convert_tables`, YFCC) use it."""
    if getattr(adapter, "convert_tables", None) is not None:
        pairs_t, rejects_t = adapter.convert_tables_limited(records, context)
        if pairs_t.num_rows + rejects_t.num_rows != len(records):
            raise RuntimeError(f"{adapter.name}: {len(records)} records gave {pairs_t.num_rows} pairs and "
                               f"{rejects_t.num_rows} rejects; a columnar adapter must give one row per record")
        counts = IngestCounts(
            records=len(records), pairs=pairs_t.num_rows, rejects=rejects_t.num_rows,
            rejects_by_reason=_value_counts(rejects_t, schema.REASON),
            pairs_by_split=_value_counts(pairs_t, schema.SPLIT),
        )
        return pairs_t, rejects_t, counts
    pairs: list[Pair] = []
    rejects: list[Reject] = []
    for record in records:
        produced = 0
        for out in adapter.convert_limited(record, context):
            produced += 1
            (pairs if isinstance(out, Pair) else rejects).append(out)
        if produced == 0:
            rejects.append(Reject(NO_OUTPUT, record.input_file, record.position, "adapter produced no row",
                                  record_text(record.raw)))
    counts = IngestCounts(
        records=len(records), pairs=len(pairs), rejects=len(rejects),
        rejects_by_reason=dict(Counter(r.reason for r in rejects)),
        pairs_by_split=dict(Counter(p.split for p in pairs)),
    )
    return pairs_table(pairs, adapter.name), rejects_table(rejects, adapter.name), counts


def _value_counts(table: pa.Table, column: str) -> dict[str, int]:
    counts = table.column(column).value_counts().to_pylist() if table.num_rows else []
    return {c["values"]: c["counts"] for c in counts}


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def process_chunk(adapter: SourceAdapter, context: Context, records: Sequence[Record] | LineBlock | LineRange,
                  index: int, source_dir: Path) -> IngestCounts:
    """Convert one chunk and write its two parts. The unit of work of both the local and the Ray path: everything
    it needs is in its arguments (the adapter holds only its options, the context what `prepare` loaded)."""
    if isinstance(records, (LineBlock, LineRange)):
        records = records.records()
    pairs, rejects, counts = convert_chunk(adapter, context, records)
    for table, directory in ((pairs, CANDIDATES_DIR), (rejects, REJECTS_DIR)):
        atomic.write_parquet(table, source_dir / directory / part_name(index), row_group_size=_PART_ROW_GROUP,
                             **schema.parquet_options(table.column_names))
    return counts


def prepare_output(source_dir: Path) -> None:
    """Start clean: parts of an earlier, possibly larger run must not mix with this one's."""
    for sub in (CANDIDATES_DIR, REJECTS_DIR):
        d = source_dir / sub
        if d.is_dir():
            for f in d.iterdir():
                if f.name.endswith(".parquet") or atomic.is_temp_name(f.name):
                    f.unlink()
    summary = source_dir / SUMMARY_FILE
    if summary.exists():
        summary.unlink()


def input_fingerprint(paths: Sequence[Path | str]) -> list[dict]:
    """What a later stage compares to decide whether an ingest output still matches its inputs: each input's path,
    size and mtime, or for an object its URL, size and ETag (`pmd.storage.fingerprint`: a HEAD, no byte read)."""
    return [storage.fingerprint(p) for p in paths]


def manifest_input(path: Path | str, digest: bool = True) -> dict:
    """An input as the manifest records it: path and size, and the sha256 of a local file's bytes (`digest`); an
    object on a store gets its ETag instead (hashing it would download it whole)."""
    if not storage.is_remote(path):
        p = Path(path)
        entry: dict = {"path": str(p.resolve()), "bytes": p.stat().st_size}
        if digest:
            entry["sha256"] = storage.sha256(p)
        return entry
    return storage.fingerprint(path)


def write_summary(source_dir: Path, source: str, inputs: Sequence[Path | str], options: Mapping[str, str],
                  counts: IngestCounts, parts: int, elapsed_s: float, executor: str) -> dict:
    summary = {
        "source": source,
        "schema_version": schema.SCHEMA_VERSION,
        "candidate_columns": list(schema.CANDIDATE_SCHEMA.names),
        "inputs": input_fingerprint(inputs),
        "options": dict(options),
        "parts": parts,
        "executor": executor,
        "elapsed_s": round(elapsed_s, 3),
        "counts": counts.to_dict(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic.write_json(summary, source_dir / SUMMARY_FILE)
    return summary


def read_summary(source_dir: Path) -> dict | None:
    path = source_dir / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def prepare_source(source: str, inputs: Sequence[Path | str], options: Mapping[str, str]
                   ) -> tuple[SourceAdapter, Context]:
    """The source's adapter and its context (lookups loaded), before any output is cleared: an unknown source,
    a missing or unreadable input (Visual Genome's image data, the Karpathy ids) fails here, and the earlier run is
    then left intact."""
    from pmd.sources import create_adapter
    from pmd.sources.inputs import require_file

    adapter = create_adapter(source, options)
    for path in inputs:
        require_file(path)
    return adapter, adapter.prepare(inputs)


def ingest_source(source: str, inputs: Sequence[Path | str], out: Path, options: Mapping[str, str],
                  chunk_records: int, executor, progress: bool = True,
                  prepared: tuple[SourceAdapter, Context] | None = None) -> dict:
    """Ingest one source into out/SOURCE: every chunk of records is one task (`ingest/SOURCE/part-NNNNN.parquet`:
    `process_chunk`) of `executor` (a pmd.executor.Executor); returns the summary, written last (ingest.json).
    `prepared`: prepare_source's result, when the caller checked the inputs before choosing the executor.

    The driver streams records out of the upstream files (decompression is sequential anyway) and hands chunks of
    them to the executor, which holds a bounded number in flight, so memory stays constant whatever the input."""
    from tqdm.auto import tqdm

    adapter, context = prepared or prepare_source(source, inputs, options)
    source_dir = out / source
    prepare_output(source_dir)
    started = time.perf_counter()
    counts = IngestCounts()
    bar = tqdm(desc=f"ingest {source}", unit=" records", unit_scale=True, disable=not progress)
    # Put once (Ray's object store): every task gets a reference, not its own copy of the context (a few MB for
    # Visual Genome's image data, docs/sources.md).
    adapter_ref, context_ref = executor.put(adapter), executor.put(context)
    parts = 0

    def collect(rows: int):
        def done(result: IngestCounts) -> None:
            counts.add(result)
            bar.update(rows)
        return done

    try:
        for index, chunk in enumerate(iter_chunks(adapter, inputs, chunk_records)):
            executor.submit(process_chunk, adapter_ref, context_ref, chunk, index, source_dir,
                            on_done=collect(chunk_size(chunk)), name=f"ingest/{source}/{part_name(index)}")
            parts = index + 1
        executor.drain()
    except BaseException:
        executor.cancel()
        raise
    finally:
        bar.close()
    return write_summary(source_dir, source, inputs, options, counts, parts, time.perf_counter() - started,
                         executor.kind)
