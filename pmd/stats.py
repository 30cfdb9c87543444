"""Statistics of a build, computed from metadata columns only (never the image bytes) with polars lazy scans.

`audit(out)` returns a plain dict with stable keys (documented in docs/stats.md) so that the terminal table, the
JSON output and the report are three views of one computation. Problems found on the way (a missing or unreadable
shard, a manifest that disagrees with the files, an accounting identity that does not hold) are collected, not
raised: the rest is still reported, and `trusted` says whether the audit can be believed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from pmd import schema
from pmd.catalog import PAPER_AVG_WORDS, PAPER_TOTAL_PAIRS, load_catalog
from pmd.decontaminate import eval_overlap_counts
from pmd.text import word_count_series

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FAILURES_DIR = "failures"
# Ingest and work folders hold candidates, not shards.
_NOT_SHARD_DIRS = {FAILURES_DIR, "candidates", "rejects", "work"}
WORD_BINS = (0, 5, 10, 15, 20, 30, 50)  # histogram edges; the last bin is open
SIDE_BINS = (0, 128, 256, 512, 1024, 2048)  # shorter side of the original image, pixels
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
IMAGE_STAGES = ("read", "download", "decode", "check")
_STAT_TYPES = [pl.String, pl.String, pl.String, pl.String, pl.String, pl.Float32, pl.String, pl.Int32, pl.Int32,
               pl.Int32, pl.Int32]
_STAT_COLUMNS = [schema.KEY, schema.SOURCE, schema.TEXT, schema.SPLIT, schema.LANG, schema.LANG_SCORE,
                 schema.IMAGE_SHA256, schema.WIDTH, schema.HEIGHT, schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT]


class BuildNotFound(FileNotFoundError):
    pass


@dataclass
class BuildFiles:
    """What an audit reads: the manifest (if any), the shards that open, the failures files, and what is wrong."""

    root: Path
    manifest: dict | None
    shards: list[Path] = field(default_factory=list)
    failures: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _is_shard_file(path: Path, root: Path) -> bool:
    rel = path.relative_to(root)
    return not any(part in _NOT_SHARD_DIRS or part.startswith(".") for part in rel.parts[:-1]) \
        and not rel.name.startswith(".")


def locate_build(root: Path) -> BuildFiles:
    """Find and sanity-check a build's files. Never raises for a bad shard: it becomes a problem."""
    root = Path(root)
    if not root.is_dir():
        raise BuildNotFound(f"{root}: no such build directory")
    manifest = None
    problems: list[str] = []
    manifest_path = root / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{manifest_path}: unreadable manifest ({exc})")
    else:
        problems.append(f"{manifest_path}: missing; accounting cannot be checked")

    on_disk = sorted(p for p in root.rglob("*.parquet") if _is_shard_file(p, root))
    listed: dict[Path, dict] = {}
    if manifest is not None:
        for entry in manifest.get("shards", []):
            listed[(root / entry["file"]).resolve()] = entry
        for path, entry in listed.items():
            if not path.exists():
                problems.append(f"{path}: listed in the manifest but missing")
        for path in on_disk:
            if path.resolve() not in listed:
                problems.append(f"{path}: shard on disk but not in the manifest")

    shards: list[Path] = []
    for path in on_disk:
        try:
            with pq.ParquetFile(path) as parquet:  # one footer read for both
                meta, file_schema = parquet.metadata, parquet.schema_arrow
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            problems.append(f"{path}: unreadable Parquet ({exc.__class__.__name__}: {exc})")
            continue
        missing = [c for c in _STAT_COLUMNS if c not in file_schema.names]
        if missing:
            problems.append(f"{path}: not a shard (missing columns {', '.join(missing)})")
            continue
        entry = listed.get(path.resolve())
        if entry is not None and entry.get("rows") != meta.num_rows:
            problems.append(f"{path}: {meta.num_rows} rows, the manifest says {entry.get('rows')}")
        shards.append(path)

    failures = sorted((root / FAILURES_DIR).glob("*.parquet")) if (root / FAILURES_DIR).is_dir() else []
    if not shards:
        problems.append(f"{root}: no readable shards: an empty build")
    return BuildFiles(root, manifest, shards, failures, problems)


_IMAGE_COLUMNS = (schema.WIDTH, schema.HEIGHT, schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT)


def _bin_labels(edges: tuple[int, ...] = WORD_BINS) -> list[tuple[str, int, int | None]]:
    edges = list(edges)
    return [(f"{lo}-{hi - 1}" if hi is not None else f"{lo}+", lo, hi) for lo, hi in zip(edges, edges[1:] + [None])]


def _histogram_exprs(value: pl.Expr, edges: tuple[int, ...], prefix: str) -> list[pl.Expr]:
    out = []
    for label, lo, hi in _bin_labels(edges):
        mask = (value >= lo) if hi is None else ((value >= lo) & (value < hi))
        out.append(mask.sum().alias(f"{prefix}{label}"))
    return out


def _agg_exprs() -> list[pl.Expr]:
    """Every per-group figure as one polars aggregation, so a group is scanned once and groups run in parallel."""
    words = pl.col("words")
    exprs = [
        pl.len().alias("pairs"),
        pl.col(schema.IMAGE_SHA256).n_unique().alias("unique_images"),
        words.mean().alias("w_mean"), words.median().alias("w_median"),
        words.quantile(0.05, "linear").alias("w_p5"), words.quantile(0.95, "linear").alias("w_p95"),
    ]
    exprs += _histogram_exprs(words, WORD_BINS, "h_")
    shorter = pl.min_horizontal(schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT)
    exprs += _histogram_exprs(shorter, SIDE_BINS, "s_")
    for column in (*_IMAGE_COLUMNS, schema.LANG_SCORE):
        exprs.append(pl.col(column).mean().alias(f"{column}_mean"))
        exprs += [pl.col(column).quantile(q, "linear").alias(f"{column}_p{int(q * 100)}") for q in QUANTILES]
    exprs.append(pl.col(schema.LANG).count().alias("lang_rows"))
    return exprs


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


def _empty_row() -> dict:
    return pl.DataFrame(schema={c: t for c, t in zip(_STAT_COLUMNS, _STAT_TYPES)}).with_columns(
        words=pl.lit(0, dtype=pl.UInt32)).select(_agg_exprs()).row(0, named=True)


def _failure_counts(files: list[Path], problems: list[str]) -> pl.DataFrame:
    frames = []
    for path in files:
        try:
            frames.append(pl.scan_parquet(path).select(schema.SOURCE, schema.STAGE, schema.REASON).collect())
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{path}: unreadable failures file ({exc.__class__.__name__}: {exc})")
    if not frames:
        return pl.DataFrame(schema={schema.SOURCE: pl.String, schema.STAGE: pl.String, schema.REASON: pl.String,
                                    "n": pl.UInt32})
    return pl.concat(frames).group_by(schema.SOURCE, schema.STAGE, schema.REASON).len("n")


def audit(root: Path) -> dict:
    """Every figure `pmd stats` shows, for the build in `root`."""
    files = locate_build(Path(root))
    problems = files.problems
    if files.shards:
        frame = pl.scan_parquet(files.shards).select(_STAT_COLUMNS).collect()
    else:
        frame = pl.DataFrame(schema={c: t for c, t in zip(_STAT_COLUMNS, _STAT_TYPES)})
    frame = frame.with_columns(words=word_count_series(frame[schema.TEXT]).cast(pl.UInt32))
    duplicate_keys = frame.height - frame[schema.KEY].n_unique() if frame.height else 0
    if duplicate_keys:
        problems.append(f"{duplicate_keys} keys appear in more than one shard row")

    per_source_rows = {r[schema.SOURCE]: r for r in frame.group_by(schema.SOURCE).agg(_agg_exprs()).iter_rows(named=True)}
    total_row = frame.select(_agg_exprs()).row(0, named=True) if frame.height else _empty_row()
    split_counts = frame.group_by(schema.SOURCE, schema.SPLIT).len("n")
    lang_counts = frame.filter(pl.col(schema.LANG).is_not_null()).group_by(schema.SOURCE, schema.LANG).len("n")

    def counts(table: pl.DataFrame, column: str, source: str | None) -> dict[str, int]:
        if source is not None:
            table = table.filter(pl.col(schema.SOURCE) == source)
        return {k: int(v) for k, v in table.group_by(column).agg(pl.col("n").sum()).iter_rows()}

    failures = _failure_counts(files.failures, problems)
    accounting = (files.manifest or {}).get("accounting", {})
    catalog = {e.name: e for e in load_catalog()}
    sources: dict[str, dict] = {}
    names = sorted(set(frame[schema.SOURCE].unique().to_list()) | set(accounting))
    for name in names:
        row = per_source_rows.get(name) or _empty_row()
        stats = _group_stats(row, counts(split_counts, schema.SPLIT, name), counts(lang_counts, schema.LANG, name))
        src_failures = failures.filter(pl.col(schema.SOURCE) == name)
        stats["failures_by_reason"] = dict(sorted(
            src_failures.group_by(schema.REASON).agg(pl.col("n").sum()).iter_rows()))
        stats["failures_by_stage"] = dict(sorted(
            src_failures.group_by(schema.STAGE).agg(pl.col("n").sum()).iter_rows()))
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
        sources[name] = stats

    total = _group_stats(total_row, counts(split_counts, schema.SPLIT, None), counts(lang_counts, schema.LANG, None))
    total["failures_by_reason"] = dict(sorted(failures.group_by(schema.REASON).agg(pl.col("n").sum()).iter_rows()))
    total["failures_by_stage"] = dict(sorted(failures.group_by(schema.STAGE).agg(pl.col("n").sum()).iter_rows()))
    total["accounting"] = _sum_accounting([s["accounting"] for s in sources.values()])
    total["success"] = _success(total)
    total["table2"] = {"paper_pairs": PAPER_TOTAL_PAIRS, "paper_avg_words": PAPER_AVG_WORDS,
                       "pairs_ratio": total["pairs"] / PAPER_TOTAL_PAIRS,
                       "words_ratio": total["words"]["mean"] / PAPER_AVG_WORDS if total["pairs"] else None,
                       "apportioned": False}

    per_image = frame.group_by(schema.IMAGE_SHA256).agg(pl.len().alias("pairs"),
                                                        pl.col(schema.SOURCE).n_unique().alias("sources"))
    shared = per_image.filter(pl.col("pairs") > 1)
    duplicates = {
        "pairs_dropped": int(failures.filter(pl.col(schema.REASON) == "duplicate")["n"].sum()),
        "images_with_several_captions": shared.height,
        "pairs_on_shared_images": int(shared["pairs"].sum()) if shared.height else 0,
        "images_across_sources": per_image.filter(pl.col("sources") > 1).height,
    }
    return {
        "build": str(Path(root)),
        "schema_version": schema.SCHEMA_VERSION,
        "shards": len(files.shards),
        "failures_files": len(files.failures),
        "sources": sources,
        "total": total,
        "duplicates": duplicates,
        "eval_overlap": eval_overlap_counts(files.failures),  # source -> evaluation set -> pairs removed
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
    out["identity_holds"] = out["input_rows"] == out["pairs"] + out["rejects"] + out["failures"]
    if not out["identity_holds"]:
        problems.append(f"{name}: input rows {out['input_rows']} != pairs {out['pairs']} + rejects "
                        f"{out['rejects']} + failures {out['failures']}")
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
    downloads_failed = by_stage.get("download", 0)
    return {
        "attempted": attempted,
        "image_failures": image_failures,
        "image_success_rate": (stats["pairs"] / attempted) if attempted else None,
        "download_success_rate": ((attempted - downloads_failed) / attempted) if attempted else None,
    }


def compare(root: Path, other: Path, examples: int = 20) -> dict:
    """What changed from build `other` (before) to build `root` (after): keys gained and lost per source."""
    before_files, after_files = locate_build(Path(other)), locate_build(Path(root))
    problems = [*(f"before: {p}" for p in before_files.problems), *(f"after: {p}" for p in after_files.problems)]

    def keys(files: BuildFiles) -> pl.DataFrame:
        if not files.shards:
            return pl.DataFrame(schema={schema.KEY: pl.String, schema.SOURCE: pl.String})
        return pl.scan_parquet(files.shards).select(schema.KEY, schema.SOURCE).collect()

    before, after = keys(before_files), keys(after_files)
    lost = before.join(after, on=schema.KEY, how="anti")
    gained = after.join(before, on=schema.KEY, how="anti")
    sources = sorted(set(before[schema.SOURCE].unique().to_list()) | set(after[schema.SOURCE].unique().to_list()))
    per_source = {}
    for name in sources:
        lost_s = lost.filter(pl.col(schema.SOURCE) == name).sort(schema.KEY)
        gained_s = gained.filter(pl.col(schema.SOURCE) == name).sort(schema.KEY)
        per_source[name] = {
            "before": before.filter(pl.col(schema.SOURCE) == name).height,
            "after": after.filter(pl.col(schema.SOURCE) == name).height,
            "gained": gained_s.height,
            "lost": lost_s.height,
            "lost_examples": lost_s[schema.KEY].head(examples).to_list(),
            "gained_examples": gained_s[schema.KEY].head(examples).to_list(),
        }
    return {
        "before": str(other), "after": str(root),
        "sources": per_source,
        "total": {"before": before.height, "after": after.height, "gained": gained.height, "lost": lost.height},
        "lost_keys": lost.sort(schema.KEY),
        "problems": problems,
        "trusted": not problems,
    }
