"""Statistics of a build, computed from metadata columns only (never the image bytes), streaming.

The shards are read in batches and reduced to partial aggregates that merge exactly, and distinct counts go
through hash partitions on disk (pmd.spill), so memory does not grow with the corpus (docs/stats.md, "At PMD's
size"); the figures are those of one polars computation over all rows, value for value.

`audit(out)` returns a plain dict with stable keys (documented in docs/stats.md) so that the terminal table, the
JSON output and the report are three views of one computation. Problems found on the way (a missing or unreadable
shard, a manifest that disagrees with the files, an accounting identity that does not hold) are collected, not
raised: the rest is still reported, and `trusted` says whether the audit can be believed.
"""

from __future__ import annotations

import heapq
import logging
import math
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pmd import placeholders, schema, storage
from pmd.catalog import PAPER_AVG_WORDS, PAPER_TOTAL_PAIRS, load_catalog
from pmd.decontaminate import eval_overlap_counts
from pmd.licences import COMMERCIAL_USE, LICENCE, with_licences
from pmd.manifest import FAILURES_DIR, Manifest, ManifestError, ManifestMissing, identity_problem, not_written_yet
from pmd.reasons import IMAGE_STAGES, Reason, Stage
from pmd.spill import HashPartitions, partitions_for
from pmd.text import word_count_series

log = logging.getLogger(__name__)

# Ingest and work folders hold candidates, not shards.
_NOT_SHARD_DIRS = {FAILURES_DIR, "candidates", "rejects", "work", "takedowns"}  # takedowns: pmd.takedown records
WORD_BINS = (0, 5, 10, 15, 20, 30, 50)  # histogram edges; the last bin is open
SIDE_BINS = (0, 128, 256, 512, 1024, 2048)  # shorter side of the original image, pixels
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_STAT_COLUMNS = [schema.KEY, schema.SOURCE, schema.TEXT, schema.SPLIT, schema.META, schema.LANG, schema.LANG_SCORE,
                 schema.IMAGE_SHA256, schema.WIDTH, schema.HEIGHT, schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT]


class BuildNotFound(FileNotFoundError):
    pass


@dataclass
class BuildFiles:
    """What an audit reads: the manifest (if any), the shards that open, the failures files, and what is wrong."""

    root: str | Path
    manifest: dict | None
    shards: list[str | Path] = field(default_factory=list)
    failures: list[str | Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    shard_rows: list[int] = field(default_factory=list)  # rows of each readable shard, from its footer


def _is_shard_file(relative: str) -> bool:
    parts = relative.split("/")
    return not any(part in _NOT_SHARD_DIRS or part.startswith(".") for part in parts[:-1]) \
        and not parts[-1].startswith(".")


def _key(path: str | Path) -> str:
    """A location compared with another: a local path resolved (symlinks, ..), a URL as written."""
    return str(path) if storage.is_remote(path) else str(Path(path).resolve())


def locate_build(root: str | Path) -> BuildFiles:
    """Find and sanity-check a build's files (a local directory or an object-storage URL). Never raises for a
    bad shard: it becomes a problem."""
    root = storage.location(root)
    if not storage.is_dir(root):
        raise BuildNotFound(f"{root}: no such build directory")
    manifest = None
    problems: list[str] = []
    try:
        manifest = Manifest.read(root).data
    except ManifestMissing:
        if (unfinished := not_written_yet(root)) is not None:
            raise ManifestMissing(unfinished) from None
        problems.append(f"{storage.join(root, 'manifest.json')}: missing; accounting cannot be checked")
    except ManifestError as exc:
        problems.append(f"unreadable manifest: {exc}")

    prefix = len(str(root).rstrip("/")) + 1
    on_disk = [p for p in storage.list_files(root, ".parquet", recursive=True)
               if _is_shard_file(str(p)[prefix:].replace("\\", "/"))]
    on_disk = [storage.location(p) for p in on_disk]
    listed: dict[str, dict] = {}
    if manifest is not None:
        for entry in manifest.get("shards", []):
            path = storage.location(storage.join(root, *entry["file"].split("/")))
            listed[_key(path)] = entry
            if not storage.exists(path):
                problems.append(f"{path}: listed in the manifest but missing")
        for path in on_disk:
            if _key(path) not in listed:
                problems.append(f"{path}: shard on disk but not in the manifest")

    shards: list[str | Path] = []
    shard_rows: list[int] = []
    for path in on_disk:
        try:
            with pq.ParquetFile(storage.open_input(path)) as parquet:  # one footer read for both
                meta, file_schema = parquet.metadata, parquet.schema_arrow
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            problems.append(f"{path}: unreadable Parquet ({exc.__class__.__name__}: {exc})")
            continue
        missing = [c for c in _STAT_COLUMNS if c not in file_schema.names]
        if missing:
            problems.append(f"{path}: not a shard (missing columns {', '.join(missing)})")
            continue
        entry = listed.get(_key(path))
        if entry is not None and entry.get("rows") != meta.num_rows:
            problems.append(f"{path}: {meta.num_rows} rows, the manifest says {entry.get('rows')}")
        shards.append(path)
        shard_rows.append(meta.num_rows)

    failures = [storage.location(p) for p in storage.list_files(storage.join(root, FAILURES_DIR), ".parquet")]
    if not shards:
        problems.append(f"{root}: no readable shards: an empty build")
    return BuildFiles(root, manifest, shards, failures, problems, shard_rows)


_IMAGE_COLUMNS = (schema.WIDTH, schema.HEIGHT, schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT)


def _bin_labels(edges: tuple[int, ...] = WORD_BINS) -> list[tuple[str, int, int | None]]:
    edges = list(edges)
    return [(f"{lo}-{hi - 1}" if hi is not None else f"{lo}+", lo, hi) for lo, hi in zip(edges, edges[1:] + [None])]


def _floats(row: dict, prefix: str) -> dict:
    def f(v):
        return None if v is None else float(v)

    return {"mean": f(row[f"{prefix}_mean"]), **{f"p{int(q * 100)}": f(row[f"{prefix}_p{int(q * 100)}"])
                                                  for q in QUANTILES}}


def _group_stats(row: dict, splits: dict[str, int], langs: dict[str, int]) -> dict:
    """The nested figures of one group from its aggregation row and its split and language counts."""
    pairs = row["pairs"]
    return {
        "pairs": pairs,
        "unique_images": row["unique_images"],
        "words": {
            "mean": row["w_mean"], "median": None if row["w_median"] is None else float(row["w_median"]),
            "p5": row["w_p5"], "p95": row["w_p95"],
            "histogram": {label: row[f"h_{label}"] for label, _, _ in _bin_labels()},
        },
        "image": {
            **{c: _floats(row, c) for c in _IMAGE_COLUMNS},
            "shorter_side_histogram": {label: row[f"s_{label}"] for label, _, _ in _bin_labels(SIDE_BINS)},
        },
        "splits": dict(sorted(splits.items())),
        "lang": None if not row["lang_rows"] else {
            "counts": dict(sorted(langs.items(), key=lambda kv: (-kv[1], kv[0]))),
            "score": _floats(row, schema.LANG_SCORE),
        },
    }


# ------------------------------------------------------------------------------------------- streaming figures
# The audit reads the shards in batches of about BATCH_ROWS rows and keeps only partial aggregates that merge
# exactly: row counts, value counts of the integer columns (words, pixels: a few thousand distinct values however
# large the corpus), exact sums, and per-bucket counts of the float scores. Distinct images and repeated keys are
# counted on disk (pmd.spill). Memory is bounded by a batch and a partition, not by the corpus.
BATCH_ROWS = 1 << 18
_SHORTER = "shorter_side"
_INT_COLUMNS = ("words", *_IMAGE_COLUMNS, _SHORTER)
_BUCKET_SHIFT = 16  # score buckets = top 16 bits of the order-preserving key: <= 65,536 values per bucket
_COUNT = "n"


def _batches(paths: list[Path], rows: list[int], limit: int) -> list[list[Path]]:
    """Consecutive files grouped up to `limit` rows (a larger file is a batch of its own)."""
    out: list[list[Path]] = []
    size = 0
    for path, n in zip(paths, rows):
        if not out or size + n > limit:
            out.append([])
            size = 0
        out[-1].append(path)
        size += n
    return out


def _sortable(scores: np.ndarray) -> np.ndarray:
    """float32 -> uint32 in the same order (sign flipped, negatives inverted): its top bits are value ranges."""
    bits = scores.astype(np.float32).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def _unsortable(keys: np.ndarray) -> np.ndarray:
    keys = keys.astype(np.uint32)
    bits = np.where(keys & np.uint32(0x80000000), keys & np.uint32(0x7FFFFFFF), ~keys).astype(np.uint32)
    return bits.view(np.float32)


def _exact_sum(values: np.ndarray) -> int:
    """The sum of float32 values as an exact integer multiple of 2**-149 (the smallest float32 step)."""
    mantissa, exponent = np.frexp(values.astype(np.float64))
    ints = (mantissa * (1 << 24)).astype(np.int64)  # exact: a float32 has 24 significant bits
    total = 0
    for e in np.unique(exponent):
        part, shift = int(ints[exponent == e].sum()), int(e - 24 + 149)
        # Subnormals have shift < 0, and then every mantissa ends in at least -shift zero bits: still exact.
        total += part << shift if shift >= 0 else part >> -shift
    return total


def _linear_quantile(nonnull: int, nulls: int, q: float, at, float32: bool = False) -> float | None:
    """polars' `quantile(q, "linear")`, bit for bit: nulls sort first and shift the index (so the interpolation
    weight is computed the same way), the interpolation runs in float64, a float32 column rounds the result."""
    if not nonnull:
        return None
    position = (nonnull - 1.0) * q + nulls
    lower, upper = int(position), math.ceil(position)
    lo, hi = float(at(lower - nulls)), float(at(upper - nulls))
    value = lo if lo == hi else (position - lower) * (hi - lo) + lo
    return float(np.float32(value)) if float32 else value


@dataclass
class _Counted:
    """A column's distribution in one group as sorted distinct values and their counts."""

    values: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, frame: pl.DataFrame) -> _Counted:
        frame = frame.sort("value")
        return cls(frame["value"].to_numpy(), frame[_COUNT].to_numpy().astype(np.int64))

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def at(self, rank: int):
        return self.values[np.searchsorted(np.cumsum(self.counts), rank, side="right")]

    def mean(self) -> float | None:
        # An exact integer sum divided once: what polars' float64 sum gives while it is below 2**53.
        total = self.total
        return int((self.values.astype(np.int64) * self.counts).sum()) / total if total else None

    def quantile(self, q: float, nulls: int) -> float | None:
        return _linear_quantile(self.total, nulls, q, self.at)

    def histogram(self, edges: tuple[int, ...], prefix: str) -> dict[str, int]:
        out = {}
        for label, lo, hi in _bin_labels(edges):
            mask = (self.values >= lo) if hi is None else ((self.values >= lo) & (self.values < hi))
            out[f"{prefix}{label}"] = int(self.counts[mask].sum())
        return out


class _Merged:
    """Per-batch count tables (keys + `n`) summed as they come, compacted so that they never pile up."""

    def __init__(self, keys: list[str], schema: dict[str, pl.DataType]):
        self.keys = keys
        self.frame = pl.DataFrame(schema={**schema, _COUNT: pl.Int64})
        self._parts: list[pl.DataFrame] = []

    def add(self, part: pl.DataFrame) -> None:
        self._parts.append(part.select([pl.col(c).cast(self.frame.schema[c]) for c in self.frame.columns]))
        if len(self._parts) >= 16:
            self.result()

    def result(self) -> pl.DataFrame:
        if self._parts:
            self.frame = pl.concat([self.frame, *self._parts]).group_by(self.keys, maintain_order=True).agg(
                pl.col(_COUNT).sum()).sort(self.keys)
            self._parts = []
        return self.frame


@dataclass
class _ScoreSums:
    nonnull: int = 0
    exact_sum: int = 0
    special: float | None = None  # the float sum of NaN and infinite scores, which decide the mean when present

    def add(self, values: np.ndarray) -> None:
        finite = np.isfinite(values)
        self.nonnull += len(values)
        self.exact_sum += _exact_sum(values[finite])
        if not finite.all():
            self.special = float(np.sum(values[~finite], dtype=np.float64)) + (self.special or 0.0)


class _SourceCodes:
    """Source names as small integers, in order of first appearance: an integer group-by is many times faster
    than one on strings, and up to 64 sources fit one bitmask."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}

    def encode(self, names: pl.Series) -> pl.Series:
        for name in names.unique().to_list():
            self.codes.setdefault(name, len(self.codes))
        return names.replace_strict(self.codes, return_dtype=pl.UInt64)

    def decode(self, codes: pl.Expr) -> pl.Expr:
        return codes.replace_strict({c: n for n, c in self.codes.items()}, return_dtype=pl.String)


_VALUE_BITS = 32  # a value count's code: source << 32 | (value + 2**31), one integer column for value_counts
_VALUE_OFFSET = 1 << 31
_BITMASK_SOURCES = 64


@dataclass
class _ShardFigures:
    """Everything one pass over the shards yields; each figure merges exactly across batches."""

    sources: _SourceCodes = field(default_factory=_SourceCodes)
    pairs: _Merged = field(default_factory=lambda: _Merged(["code"], {"code": pl.UInt64}))
    codes: dict[str, _Merged] = field(default_factory=lambda: {
        c: _Merged(["code"], {"code": pl.UInt64}) for c in _INT_COLUMNS})
    splits: _Merged = field(default_factory=lambda: _Merged([schema.SOURCE, schema.SPLIT],
                                                            {schema.SOURCE: pl.String, schema.SPLIT: pl.String}))
    langs: _Merged = field(default_factory=lambda: _Merged([schema.SOURCE, schema.LANG],
                                                           {schema.SOURCE: pl.String, schema.LANG: pl.String}))
    licences: _Merged = field(default_factory=lambda: _Merged([schema.SOURCE, LICENCE],
                                                              {schema.SOURCE: pl.String, LICENCE: pl.String}))
    commercial: _Merged = field(default_factory=lambda: _Merged(
        [schema.SOURCE, COMMERCIAL_USE], {schema.SOURCE: pl.String, COMMERCIAL_USE: pl.String}))
    score_buckets: _Merged = field(default_factory=lambda: _Merged(
        [schema.SOURCE, "bucket"], {schema.SOURCE: pl.String, "bucket": pl.UInt32}))
    scores: dict[str, _ScoreSums] = field(default_factory=dict)
    unique_images: dict[str, int] = field(default_factory=dict)
    total_unique_images: int = 0
    images_with_several_captions: int = 0
    pairs_on_shared_images: int = 0
    images_across_sources: int = 0
    duplicate_keys: int = 0
    values: dict[str, pl.DataFrame] = field(default_factory=dict)  # column -> (source, value, n), after the scan

    def pairs_per_source(self) -> dict[str, int]:
        frame = self.pairs.result()
        return dict(zip(frame.select(self.sources.decode(pl.col("code"))).to_series().to_list(),
                        frame[_COUNT].to_list()))

    def decode_values(self) -> None:
        for column, merged in self.codes.items():
            self.values[column] = merged.result().select(
                self.sources.decode(pl.col("code") // (1 << _VALUE_BITS)).alias(schema.SOURCE),
                ((pl.col("code") % (1 << _VALUE_BITS)).cast(pl.Int64) - _VALUE_OFFSET).alias("value"),
                pl.col(_COUNT))


def _read(paths: list[str | Path], columns: list[str]) -> pl.DataFrame:
    if not any(storage.is_remote(p) for p in paths):
        return pl.scan_parquet(paths).select(columns).collect()
    # Object storage: pyarrow reads the columns with ranged requests through the filesystem pmd.storage resolves
    # (its options and credentials), then polars takes the Arrow table without a copy.
    return pl.from_arrow(pa.concat_tables([pq.read_table(storage.open_input(p), columns=columns)
                                           for p in paths])).select(columns)


def _value_counts(codes: pl.Series) -> pl.DataFrame:
    return codes.drop_nulls().value_counts(name=_COUNT).rename({codes.name: "code"})


def _scan_shards(files: BuildFiles, spill: Path) -> _ShardFigures:
    """One pass over the shards' metadata: per-batch partial aggregates, images and keys spilled by hash."""
    figures = _ShardFigures()
    n_parts = partitions_for(sum(files.shard_rows))
    images = HashPartitions(spill, "images", n_parts, schema.IMAGE_SHA256,
                            {schema.IMAGE_SHA256: pl.String, "code": pl.UInt16})
    keys = HashPartitions(spill, "keys", n_parts, schema.KEY, {schema.KEY: pl.String})
    for batch in _batches(files.shards, files.shard_rows, BATCH_ROWS):
        frame = _read(batch, _STAT_COLUMNS).with_columns(pl.col(schema.LANG_SCORE).cast(pl.Float32))
        code = figures.sources.encode(frame[schema.SOURCE]).alias("code")
        figures.pairs.add(_value_counts(code))
        columns = {"words": word_count_series(frame[schema.TEXT]).cast(pl.UInt32),
                   _SHORTER: frame.select(pl.min_horizontal(schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT)).to_series(),
                   **{c: frame[c] for c in _IMAGE_COLUMNS}}
        for column, values in columns.items():
            figures.codes[column].add(_value_counts(
                (code * (1 << _VALUE_BITS) + (values.cast(pl.Int64) + _VALUE_OFFSET).cast(pl.UInt64)).alias("code")))
        figures.splits.add(frame.group_by(schema.SOURCE, schema.SPLIT).len(_COUNT))
        figures.langs.add(frame.drop_nulls(schema.LANG).group_by(schema.SOURCE, schema.LANG).len(_COUNT))
        tagged = with_licences(frame.select(schema.SOURCE, schema.META))
        figures.licences.add(tagged.group_by(schema.SOURCE, LICENCE).len(_COUNT))
        figures.commercial.add(tagged.group_by(schema.SOURCE, COMMERCIAL_USE).len(_COUNT))
        _add_scores(figures, frame.select(schema.SOURCE, schema.LANG_SCORE).drop_nulls(schema.LANG_SCORE))
        images.write(pl.DataFrame([frame[schema.IMAGE_SHA256], code]))
        keys.write(frame.select(schema.KEY))
        del frame, code, columns
    images.close()
    keys.close()
    for part in images.frames():
        _count_images(figures, part)
    for part in keys.frames():
        figures.duplicate_keys += part.height - part[schema.KEY].n_unique() if part.height else 0
    figures.decode_values()
    return figures


def _add_scores(figures: _ShardFigures, scores: pl.DataFrame) -> None:
    for (source,), part in scores.partition_by(schema.SOURCE, as_dict=True).items():
        values = part[schema.LANG_SCORE].to_numpy()
        figures.scores.setdefault(source, _ScoreSums()).add(values)
        buckets, counts = np.unique(_sortable(values) >> _BUCKET_SHIFT, return_counts=True)
        figures.score_buckets.add(pl.DataFrame({schema.SOURCE: [source] * len(buckets), "bucket": buckets,
                                                _COUNT: counts}))


def _count_images(figures: _ShardFigures, part: pl.DataFrame) -> None:
    """One hash partition of (image, source code): every row of an image is here, so its counts are final."""
    if not part.height:
        return
    sha, names = schema.IMAGE_SHA256, {c: n for n, c in figures.sources.codes.items()}
    if len(names) <= _BITMASK_SOURCES:  # one string group-by: the sources of an image as bits of one integer
        bits = part["code"].replace_strict({c: 1 << c for c in names}, return_dtype=pl.UInt64).alias("bit")
        per_image = part.select(sha).with_columns(bits).group_by(sha).agg(
            pl.len().alias("pairs"), pl.col("bit").bitwise_or().alias("bits"))
        per_image = per_image.with_columns(sources=pl.col("bits").bitwise_count_ones())
        found = per_image.select(((pl.col("bits") & pl.lit(1 << c, dtype=pl.UInt64)) != 0).sum().alias(str(c))
                                 for c in names).row(0, named=True)
        per_source = {names[int(c)]: n for c, n in found.items()}
    else:
        per_image = part.group_by(sha).agg(pl.len().alias("pairs"), pl.col("code").n_unique().alias("sources"))
        per_source = {names[c]: n for c, n in part.unique([sha, "code"]).group_by("code").len().iter_rows()}
    for source, n in per_source.items():
        figures.unique_images[source] = figures.unique_images.get(source, 0) + n
    shared = per_image.filter(pl.col("pairs") > 1)
    figures.total_unique_images += per_image.height
    figures.images_with_several_captions += shared.height
    figures.pairs_on_shared_images += int(shared["pairs"].sum()) if shared.height else 0
    figures.images_across_sources += per_image.filter(pl.col("sources") > 1).height


def _score_quantiles(figures: _ShardFigures, files: BuildFiles, pairs: dict[str | None, int]) \
        -> dict[str | None, dict[float, float | None]]:
    """Exact quantiles of lang_score per source (and None: all sources) in a second pass over one column.

    The first pass counted rows per bucket (a range of float32 values); the ranks each quantile needs fall in
    a few buckets, and only the values of those buckets are counted now, so memory stays bounded."""
    buckets = figures.score_buckets.result()
    groups = {**{s: buckets.filter(pl.col(schema.SOURCE) == s) for s in figures.scores}, None: buckets}
    wanted: dict[str | None, dict[int, tuple[int, int]]] = {}  # group -> rank -> (bucket, rank in the bucket)
    needed: set[int] = set()
    for group, frame in groups.items():
        counted = _Counted.of(frame.group_by("bucket").agg(pl.col(_COUNT).sum()).rename({"bucket": "value"}))
        nonnull = counted.total
        cumulative = np.cumsum(counted.counts)
        ranks = set()
        for q in QUANTILES:
            if nonnull:
                position = (nonnull - 1.0) * q + (pairs[group] - nonnull)
                ranks |= {int(position) - (pairs[group] - nonnull), math.ceil(position) - (pairs[group] - nonnull)}
        wanted[group] = {}
        for rank in ranks:
            i = int(np.searchsorted(cumulative, rank, side="right"))
            wanted[group][rank] = (int(counted.values[i]), rank - int(cumulative[i] - counted.counts[i]))
            needed.add(int(counted.values[i]))
    if not needed:
        return {group: {q: None for q in QUANTILES} for group in groups}

    values = _Merged([schema.SOURCE, "value"], {schema.SOURCE: pl.String, "value": pl.UInt32})
    needed_list = pl.Series(sorted(needed), dtype=pl.UInt32)
    for batch in _batches(files.shards, files.shard_rows, BATCH_ROWS):
        frame = _read(batch, [schema.SOURCE, schema.LANG_SCORE]).drop_nulls(schema.LANG_SCORE)
        keys = _sortable(frame[schema.LANG_SCORE].cast(pl.Float32).to_numpy())
        frame = frame.select(schema.SOURCE).with_columns(value=pl.Series(keys, dtype=pl.UInt32))
        frame = frame.filter((pl.col("value") // (1 << _BUCKET_SHIFT)).is_in(needed_list.implode()))
        values.add(frame.group_by(schema.SOURCE, "value").len(_COUNT))
    values_frame = values.result().with_columns(bucket=pl.col("value") // (1 << _BUCKET_SHIFT))

    out: dict[str | None, dict[float, float | None]] = {}
    for group in groups:
        mine = values_frame if group is None else values_frame.filter(pl.col(schema.SOURCE) == group)
        by_bucket = {b: _Counted.of(f.group_by("value").agg(pl.col(_COUNT).sum()))
                     for (b,), f in mine.partition_by("bucket", as_dict=True).items()}

        def at(rank: int, group=group, by_bucket=by_bucket) -> float:
            bucket, inner = wanted[group][rank]
            return float(_unsortable(np.array([by_bucket[bucket].at(inner)]))[0])

        nonnull = figures.scores[group].nonnull if group is not None else sum(
            s.nonnull for s in figures.scores.values())
        out[group] = {q: _linear_quantile(nonnull, pairs[group] - nonnull, q, at, float32=True) for q in QUANTILES}
    return out


def _group_row(group: str | None, figures: _ShardFigures, pairs: dict[str | None, int],
               score_quantiles: dict[str | None, dict[float, float | None]]) -> dict:
    """The figures of one group (a source, or None for all) under the names `_group_stats` reads."""
    n = pairs.get(group, 0)
    row: dict = {"pairs": n}
    for column in _INT_COLUMNS:
        frame = figures.values[column]
        if group is not None:
            frame = frame.filter(pl.col(schema.SOURCE) == group)
        counted = _Counted.of(frame.group_by("value").agg(pl.col(_COUNT).sum()))
        nulls = n - counted.total
        if column == "words":
            row.update(w_mean=counted.mean(), w_median=counted.quantile(0.5, nulls),
                       w_p5=counted.quantile(0.05, nulls), w_p95=counted.quantile(0.95, nulls))
            row.update(counted.histogram(WORD_BINS, "h_"))
        elif column == _SHORTER:
            row.update(counted.histogram(SIDE_BINS, "s_"))
        else:
            row[f"{column}_mean"] = counted.mean()
            row.update({f"{column}_p{int(q * 100)}": counted.quantile(q, nulls) for q in QUANTILES})
    sums = [figures.scores[group]] if group in figures.scores else \
        (list(figures.scores.values()) if group is None else [])
    nonnull = sum(s.nonnull for s in sums)
    exact = sum(s.exact_sum for s in sums)
    specials = [s.special for s in sums if s.special is not None]
    # float32 mean: the exact mean rounded to float64, then to float32, as polars computes it.
    mean = float(Fraction(exact, nonnull << 149)) if nonnull else None
    if specials:  # NaN, or an infinity, swallows the finite part as in any float sum
        mean = sum(specials) + (mean or 0.0)
    row[f"{schema.LANG_SCORE}_mean"] = float(np.float32(mean)) if mean is not None else None
    quantiles = score_quantiles.get(group, {})
    row.update({f"{schema.LANG_SCORE}_p{int(q * 100)}": quantiles.get(q) for q in QUANTILES})
    langs = figures.langs.result()
    row["lang_rows"] = int((langs if group is None else langs.filter(pl.col(schema.SOURCE) == group))[_COUNT].sum())
    return row


def _failure_counts(files: list[Path], problems: list[str]) -> pl.DataFrame:
    merged = _Merged([schema.SOURCE, schema.STAGE, schema.REASON],
                     {schema.SOURCE: pl.String, schema.STAGE: pl.String, schema.REASON: pl.String})
    for path in files:
        try:  # one file at a time, counted at once: the failures of a 70M build are tens of millions of rows
            merged.add(_read([path], [schema.SOURCE, schema.STAGE, schema.REASON])
                       .group_by(schema.SOURCE, schema.STAGE, schema.REASON).len(_COUNT))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{path}: unreadable failures file ({exc.__class__.__name__}: {exc})")
    return merged.result()


def _downloads_saved(manifest: dict | None, name: str) -> int | None:
    """`downloads.saved_by_url_dedup` of a source in the manifest (accounting or sources), None when absent."""
    for section in ("accounting", "sources"):
        downloads = ((manifest or {}).get(section) or {}).get(name, {}) or {}
        downloads = downloads.get("downloads") if isinstance(downloads, dict) else None
        if isinstance(downloads, dict) and downloads.get("saved_by_url_dedup") is not None:
            return int(downloads["saved_by_url_dedup"])
    return None


def _spill_directory(prefix: str, parent: Path | None) -> tempfile.TemporaryDirectory:
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=parent)


def audit(root: Path, spill_dir: Path | None = None) -> dict:
    """Every figure `pmd stats` shows, for the build in `root`.

    Distinct images and repeated keys are counted over hash partitions spilled under `spill_dir` (default: the
    system temp directory; about 70 bytes a row, deleted as they are read)."""
    files = locate_build(root)
    problems = files.problems
    with _spill_directory("pmd-stats-", spill_dir) as tmp:
        figures = _scan_shards(files, Path(tmp))
    if figures.duplicate_keys:
        problems.append(f"{figures.duplicate_keys} keys appear in more than one shard row")
    pairs: dict[str | None, int] = figures.pairs_per_source()
    pairs[None] = sum(pairs.values())
    score_quantiles = _score_quantiles(figures, files, pairs)

    def row_of(group: str | None) -> dict:
        row = _group_row(group, figures, pairs, score_quantiles)
        row["unique_images"] = figures.total_unique_images if group is None else figures.unique_images.get(group, 0)
        return row

    def counts(table: pl.DataFrame, column: str, source: str | None) -> dict[str, int]:
        if source is not None:
            table = table.filter(pl.col(schema.SOURCE) == source)
        return {k: int(v) for k, v in table.group_by(column).agg(pl.col(_COUNT).sum()).iter_rows()}

    split_counts, lang_counts = figures.splits.result(), figures.langs.result()
    licence_counts, commercial_counts = figures.licences.result(), figures.commercial.result()
    failures = _failure_counts(files.failures, problems)
    accounting = (files.manifest or {}).get("accounting", {})
    catalog = {e.name: e for e in load_catalog()}
    sources: dict[str, dict] = {}
    names = sorted({s for s in pairs if s is not None} | set(accounting))
    for name in names:
        row = row_of(name)
        stats = _group_stats(row, counts(split_counts, schema.SPLIT, name), counts(lang_counts, schema.LANG, name))
        src_failures = failures.filter(pl.col(schema.SOURCE) == name)
        stats["failures_by_reason"] = dict(sorted(
            src_failures.group_by(schema.REASON).agg(pl.col(_COUNT).sum()).iter_rows()))
        stats["failures_by_stage"] = dict(sorted(
            src_failures.group_by(schema.STAGE).agg(pl.col(_COUNT).sum()).iter_rows()))
        acc = accounting.get(name)
        stats["accounting"] = _check_accounting(name, acc, stats, problems)
        stats["success"] = _success(stats)
        entry = catalog.get(name)
        stats["table2"] = None if entry is None else {
            "paper_pairs": entry.table2_pairs,
            "paper_avg_words": entry.table2_avg_words,
            "pairs_ratio": stats["pairs"] / entry.table2_pairs if entry.table2_pairs else None,
            "words_ratio": (stats["words"]["mean"] / entry.table2_avg_words
                            if stats["words"]["mean"] is not None else None),
            "apportioned": entry.table2_apportioned,
        }
        stats["licences"] = dict(sorted(counts(licence_counts, LICENCE, name).items()))
        stats["commercial_use"] = dict(sorted(counts(commercial_counts, COMMERCIAL_USE, name).items()))
        saved = _downloads_saved(files.manifest, name)
        if saved is not None:  # builds from before URL dedup do not record it: nothing is reported
            stats["downloads_saved_by_url_dedup"] = saved
        sources[name] = stats

    total = _group_stats(row_of(None),
                         counts(split_counts, schema.SPLIT, None), counts(lang_counts, schema.LANG, None))
    total["failures_by_reason"] = dict(sorted(
        failures.group_by(schema.REASON).agg(pl.col(_COUNT).sum()).iter_rows()))
    total["failures_by_stage"] = dict(sorted(
        failures.group_by(schema.STAGE).agg(pl.col(_COUNT).sum()).iter_rows()))
    total["accounting"] = _sum_accounting([s["accounting"] for s in sources.values()])
    total["success"] = _success(total)
    total["table2"] = {"paper_pairs": PAPER_TOTAL_PAIRS, "paper_avg_words": PAPER_AVG_WORDS,
                       "pairs_ratio": total["pairs"] / PAPER_TOTAL_PAIRS,
                       "words_ratio": total["words"]["mean"] / PAPER_AVG_WORDS if total["pairs"] else None,
                       "apportioned": False}
    total["licences"] = dict(sorted(counts(licence_counts, LICENCE, None).items()))
    total["commercial_use"] = dict(sorted(counts(commercial_counts, COMMERCIAL_USE, None).items()))
    saved = [s["downloads_saved_by_url_dedup"] for s in sources.values() if "downloads_saved_by_url_dedup" in s]
    if saved:
        total["downloads_saved_by_url_dedup"] = sum(saved)

    duplicates = {
        "pairs_dropped": int(failures.filter(pl.col(schema.REASON) == Reason.DUPLICATE.value)[_COUNT].sum()),
        "images_with_several_captions": figures.images_with_several_captions,
        "pairs_on_shared_images": figures.pairs_on_shared_images,
        "images_across_sources": figures.images_across_sources,
    }
    return {
        "build": str(storage.location(root)),
        "schema_version": schema.SCHEMA_VERSION,
        "shards": len(files.shards),
        "failures_files": len(files.failures),
        "sources": sources,
        "total": total,
        "duplicates": duplicates,
        "eval_overlap": eval_overlap_counts(files.failures),  # source -> evaluation set -> pairs removed
        "placeholders": placeholders.report(files.failures),  # pmd.placeholders: each one, with sample URLs
        "problems": problems,
        "trusted": not problems,
    }


def _check_accounting(name: str, acc: dict | None, stats: dict, problems: list[str]) -> dict | None:
    if acc is None:
        return None
    failures = sum(stats["failures_by_reason"].values())
    out = {
        "input_rows": acc.get("input_rows"),
        "pairs": stats["pairs"],
        "rejects": acc.get("rejects", 0),
        "failures": failures,
        "rejects_by_reason": acc.get("rejects_by_reason", {}),
    }
    problem = identity_problem(name, out)
    out["identity_holds"] = problem is None
    if problem:
        problems.append(problem)
    if acc.get("pairs") is not None and acc["pairs"] != stats["pairs"]:
        problems.append(f"{name}: the manifest counts {acc['pairs']} pairs, the shards hold {stats['pairs']}")
    return out


def _sum_accounting(parts: list[dict | None]) -> dict | None:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    out = {k: sum(p[k] or 0 for p in parts) for k in ("input_rows", "pairs", "rejects", "failures")}
    reasons: dict[str, int] = {}
    for p in parts:
        for k, v in p["rejects_by_reason"].items():
            reasons[k] = reasons.get(k, 0) + v
    out["rejects_by_reason"] = dict(sorted(reasons.items()))
    out["identity_holds"] = all(p["identity_holds"] for p in parts)
    return out


def _success(stats: dict) -> dict:
    """Of the candidates that reached the image stages (pairs + failures), how many got a usable image."""
    by_stage = stats["failures_by_stage"]
    image_failures = sum(by_stage.get(s, 0) for s in IMAGE_STAGES)
    attempted = stats["pairs"] + image_failures
    downloads_failed = by_stage.get(Stage.DOWNLOAD, 0)
    return {
        "attempted": attempted,
        "image_failures": image_failures,
        "image_success_rate": (stats["pairs"] / attempted) if attempted else None,
        "download_success_rate": ((attempted - downloads_failed) / attempted) if attempted else None,
    }


LOST_KEYS = "lost_keys.parquet"  # beside the report of a comparison


def compare(root: Path, other: Path, examples: int = 20, lost_keys_to: Path | None = None,
            spill_dir: Path | None = None, report_dir: Path | None = None) -> dict:
    """What changed from build `other` (before) to build `root` (after): keys gained and lost per source.

    Both builds' (key, source) go to disk partitioned by a hash of the key, so each anti-join runs on one
    partition at a time. `lost_keys_to` receives every lost (key, source), sorted by key, as Parquet; with
    `report_dir` (`pmd stats --compare --report DIR`) that file is DIR/lost_keys.parquet."""
    if lost_keys_to is None and report_dir is not None:
        lost_keys_to = Path(report_dir) / LOST_KEYS
    before_files, after_files = locate_build(other), locate_build(root)
    problems = [*(f"before: {p}" for p in before_files.problems), *(f"after: {p}" for p in after_files.problems)]
    columns = {schema.KEY: pl.String, schema.SOURCE: pl.String}
    n_parts = partitions_for(max(sum(before_files.shard_rows), sum(after_files.shard_rows)))
    counts = {"before": {}, "after": {}, "gained": {}, "lost": {}}
    lost_examples: dict[str, list[str]] = {}
    gained_examples: dict[str, list[str]] = {}

    def add(side: str, frame: pl.DataFrame) -> None:
        for source, n in frame.group_by(schema.SOURCE).len().iter_rows():
            counts[side][source] = counts[side].get(source, 0) + n

    def keep_first(found: dict[str, list[str]], frame: pl.DataFrame) -> None:
        for (source,), part in frame.partition_by(schema.SOURCE, as_dict=True).items():
            found[source] = sorted([*found.get(source, []), *part[schema.KEY].head(examples).to_list()])[:examples]

    with _spill_directory("pmd-compare-", spill_dir) as tmp:
        sides = {}
        for side, files in (("before", before_files), ("after", after_files)):
            sides[side] = HashPartitions(Path(tmp), side, n_parts, schema.KEY, columns)
            for batch in _batches(files.shards, files.shard_rows, BATCH_ROWS):
                frame = _read(batch, [schema.KEY, schema.SOURCE])
                add(side, frame)
                sides[side].write(frame)
            sides[side].close()
        lost_parts = []
        for i in range(n_parts):
            before, after = sides["before"].frame(i), sides["after"].frame(i)
            lost = before.join(after, on=schema.KEY, how="anti").sort(schema.KEY)
            gained = after.join(before, on=schema.KEY, how="anti").sort(schema.KEY)
            add("lost", lost)
            add("gained", gained)
            keep_first(lost_examples, lost)
            keep_first(gained_examples, gained)
            if lost_keys_to is not None and lost.height:
                path = Path(tmp) / f"lost-{i:05d}.parquet"
                lost.write_parquet(path)
                lost_parts.append(path)
        if lost_keys_to is not None:
            _merge_sorted(lost_parts, Path(lost_keys_to), columns)

    sources = sorted(set(counts["before"]) | set(counts["after"]))
    per_source = {name: {
        "before": counts["before"].get(name, 0),
        "after": counts["after"].get(name, 0),
        "gained": counts["gained"].get(name, 0),
        "lost": counts["lost"].get(name, 0),
        "lost_examples": lost_examples.get(name, []),
        "gained_examples": gained_examples.get(name, []),
    } for name in sources}
    return {
        "before": str(other), "after": str(root),
        "sources": per_source,
        "total": {side: sum(counts[side].values()) for side in ("before", "after", "gained", "lost")},
        "problems": problems,
        "trusted": not problems,
    }


def _merge_sorted(parts: list[Path], out: Path, columns: dict[str, pl.DataType], chunk: int = 8_192) -> None:
    """k-way merge of files sorted by their first column into one sorted Parquet file, a chunk at a time: memory is
    one chunk per file, whatever the number of rows."""

    def rows(path: Path):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk, columns=list(columns)):
            yield from zip(*(batch.column(c).to_pylist() for c in columns))

    arrow_schema = pl.DataFrame(schema=columns).to_arrow().schema
    out.parent.mkdir(parents=True, exist_ok=True)

    def table(buffer: list[tuple]) -> pa.Table:
        return pa.table([list(col) for col in zip(*buffer)] if buffer else [[] for _ in columns], schema=arrow_schema)

    with pq.ParquetWriter(out, arrow_schema) as writer:
        buffer: list[tuple] = []
        for row in heapq.merge(*(rows(p) for p in parts), key=lambda r: (r[0] is not None, r[0] or "")):
            buffer.append(row)
            if len(buffer) == 16 * chunk:
                writer.write_table(table(buffer))
                buffer = []
        if buffer or not parts:
            writer.write_table(table(buffer))
