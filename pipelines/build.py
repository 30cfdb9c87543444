"""`pmd build`: sources -> candidates -> images -> dedup -> shuffled shards + failures + manifest.

Stages and their unit of resume (docs/build.md, docs/build-format.md):
1. ingest    OUT/work/ingest/SOURCE/ingest.json (reused when inputs and options are unchanged)
2. images    OUT/work/images/SOURCE/chunk-NNNNN.arrow: one Ray task per chunk of `chunk_rows` candidates (URL
             download with img2dataset, or archive members), every image decoded once by pmd.images
3. final     a pure function of the finished chunks, so a killed and resumed build writes the same bytes:
             dedup (metadata only) -> placement by seeded hash -> shards (one task each, skipped when present)
             -> failures -> manifest.json, written last.
The same code runs on the embedded local Ray and on a cluster (`ray_address`); OUT must then be on storage every
node sees under the same path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pmd import schema
from pmd.images import ImageOptions
from pmd.eval_screen import EvalScreenOptions
from pmd.ingest import CANDIDATES_DIR, input_fingerprint, read_summary
from pmd.shards import (FAILURES_DIR, MANIFEST_FILE, MANIFEST_FORMAT, SHARDS_DIR, FileEntry, accounting_problems,
                        describe_file, file_sha256, remove_temp_files, shard_name, sum_counts, write_json_atomic,
                        write_parquet_atomic)
from pmd.download import DownloadOptions
from pipelines.images_stage import (DETAIL, REASON, SHUFFLE_HASH, STAGE, TEXT_HASH, ChunkTask,
                                    chunk_name, read_chunk, run_chunk)
from pipelines.ray_runtime import ray_session

log = logging.getLogger(__name__)

WORK_DIR = "work"
BUILD_STATE = "build.json"  # OUT/work/build.json: the configuration the work files belong to


class BuildError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class SourceSpec:
    """One source of the build. `images` empty: a URL source (downloaded); else archive files holding the images."""

    name: str
    inputs: list[Path]
    images: list[Path] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pmd.sources import adapter_class

        adapter_class(self.name)  # unknown names fail here, before any work
        if isinstance(self.inputs, (str, Path)):
            self.inputs = [self.inputs]
        if isinstance(self.images, (str, Path)):
            self.images = [self.images]
        self.inputs = [Path(p) for p in self.inputs]
        self.images = [Path(p) for p in self.images]
        self.options = {str(k): str(v) for k, v in self.options.items()}
        if not self.inputs:
            raise ValueError(f"source {self.name!r}: no input files")

    @property
    def mode(self) -> str:
        return "archive" if self.images else "url"


@dataclass
class BuildConfig:
    sources: list[SourceSpec]
    out: Path
    shard_rows: int = 10_000
    row_group_rows: int = 1_000
    chunk_rows: int = 2_000
    seed: int = 0
    image: ImageOptions = field(default_factory=ImageOptions)
    download: DownloadOptions = field(default_factory=DownloadOptions)
    executor: str = "ray"  # "ray" | "local" (in-process, for tiny builds and debugging)
    ray_address: str | None = None
    num_cpus: int | None = None  # CPUs of an embedded local Ray (default: all)
    task_cpus: float = 1.0  # CPUs reserved per chunk/shard task
    progress: bool = True
    decontaminate: EvalScreenOptions = field(default_factory=EvalScreenOptions)  # evaluation images kept out

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.sources:
            raise ValueError("a build needs at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"a source is listed twice: {names}")
        for name in ("shard_rows", "row_group_rows", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.executor not in ("ray", "local"):
            raise ValueError(f"executor must be ray or local, not {self.executor!r}")
        if not 0 < self.task_cpus <= 64:
            raise ValueError("task_cpus must be in (0, 64]")

    def to_dict(self) -> dict:
        """The configuration as given (for the manifest): paths as strings."""
        return {
            "sources": [{"name": s.name, "inputs": [str(p) for p in s.inputs], "images": [str(p) for p in s.images],
                         "options": dict(s.options)} for s in self.sources],
            "shard_rows": self.shard_rows, "row_group_rows": self.row_group_rows, "chunk_rows": self.chunk_rows,
            "seed": self.seed, "image": dataclasses.asdict(self.image), "download": dataclasses.asdict(self.download),
            "executor": self.executor, "task_cpus": self.task_cpus, "decontaminate": self.decontaminate.to_dict(),
        }


_TOP_KEYS = {"sources", "out", "shard_rows", "row_group_rows", "chunk_rows", "seed", "image", "download",
             "executor", "ray_address", "num_cpus", "task_cpus", "decontaminate"}
_SOURCE_KEYS = {"name", "inputs", "images", "options"}


def _typed(cls: type, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


def load_config(path: Path, overrides: Mapping[str, Any] | None = None) -> BuildConfig:
    """A build configuration file (TOML, or YAML by extension). Relative paths are relative to the file.

    Unknown keys are errors at every level: a misspelt option must never be silently ignored.
    `overrides` (from the command line) replace top-level keys.
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    elif path.suffix.lower() == ".toml":
        raw = tomllib.loads(text)
    else:
        raise ValueError(f"{path}: config must be .toml, .yaml or .yml")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_TOP_KEYS))}")
    base = path.parent

    def resolve(p: str | Path) -> Path:
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else base / p

    sources = []
    for i, s in enumerate(raw.get("sources") or []):
        if not isinstance(s, dict):
            raise ValueError(f"{path}: sources[{i}] must be a mapping")
        bad = sorted(set(s) - _SOURCE_KEYS)
        if bad:
            raise ValueError(f"{path}: sources[{i}]: unknown key(s) {', '.join(bad)}; known: "
                             f"{', '.join(sorted(_SOURCE_KEYS))}")
        if "name" not in s or "inputs" not in s:
            raise ValueError(f"{path}: sources[{i}] needs `name` and `inputs`")
        inputs = s["inputs"] if isinstance(s["inputs"], list) else [s["inputs"]]
        images = s.get("images") or []
        images = images if isinstance(images, list) else [images]
        sources.append(SourceSpec(s["name"], [resolve(p) for p in inputs], [resolve(p) for p in images],
                                  dict(s.get("options") or {})))
    if "out" not in raw:
        raise ValueError(f"{path}: no output directory (give --out)")
    kwargs = {k: v for k, v in raw.items() if k not in ("sources", "image", "download", "out", "decontaminate")}
    decontaminate = dict(raw.get("decontaminate") or {})
    for key in ("against", "flickr_ids"):
        if key in decontaminate:
            value = decontaminate[key]
            decontaminate[key] = [resolve(p) for p in (value if isinstance(value, list) else [value])]
    return BuildConfig(
        sources=sources, out=Path(raw["out"]),
        image=_typed(ImageOptions, raw.get("image") or {}, f"{path}: [image]"),
        download=_typed(DownloadOptions, raw.get("download") or {}, f"{path}: [download]"),
        decontaminate=_typed(EvalScreenOptions, decontaminate, f"{path}: [decontaminate]"),
        **kwargs,
    )


# ------------------------------------------------------------------------------------------------------ helpers
def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        base = version("pmd")
    except PackageNotFoundError:
        base = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
                               ).stdout.strip()
        return f"{base}+git.{sha}" + (".dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return base


def _fingerprint(config: BuildConfig) -> dict:
    """What the work files depend on. A rerun with a different one must not reuse them."""
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "sources": [{"name": s.name, "inputs": input_fingerprint(s.inputs), "options": s.options,
                     "images": input_fingerprint(s.images)} for s in config.sources],
        "chunk_rows": config.chunk_rows, "shard_rows": config.shard_rows, "row_group_rows": config.row_group_rows,
        "seed": config.seed, "image": dataclasses.asdict(config.image),
        "download": {k: v for k, v in dataclasses.asdict(config.download).items() if k != "thread_count"},
        "decontaminate": {**config.decontaminate.to_dict(),
                          "files": input_fingerprint(config.decontaminate.paths)},
    }


def _check_state(config: BuildConfig) -> None:
    state_path = config.out / WORK_DIR / BUILD_STATE
    fp = _fingerprint(config)
    if state_path.exists():
        old = json.loads(state_path.read_text())
        if old != fp:
            changed = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise BuildError(f"{config.out} holds a build with a different configuration or inputs (changed: "
                             f"{', '.join(changed)}); use another --out, or delete {config.out} to start over")
    else:
        if (config.out / MANIFEST_FILE).exists() or any((config.out / SHARDS_DIR).glob("*.parquet")):
            raise BuildError(f"{config.out} holds shards without {WORK_DIR}/{BUILD_STATE}; refusing to mix builds")
        write_json_atomic(fp, state_path)


def _candidate_batches(source_dir: Path, chunk_rows: int) -> Iterator[pa.Table]:
    """The source's candidates, in part order, re-cut into tables of exactly `chunk_rows` (the last may be short)."""
    parts = sorted((source_dir / CANDIDATES_DIR).glob("part-*.parquet"))
    pending: list[pa.Table] = []
    pending_rows = 0
    for part in parts:
        pf = pq.ParquetFile(part)
        for batch in pf.iter_batches(batch_size=chunk_rows):
            pending.append(pa.Table.from_batches([batch]))
            pending_rows += batch.num_rows
            while pending_rows >= chunk_rows:
                table = pa.concat_tables(pending).combine_chunks()
                yield table.slice(0, chunk_rows)
                rest = table.slice(chunk_rows)
                pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
    if pending_rows:
        yield pa.concat_tables(pending).combine_chunks()


def _run_chunk_with_state(task: ChunkTask, archive_state: object, screens: tuple = (None, None)) -> dict:
    task.archive_state = archive_state
    task.eval_ids, task.eval_index = screens  # shipped once per build (executor.put), not once per task
    return run_chunk(task)


class _Executor:
    """Runs callables in-process or as Ray tasks with a bounded number in flight (constant driver memory)."""

    def __init__(self, config: BuildConfig):
        self.local = config.executor == "local"
        self.task_cpus = config.task_cpus
        self.in_flight: dict = {}
        self.max_in_flight = 1
        if not self.local:
            import ray

            cpus = int(ray.cluster_resources().get("CPU", 1))
            # Two tasks queued per slot keeps every CPU busy while the driver prepares the next chunk.
            self.max_in_flight = max(2, int(2 * cpus / self.task_cpus))
            self._remote: dict = {}

    def put(self, value: object) -> object:
        if self.local:
            return value
        import ray

        return ray.put(value)

    def submit(self, fn: Callable, *args: object, on_done: Callable[[Any], None]) -> None:
        if self.local:
            on_done(fn(*args))
            return
        import ray

        if fn not in self._remote:
            self._remote[fn] = ray.remote(num_cpus=self.task_cpus, max_retries=2)(fn)
        while len(self.in_flight) >= self.max_in_flight:
            self._wait_one()
        self.in_flight[self._remote[fn].remote(*args)] = on_done

    def _wait_one(self) -> None:
        import ray

        ready, _ = ray.wait(list(self.in_flight), num_returns=1)
        for ref in ready:
            self.in_flight.pop(ref)(ray.get(ref))

    def drain(self) -> None:
        while self.in_flight:
            self._wait_one()

    def cancel(self) -> None:
        if not self.local:
            import ray

            for ref in self.in_flight:
                ray.cancel(ref, force=True)
        self.in_flight.clear()


# ------------------------------------------------------------------------------------------------------ stages
def _ingest(config: BuildConfig, spec: SourceSpec) -> dict:
    """The source's ingest summary, reusing OUT/work/ingest/SOURCE when it matches the inputs and options."""
    from pipelines.ingest import IngestConfig, run_ingest

    source_dir = config.out / WORK_DIR / "ingest" / spec.name
    summary = read_summary(source_dir)
    if (summary is not None and summary.get("inputs") == input_fingerprint(spec.inputs)
            and summary.get("options") == spec.options and summary.get("schema_version") == schema.SCHEMA_VERSION):
        log.info("reusing the ingest of %s in %s", spec.name, source_dir)
        return summary
    return run_ingest(IngestConfig(source=spec.name, inputs=spec.inputs, out=source_dir.parent,
                                   options=spec.options, executor="local" if config.executor == "local" else "auto",
                                   ray_address=config.ray_address, num_cpus=config.num_cpus,
                                   progress=config.progress))


def _images(config: BuildConfig, spec: SourceSpec, ingest_summary: dict, executor: _Executor,
            screens: object = (None, None)) -> None:
    """Submit every chunk of the source whose result file is absent."""
    source_dir = config.out / WORK_DIR / "ingest" / spec.name
    chunk_dir = config.out / WORK_DIR / "images" / spec.name
    total = ingest_summary["counts"]["pairs"]
    n_chunks = -(-total // config.chunk_rows)
    done = {i for i in range(n_chunks) if (chunk_dir / chunk_name(i)).exists()}
    bar = tqdm(total=total, desc=f"images {spec.name}", unit=" pairs", unit_scale=True,
               disable=not config.progress)
    bar.update(min(total, len(done) * config.chunk_rows))
    if len(done) == n_chunks:
        bar.close()
        return
    archive_state = None
    if spec.mode == "archive":
        from pmd.archives import ArchiveIndex

        archive_state = executor.put(ArchiveIndex.build(spec.images).to_state())
    options = config.image
    try:
        for index, table in enumerate(_candidate_batches(source_dir, config.chunk_rows)):
            if index in done:
                continue
            task = ChunkTask(source=spec.name, index=index, candidates=table, path=chunk_dir / chunk_name(index),
                             image_options=options, seed=config.seed, mode=spec.mode, download=config.download)
            executor.submit(_run_chunk_with_state, task, archive_state, screens,
                            on_done=lambda r: bar.update(r["rows"]))
        executor.drain()
    finally:
        bar.close()


_PLAN_COLUMNS = [schema.KEY, schema.SOURCE, schema.IMAGE_URL, schema.IMAGE_REF, schema.IMAGE_SHA256, STAGE, REASON,
                 DETAIL, SHUFFLE_HASH, TEXT_HASH]


def _read_plan_inputs(config: BuildConfig, summaries: Mapping[str, dict]) -> pl.DataFrame:
    """Metadata of every candidate after the image stage (never the image bytes), in (source, chunk, row) order."""
    frames = []
    for s_index, spec in enumerate(config.sources):
        chunk_dir = config.out / WORK_DIR / "images" / spec.name
        total = summaries[spec.name]["counts"]["pairs"]
        n_chunks = -(-total // config.chunk_rows)
        rows = 0
        for c in range(n_chunks):
            path = chunk_dir / chunk_name(c)
            if not path.exists():
                raise BuildError(f"{path}: chunk missing after the image stage")
            table = read_chunk(path, _PLAN_COLUMNS)
            rows += table.num_rows
            frames.append(pl.from_arrow(table).with_columns(
                pl.lit(s_index, pl.Int32).alias("source_index"), pl.lit(c, pl.Int32).alias("chunk"),
                pl.int_range(0, pl.len(), dtype=pl.Int32).alias("row")))
        if rows != total:
            raise BuildError(f"{spec.name}: chunks hold {rows} rows, ingest produced {total}")
    if not frames:
        return pl.DataFrame(schema={c: pl.Utf8 for c in _PLAN_COLUMNS})
    return pl.concat(frames, how="vertical_relaxed")


def plan(meta: pl.DataFrame, shard_rows: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(kept rows with their shard and position, failure rows incl. duplicates). Pure: same input, same output.

    Dedup: among rows with an image, the first of each (image_sha256, text) group in (source order, candidate
    order) is kept; the others are `duplicate` failures naming the kept key. Identical images with different
    captions are all kept.
    """
    ok = meta.filter(pl.col(REASON).is_null()).sort(["source_index", "chunk", "row"])
    ok = ok.with_columns(pl.col(schema.KEY).first().over([schema.IMAGE_SHA256, TEXT_HASH]).alias("kept_key"))
    duplicates = ok.filter(pl.col("kept_key") != pl.col(schema.KEY)).with_columns(
        pl.lit("dedup").alias(STAGE), pl.lit("duplicate").alias(REASON),
        (pl.lit("same image and text as ") + pl.col("kept_key")).alias(DETAIL))
    kept = ok.filter(pl.col("kept_key") == pl.col(schema.KEY)).sort([SHUFFLE_HASH, schema.KEY])
    kept = kept.with_columns(pl.int_range(0, pl.len(), dtype=pl.Int64).alias("position"))
    kept = kept.with_columns((pl.col("position") // shard_rows).alias("shard"),
                             (pl.col("position") % shard_rows).alias("shard_row"))
    failures = pl.concat([meta.filter(pl.col(REASON).is_not_null()), duplicates.drop("kept_key")],
                         how="vertical_relaxed").sort(["source_index", "chunk", "row"])
    return kept, failures


def write_shard(out: str, index: int, pieces: list[tuple[str, list[int], list[int]]], row_group_rows: int) -> dict:
    """Gather a shard's rows from memory-mapped chunk files and write it atomically.

    `pieces`: (chunk file, rows in it, their positions in the shard). Each chunk file is opened once and only the
    pages of the rows taken are read; the rows are then put in placement order.
    """
    started = time.perf_counter()
    tables, positions = [], []
    for chunk_path, rows, where in pieces:
        tables.append(read_chunk(Path(chunk_path)).take(pa.array(rows, pa.int64())).select(schema.SHARD_COLUMNS))
        positions.extend(where)
    if tables:
        table = pa.concat_tables(tables)
        order = sorted(range(len(positions)), key=positions.__getitem__)
        table = table.take(pa.array(order, pa.int64())).combine_chunks()
    else:
        table = schema.SHARD_SCHEMA.empty_table()
    table = table.cast(schema.SHARD_SCHEMA)
    rel = shard_name(index)
    write_parquet_atomic(table, Path(out) / rel, row_group_rows)
    entry = describe_file(Path(out), rel)
    return {**entry.to_dict(), "seconds": time.perf_counter() - started}


def _shard_pieces(kept: pl.DataFrame, config: BuildConfig) -> dict[int, list[tuple[str, list[int], list[int]]]]:
    """shard -> [(chunk file, rows, positions in the shard)], one entry per chunk file the shard draws from."""
    names = [s.name for s in config.sources]
    grouped = (kept.group_by("shard", "source_index", "chunk", maintain_order=True)
               .agg(pl.col("row"), pl.col("shard_row")).sort("shard", "source_index", "chunk"))
    result: dict[int, list[tuple[str, list[int], list[int]]]] = {}
    for shard, s_index, chunk, rows, where in grouped.iter_rows():
        path = str(config.out / WORK_DIR / "images" / names[s_index] / chunk_name(chunk))
        result.setdefault(shard, []).append((path, rows, where))
    return result


def _write_failures(config: BuildConfig, failures: pl.DataFrame) -> list[FileEntry]:
    entries = []
    for spec in config.sources:
        rel = f"{FAILURES_DIR}/{spec.name}.parquet"
        rows = failures.filter(pl.col(schema.SOURCE) == spec.name).select(schema.FAILURE_SCHEMA.names)
        table = rows.to_arrow().cast(schema.FAILURE_SCHEMA) if rows.height else schema.FAILURE_SCHEMA.empty_table()
        write_parquet_atomic(table, config.out / rel, row_group_rows=100_000)
        entries.append(describe_file(config.out, rel))
    return entries


def _accounting(config: BuildConfig, summaries: Mapping[str, dict], kept: pl.DataFrame,
                failures: pl.DataFrame) -> tuple[dict, dict]:
    accounting = {}
    for spec in config.sources:
        counts = summaries[spec.name]["counts"]
        mine = kept.filter(pl.col(schema.SOURCE) == spec.name)
        fails = failures.filter(pl.col(schema.SOURCE) == spec.name)
        accounting[spec.name] = {
            "input_rows": counts["pairs"] + counts["rejects"],
            "pairs": mine.height,
            "rejects": counts["rejects"],
            "failures": fails.height,
            "rejects_by_reason": dict(sorted(counts["rejects_by_reason"].items())),
            "failures_by_reason": dict(sorted(Counter(fails.get_column(REASON).to_list()).items())),
            "unique_images": mine.get_column(schema.IMAGE_SHA256).n_unique() if mine.height else 0,
        }
    totals = {k: sum(a[k] for a in accounting.values()) for k in ("input_rows", "pairs", "rejects", "failures")}
    totals["unique_images"] = kept.get_column(schema.IMAGE_SHA256).n_unique() if kept.height else 0
    totals["failures_by_reason"] = sum_counts(a["failures_by_reason"] for a in accounting.values())
    return accounting, totals


def _source_entry(spec: SourceSpec, summary: dict) -> dict:
    return {
        "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
                   for p in spec.inputs],
        "images": "url" if spec.mode == "url" else "archive",
        "archives": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in spec.images],
        "options": dict(spec.options),
        "ingest": summary["counts"],
    }


# --------------------------------------------------------------------------------------------------------- run
def run_build(config: BuildConfig) -> dict:
    """Build (or resume) the corpus in config.out; returns the manifest, also written to OUT/manifest.json."""
    started = time.perf_counter()
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    for spec in config.sources:
        for p in [*spec.inputs, *spec.images]:
            if not p.exists():
                raise BuildError(f"{spec.name}: input {p} does not exist")
    for p in config.decontaminate.paths:
        if not p.exists():
            raise BuildError(f"decontamination input {p} does not exist")
    _check_state(config)
    for d in (SHARDS_DIR, FAILURES_DIR, WORK_DIR):
        remove_temp_files(out / d)
    shutil.rmtree(out / WORK_DIR / "tmp", ignore_errors=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # present only once this run has finished

    timings: dict[str, float] = {}
    t = time.perf_counter()
    summaries = {spec.name: _ingest(config, spec) for spec in config.sources}
    timings["ingest_s"] = time.perf_counter() - t

    if config.executor == "local":
        manifest = _images_and_final(config, summaries, _Executor(config), timings)
    else:
        with ray_session(config.ray_address, config.num_cpus):
            executor = _Executor(config)
            try:
                manifest = _images_and_final(config, summaries, executor, timings)
            except BaseException:
                executor.cancel()
                raise
    shutil.rmtree(out / WORK_DIR / "tmp", ignore_errors=True)
    manifest["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    write_json_atomic(manifest, out / MANIFEST_FILE)  # last: its presence means the build is complete
    log.info("built %s: %d pairs in %d shards", out, manifest["totals"]["pairs"], len(manifest["shards"]))
    return manifest


def _images_and_final(config: BuildConfig, summaries: dict, executor: _Executor, timings: dict) -> dict:
    t = time.perf_counter()
    screens = executor.put(config.decontaminate.load())  # evaluation photo ids and pHashes, once for every source
    for spec in config.sources:
        _images(config, spec, summaries[spec.name], executor, screens)
    timings["images_s"] = time.perf_counter() - t

    t = time.perf_counter()
    meta = _read_plan_inputs(config, summaries)
    kept, failures = plan(meta, config.shard_rows)
    timings["plan_s"] = time.perf_counter() - t

    accounting, totals = _accounting(config, summaries, kept, failures)
    problems = accounting_problems(accounting)
    if problems:
        raise BuildError("accounting does not add up: " + "; ".join(problems))

    t = time.perf_counter()
    pieces = _shard_pieces(kept, config)
    n_shards = -(-kept.height // config.shard_rows)
    entries: dict[int, dict] = {}
    written_rows = written_bytes = 0
    bar = tqdm(total=n_shards, desc="shards", unit=" shards", disable=not config.progress)

    def done(entry: dict) -> None:
        nonlocal written_rows, written_bytes
        entries[int(entry["file"].split("-")[-1].split(".")[0])] = entry
        written_rows += entry["rows"]
        written_bytes += entry["bytes"]
        bar.update(1)

    try:
        for i in range(n_shards):
            rel = shard_name(i)
            if (config.out / rel).exists():
                entries[i] = describe_file(config.out, rel).to_dict()
                bar.update(1)
                continue
            executor.submit(write_shard, str(config.out), i, pieces[i], config.row_group_rows, on_done=done)
        executor.drain()
    finally:
        bar.close()
    shard_s = time.perf_counter() - t
    timings["shards_s"] = shard_s
    failure_entries = _write_failures(config, failures)
    planned = dict(kept.group_by("shard").len().iter_rows())
    for i, entry in entries.items():
        entry.pop("seconds", None)
        expected = planned.get(i, 0)
        if entry["rows"] != expected:
            raise BuildError(f"{entry['file']}: {entry['rows']} rows on disk, the plan places {expected}; it comes "
                             "from another build: delete it and rerun")

    return {
        "format": MANIFEST_FORMAT,
        "schema_version": schema.SCHEMA_VERSION,
        "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config.to_dict(),
        "sources": {spec.name: _source_entry(spec, summaries[spec.name]) for spec in config.sources},
        "shards": [entries[i] for i in range(n_shards)],
        "failures": [e.to_dict() for e in failure_entries],
        "accounting": accounting,
        "totals": totals,
        "timings": {**{k: round(v, 3) for k, v in timings.items()},
                    "shard_rows_per_s": round(written_rows / shard_s, 1) if written_rows and shard_s else None,
                    "shard_mb_per_s": round(written_bytes / 1e6 / shard_s, 2) if written_bytes and shard_s else None},
    }
