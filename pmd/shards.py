"""Shards of a built corpus: seeded placement, how a shard file is stored and described, and `verify` (against the
manifest, which pmd.manifest reads).

No Ray here: pmd.build_plan's tasks call these functions, wherever its executor runs them. The format is described
in docs/build-format.md. OUT may be a local directory or an object-storage URL (pmd.storage).

Placement: every kept pair gets `shuffle_hash = blake2b_64(f"{seed}:{key}")`; all kept pairs sorted by
(shuffle_hash, key) are cut into consecutive runs of `shard_rows`. So a shard is a random mix of all sources, and
the placement depends only on the set of kept keys and the seed, never on download order or timing.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pmd import atomic, card, schema, storage
from pmd.manifest import FAILURES_DIR, SHARDS_DIR, FileEntry, Manifest, ManifestError
from pmd.spill import HashPartitions, partitions_for

log = logging.getLogger(__name__)

DEFAULT_ROW_GROUP_ROWS = 1_000


def shuffle_hash(seed: int, key: str) -> int:
    """The 64-bit placement hash of a key: stable across Python versions, platforms and processes."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def text_hash(text: str) -> int:
    """A 64-bit digest of a caption: dedup groups on (image_sha256, text_hash) without holding every caption."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def shard_name(index: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:05d}.parquet"


def file_sha256(path: str | Path) -> str:
    return storage.sha256(path)


def write_shard_file(table: pa.Table, target: str | Path, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> None:
    """A Parquet file of pair-schema columns (shard, failures, takedown record), stored as schema.parquet_options
    says, written atomically."""
    atomic.write_parquet(table, target, row_group_size=row_group_rows, **schema.parquet_options(table.column_names))


def describe_file(out: str | Path, relative: str, source_column: str = schema.SOURCE) -> FileEntry:
    """Rows, size, sha256 and per-source row counts of a Parquet file already written (locally or remotely)."""
    path = storage.join(out, *relative.split("/"))
    with storage.open_input(path) as f:
        counts = pq.read_table(f, columns=[source_column]).column(source_column).value_counts().to_pylist()
    sources = {c["values"]: c["counts"] for c in counts}
    return FileEntry(relative, sum(sources.values()), storage.size(path), file_sha256(path), sources)


# ------------------------------------------------------------------------------------------------------- verify
def _schema_problem(actual: pa.Schema, expected: pa.Schema) -> str | None:
    got = [(f.name, f.type) for f in actual]
    want = [(f.name, f.type) for f in expected]
    if got != want:
        return f"columns {[f'{n}:{t}' for n, t in got]} differ from {[f'{n}:{t}' for n, t in want]}"
    return None


def verify(out: str | Path, check_sha256: bool = True, spill_dir: Path | None = None) -> list[str]:
    """Everything wrong with a build (a directory or a URL), as readable sentences; an empty list means it is intact.

    Checks: the manifest reads; every shard and failures file it lists exists with its size, sha256, row count and
    schema; shard per-source counts match the file; keys are unique across all shards; no stray shard files; the
    accounting identity input_rows = pairs + rejects + failures holds per source and matches the shard counts.

    Files are read one at a time; key uniqueness is checked over hash partitions of (key, shard) spilled under
    `spill_dir` (default: the system temp directory), so memory does not grow with the corpus.
    """
    out = storage.location(out)
    problems: list[str] = []
    try:
        found = Manifest.read(out)
    except ManifestError as e:
        return [str(e)]
    if found.format_problem:
        problems.append(found.format_problem)
    manifest = found.data

    pairs_by_source: dict[str, int] = {}
    listed = set()
    per_entry: list[list[str]] = []  # each listed file's problems, in listing order
    shard_entry: list[int] = []  # shard number (the order keys are checked in) -> its index in per_entry
    rows_listed = found.rows
    if spill_dir is not None:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pmd-verify-", dir=spill_dir) as tmp:
        keys = HashPartitions(Path(tmp), "keys", partitions_for(rows_listed), schema.KEY,
                              {schema.KEY: pl.String, "shard": pl.UInt32})
        for kind, entries, expected in (("shard", manifest.get("shards", []), schema.SHARD_SCHEMA),
                                        ("failures", manifest.get("failures", []), schema.FAILURE_SCHEMA)):
            for entry in entries:
                mine: list[str] = []
                per_entry.append(mine)
                table = _verify_file(out, kind, entry, expected, check_sha256, mine)
                listed.add(entry["file"])
                if table is None or kind != "shard":
                    continue
                for s, n in _source_counts(table).items():
                    pairs_by_source[s] = pairs_by_source.get(s, 0) + n
                keys.write(pl.DataFrame({schema.KEY: pl.from_arrow(table.column(schema.KEY)),
                                         "shard": pl.repeat(len(shard_entry), table.num_rows, dtype=pl.UInt32,
                                                            eager=True)}))
                shard_entry.append(len(per_entry) - 1)
        keys.close()
        repeated: set[int] = set()
        earlier: dict[int, tuple[int, str]] = {}
        for part in keys.frames():
            _key_checks(part, repeated, earlier)
    files = [e["file"] for e in (*manifest.get("shards", []), *manifest.get("failures", []))]
    for shard, i in enumerate(shard_entry):
        entry_problems, name = per_entry[i], files[i]
        if shard in repeated:
            entry_problems.append(f"{name}: keys repeated within the shard")
        if shard in earlier:
            n, example = earlier[shard]
            entry_problems.append(f"{name}: {n} keys also in an earlier shard, e.g. {example!r}")
    problems += [p for mine in per_entry for p in mine]

    for directory in (SHARDS_DIR, FAILURES_DIR):
        for path in storage.list_files(storage.join(out, directory), ".parquet"):
            rel = f"{directory}/{storage.basename(path)}"
            if rel not in listed:
                problems.append(f"{rel}: not listed in the manifest")

    problems += found.accounting_problems()
    problems += card.problems(found)
    for source, acc in found.accounting.items():
        if pairs_by_source.get(source, 0) != acc["pairs"]:
            problems.append(f"accounting {source}: shards hold {pairs_by_source.get(source, 0)} pairs, "
                            f"the manifest says {acc['pairs']}")
    extra = set(pairs_by_source) - set(manifest.get("accounting", {}))
    if extra:
        problems.append(f"shards hold sources missing from the accounting: {sorted(extra)}")
    return problems


def _verify_file(out: str | Path, kind: str, entry: Mapping, expected: pa.Schema, check_sha256: bool,
                 problems: list[str]) -> pa.Table | None:
    """One listed file against its manifest entry; its (key, source) columns when the file is sound enough."""
    rel = entry["file"]
    path = storage.join(out, *rel.split("/"))
    if not storage.is_file(path):
        problems.append(f"{rel}: {kind} file missing")
        return None
    size = storage.size(path)
    if size != entry["bytes"]:
        problems.append(f"{rel}: {size} bytes, manifest says {entry['bytes']}")
    if check_sha256 and file_sha256(path) != entry["sha256"]:
        problems.append(f"{rel}: sha256 differs from the manifest")
    try:
        pf = pq.ParquetFile(storage.open_input(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not raised
        problems.append(f"{rel}: not a readable Parquet file ({type(e).__name__}: {e})")
        return None
    if pf.metadata.num_rows != entry["rows"]:
        problems.append(f"{rel}: {pf.metadata.num_rows} rows, manifest says {entry['rows']}")
    problem = _schema_problem(pf.schema_arrow, expected)
    if problem:
        problems.append(f"{rel}: schema mismatch: {problem}")
        return None
    table = pf.read(columns=[schema.KEY, schema.SOURCE])
    sources = _source_counts(table)
    if sources != entry.get("sources", sources):
        problems.append(f"{rel}: per-source rows {sources} differ from the manifest's {entry['sources']}")
    return table


def _source_counts(table: pa.Table) -> dict[str, int]:
    return {c["values"]: c["counts"] for c in table.column(schema.SOURCE).value_counts().to_pylist()}


def _key_checks(part: pl.DataFrame, repeated: set[int], earlier: dict[int, tuple[int, str]]) -> None:
    """One hash partition of (key, shard): every row of a key is here, so its verdict is final.

    `repeated` gets the shards that hold a key twice; `earlier[shard]` counts the distinct keys of that shard
    already seen in a shard checked before it, with the smallest as the example."""
    if not part.height or part[schema.KEY].n_unique() == part.height:  # the usual case: every key once
        return
    counted = part.group_by(schema.KEY, "shard").len()
    repeated.update(counted.filter(pl.col("len") > 1)["shard"].unique().to_list())
    first = counted.group_by(schema.KEY).agg(pl.col("shard").min().alias("first"))
    later = counted.join(first, on=schema.KEY).filter(pl.col("shard") > pl.col("first"))
    for shard, n, example in later.group_by("shard").agg(pl.len(), pl.col(schema.KEY).min()).iter_rows():
        if shard in earlier:
            n, example = earlier[shard][0] + n, min(earlier[shard][1], example)
        earlier[shard] = (n, example)


def sum_counts(dicts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


__all__: Sequence[str] = (
    "describe_file", "file_sha256", "shard_name", "shuffle_hash", "text_hash", "verify", "write_shard_file",
)
