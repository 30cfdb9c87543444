"""`pmd build`: sources -> candidates -> images -> dedup -> shuffled shards + failures + manifest.

This module schedules and collects; the work is library code (pmd.build: one chunk's images; pmd.final: the final
phase). Stages and their unit of resume (docs/build.md, docs/build-format.md):
1. ingest    OUT/work/ingest/SOURCE/ingest.json (reused when inputs and options are unchanged)
2. images    OUT/work/images/SOURCE/chunk-NNNNN.arrow: one Ray task per chunk of `chunk_rows` candidates
3. final     pmd.final's passes as Ray tasks over groups of chunks and buckets of images (scatter, dedup, write,
             merge, failures), each with a marker; then manifest.json, written last.
The driver holds counts, file names and one small summary per group and bucket, never a row per candidate.
The same code runs on the embedded local Ray and on a cluster (`ray_address`); OUT and the work state (`work`,
default OUT/work) are then on storage every node sees: object storage (`s3://...`, pmd.storage), where every work
file is an object written once under its final name, or a shared mount. A node's local disk holds only one task's
scratch. A task lost with its node is run again by Ray (`TASK_RETRIES`); every task is idempotent (outputs written
whole under deterministic names, markers last), so a retried or resumed task writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import subprocess
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pmd import atomic, card, final, schema, storage, takedown, urls
from pmd import plan as pmd_plan
from pmd.layout import OutLayout, WorkLayout
from pmd.build import ChunkTask, read_chunk, run_chunk
from pmd.config_loader import ConfigError, Where, apply_overrides, from_dict
from pmd.download import DownloadOptions
from pmd.eval_screen import EvalScreenOptions
from pmd.images import ImageOptions
from pmd.ingest import CANDIDATES_DIR, input_fingerprint, manifest_input, read_summary
from pmd.manifest import FAILURES_DIR, MANIFEST_FORMAT, SHARDS_DIR, Manifest, accounting_problems, manifest_path
from pmd.shards import shard_name
from pipelines.politeness import budget_service
from pipelines.ray_runtime import TASK_RETRIES, ray_session, resolve_address

log = logging.getLogger(__name__)

WORK_DIR = final.WORK_DIR
# A URL pass over at most this many URL rows runs in the driver while Ray starts (`_driver_side_start`): at 10,000
# rows its ~0.4 s there are hidden behind Ray's start, where three rounds of Ray tasks after it cost ~0.6 s; far
# above, Ray's parallelism wins.
LOCAL_URL_PASS_ROWS = 100_000
EXECUTORS = ("auto", "ray", "pool", "local")
# executor "auto": a build of at most this many candidates (after ingest; no `ray_address`) runs on the "pool"
# executor, a larger one on Ray. PLACEHOLDER
POOL_MAX_CANDIDATES = 100_000


class BuildError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class SourceSpec:
    """One source of the build. `images` empty: a URL source (downloaded); else archive files holding the images."""

    name: str
    inputs: list[Path | str]  # local paths or URLs on object storage (pmd.storage.location)
    images: list[Path | str] = field(default_factory=list)
    options: dict[str, str | int | float | bool] = field(default_factory=dict)  # strings once built

    def __post_init__(self) -> None:
        from pmd.sources import adapter_class

        adapter_class(self.name)  # unknown names fail here, before any work
        if isinstance(self.inputs, (str, Path)):
            self.inputs = [self.inputs]
        if isinstance(self.images, (str, Path)):
            self.images = [self.images]
        self.inputs = [storage.location(p) for p in self.inputs]
        self.images = [storage.location(p) for p in self.images]
        self.options = {str(k): str(v) for k, v in self.options.items()}
        if not self.inputs:
            raise ValueError(f"source {self.name!r}: no input files")

    @property
    def mode(self) -> str:
        return "archive" if self.images else "url"


@dataclass
class BuildConfig:
    sources: list[SourceSpec]
    out: Path | str  # a local directory, or a URL on object storage (kept as a string)
    shard_rows: int = 10_000
    row_group_rows: int = 1_000
    chunk_rows: int = 2_000
    seed: int = 0
    image: ImageOptions = field(default_factory=ImageOptions)
    download: DownloadOptions = field(default_factory=DownloadOptions)
    # "auto": "pool" up to POOL_MAX_CANDIDATES candidates without `ray_address`, else "ray"; "pool": a process pool
    # of this machine (no Ray); "local": in-process, one task at a time (debugging)
    executor: str = "auto"
    ray_address: str | None = None
    num_cpus: int | None = None  # CPUs of an embedded local Ray or of the pool (default: all)
    task_cpus: float = 1.0  # CPUs reserved per chunk/shard task
    # download again the rows whose last failure is transient (pmd.http_client.is_transient)
    retry_failures: bool = False
    progress: bool = True
    decontaminate: EvalScreenOptions = field(default_factory=EvalScreenOptions)  # evaluation images kept out
    work: Path | str | None = None  # the work state: a directory or a URL (default OUT/work, default_work_dir)

    def __post_init__(self) -> None:
        self.out = storage.location(self.out)
        if self.work is None:
            self.work = default_work_dir(self.out)
        self.work = storage.as_path(self.work)
        if not self.sources:
            raise ValueError("a build needs at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"a source is listed twice: {names}")
        for name in ("shard_rows", "row_group_rows", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, not {self.executor!r}")
        if not 0 < self.task_cpus <= 64:
            raise ValueError("task_cpus must be in (0, 64]")

    @property
    def dirs(self) -> final.BuildDirs:
        return final.BuildDirs(str(self.out), str(self.work))

    def to_dict(self) -> dict:
        """The configuration as given (for the manifest): paths as strings."""
        return {
            "sources": [{"name": s.name, "inputs": [str(p) for p in s.inputs], "images": [str(p) for p in s.images],
                         "options": dict(s.options)} for s in self.sources],
            "shard_rows": self.shard_rows, "row_group_rows": self.row_group_rows, "chunk_rows": self.chunk_rows,
            "seed": self.seed, "image": dataclasses.asdict(self.image), "download": self.download.to_dict(),
            "executor": self.executor, "task_cpus": self.task_cpus, "retry_failures": self.retry_failures,
            "decontaminate": self.decontaminate.to_dict(),
        }


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> BuildConfig:
    """A build configuration file (TOML, or YAML by extension) with `overrides` laid on it (pmd.config_loader).

    Relative paths in the file are relative to the file; `overrides` come from the command line (dotted keys:
    `shard_rows`, `image.image_size`, `decontaminate.against`; None = not given) and their paths stay as given.
    Without a file the overrides are the whole configuration (`pmd build SOURCE INPUT...`). Unknown keys are
    errors at every level: a misspelt option must never be silently ignored.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif path.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        else:
            raise ConfigError(f"{path}: config must be .toml, .yaml or .yml")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        _resolve_paths(raw, path.parent)
    raw = apply_overrides(raw, overrides)
    return from_dict(BuildConfig, raw, Where("command line" if path is None else str(path)))


def _resolve_paths(raw: dict, base: Path) -> None:
    """The file's input, image and evaluation paths made relative to the file (in place, before validation)."""
    def resolve(p):
        if not isinstance(p, (str, Path)) or storage.is_remote(p):
            return p  # left for the loader to refuse; a URL is absolute
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else base / p

    def each(value):
        return [resolve(p) for p in value] if isinstance(value, list) else resolve(value)

    sources = raw.get("sources")
    for s in sources if isinstance(sources, list) else []:
        if isinstance(s, dict):
            for key in ("images", "options"):  # an empty YAML key: none
                if key in s and s[key] is None:
                    del s[key]
            for key in ("inputs", "images"):
                if key in s:
                    s[key] = each(s[key])
    decontaminate = raw.get("decontaminate")
    if isinstance(decontaminate, dict):
        for key in ("against", "flickr_ids"):
            if key in decontaminate:
                decontaminate[key] = each(decontaminate[key])


def config_to_toml(config: BuildConfig) -> str:
    """The configuration as a TOML file that `load_config` reads back to an equal BuildConfig (paths absolute).

    Only the keys a config file may hold are written (`progress` belongs to the command line). TOML has no null:
    a field left None is left out, which is its default for every field whose default is None; any other None
    cannot be written and is an error.
    """
    import tomli_w

    def plain(value: Any, where: str) -> Any:
        if dataclasses.is_dataclass(value):
            out = {}
            for f in dataclasses.fields(value):
                v = getattr(value, f.name)
                if v is None:
                    if f.default is not None:
                        raise ValueError(f"{where}{f.name} is None, which a TOML build config cannot express")
                    continue
                out[f.name] = plain(v, f"{where}{f.name}.")
            return out
        if isinstance(value, Path):
            return str(value.absolute())
        if isinstance(value, (list, tuple)):
            return [plain(v, where) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v, where) for k, v in value.items()}
        return value

    table = plain(config, "")
    for source in table["sources"]:
        if not source["options"]:
            del source["options"]
    return tomli_w.dumps({k: v for k, v in table.items() if k != "progress"})


def default_work_dir(out: Path | str) -> storage.WorkPath:
    """OUT/work, on the store OUT is on: a local directory, or a prefix beside the corpus on object storage, so
    that every node of a cluster sees it and rerunning the same command finds it and resumes. Nothing of it is
    kept on a node's own disk."""
    return storage.as_path(storage.join(out, WORK_DIR))


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


def _check_state(config: BuildConfig) -> None:
    work = WorkLayout.of(config.work)
    state_path = work.build_state
    fp = pmd_plan.fingerprint(config)
    old = pmd_plan.recorded_fingerprint(work)
    if old is not None:
        changed = pmd_plan.configuration_changes(old, fp)
        if changed:
            raise BuildError(f"{config.out} holds a build with a different configuration or inputs (changed: "
                             f"{', '.join(changed)}); use another --out, or delete {config.out} to start over")
    else:
        if Manifest.exists(config.out) or storage.list_files(storage.join(config.out, SHARDS_DIR), ".parquet"):
            raise BuildError(f"{config.out} holds shards without {state_path}; refusing to mix builds")
        atomic.write_json(fp, state_path)


def _candidate_batches(source_dir: Path, chunk_rows: int) -> Iterator[pa.Table]:
    """The source's candidates, in part order, re-cut into tables of exactly `chunk_rows` (the last may be short)."""
    parts = sorted((source_dir / CANDIDATES_DIR).glob("part-*.parquet"))
    pending: list[pa.Table] = []
    pending_rows = 0
    for part in parts:
        pf = pq.ParquetFile(storage.open_input(part))
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


def _chunk_done(task: ChunkTask) -> dict | None:
    """The summary of a chunk already written: a task re-run by Ray after its node died, having finished there."""
    if not task.path.exists():
        return None
    reasons = Counter(r for r in read_chunk(task.path, [schema.REASON]).column(schema.REASON).to_pylist() if r)
    rows = read_chunk(task.path, [schema.KEY]).num_rows
    return {"source": task.source, "index": task.index, "rows": rows, "ok": rows - sum(reasons.values()),
            "failures_by_reason": dict(reasons)}


def _run_chunk_with_state(task: ChunkTask, archive_state: object, screens: tuple = (None, None)) -> dict:
    done = _chunk_done(task)
    if done is not None:
        return done
    task.archive_state = archive_state
    task.eval_ids, task.eval_index = screens  # shipped once per build (executor.put), not once per task
    return run_chunk(task)


def _run_url_chunk(task: ChunkTask, candidates: str, screens: tuple = (None, None)) -> dict:
    """A URL chunk: its rows as regrouped by pmd.urls (own rows whose URL it fetches first, and later rows of any
    source naming those URLs); the input file goes once the chunk's result is durable."""
    result = _chunk_done(task)
    if result is None:
        task.candidates = read_chunk(storage.as_path(candidates))
        task.eval_ids, task.eval_index = screens
        result = run_chunk(task)
    storage.delete(candidates)
    return result


def _retry_group_with_state(out: str, source: str, group: int, attempt: int, task: ChunkTask,
                            layout: final.Layout, source_names: list[str], archive_state: object,
                            screens: tuple = (None, None)) -> dict:
    task.archive_state = archive_state
    task.eval_ids, task.eval_index = screens
    return final.retry_group(out, source, group, attempt, task, layout, source_names)


class _Executor:
    """Runs callables as Ray tasks, in a pool of worker processes on this machine ("pool"), or in-process one at a
    time ("local"), with a bounded number in flight (constant driver memory). `on_done` runs in the driver thread."""

    def __init__(self, config: BuildConfig):
        self.local = config.executor == "local"
        self.task_cpus = config.task_cpus
        self.in_flight: dict = {}
        self.max_in_flight = 1
        self.pool: futures.ProcessPoolExecutor | None = None
        if config.executor == "pool":
            # Processes, not threads: a chunk's decode/resize/encode release the GIL but its download client and
            # row handling do not; 2 threads in one process took 8.7 s for the image stage of 10,000 images where
            # two Ray workers took 6.8 s (docs/benchmarks.md). Spawned (not forked: the driver has threads), each
            # importing the task modules once at start while the driver ingests.
            workers = pool_workers(config)
            self.pool = futures.ProcessPoolExecutor(max_workers=workers, initializer=_import_task_modules,
                                                    mp_context=multiprocessing.get_context("spawn"))
            self.max_in_flight = 2 * workers  # as for Ray: one queued per worker while the driver prepares the next
            self.pool.submit(int)  # launches every worker now
        elif not self.local:
            import ray

            cpus = int(ray.cluster_resources().get("CPU", 1))
            # Two tasks queued per slot keeps every CPU busy while the driver prepares the next chunk.
            self.max_in_flight = max(2, int(2 * cpus / self.task_cpus))
            self._remote: dict = {}

    def put(self, value: object) -> object:
        if self.local or self.pool is not None:
            return value
        import ray

        return ray.put(value)

    def submit(self, fn: Callable, *args: object, on_done: Callable[[Any], None] = lambda _: None,
               limit: int | None = None) -> None:
        """Run fn(*args); `limit` caps the tasks in flight below the executor's own cap (disk-bound passes)."""
        if self.local:
            on_done(fn(*args))
            return
        cap = min(self.max_in_flight, limit) if limit else self.max_in_flight
        while len(self.in_flight) >= max(1, cap):
            self._wait_one()
        if self.pool is not None:
            self.in_flight[self.pool.submit(fn, *args)] = on_done
            return
        import ray

        if fn not in self._remote:
            self._remote[fn] = ray.remote(num_cpus=self.task_cpus, max_retries=TASK_RETRIES)(fn)
        self.in_flight[self._remote[fn].remote(*args)] = on_done

    def _wait_one(self) -> None:
        if self.pool is not None:
            done, _ = futures.wait(list(self.in_flight), return_when=futures.FIRST_COMPLETED)
            for future in done:
                try:
                    result = future.result()
                except BrokenProcessPool as e:
                    # Unlike Ray, the pool does not re-run a task whose process died; the finished work stays.
                    raise BuildError(f"a worker process of the pool died ({e}); rerun the same command to resume, "
                                     "or use --executor ray, which re-runs lost tasks") from e
                self.in_flight.pop(future)(result)
            return
        import ray

        ready, _ = ray.wait(list(self.in_flight), num_returns=1)
        for ref in ready:
            self.in_flight.pop(ref)(ray.get(ref))

    def drain(self) -> None:
        while self.in_flight:
            self._wait_one()

    def cancel(self) -> None:
        if self.pool is not None:
            for future in self.in_flight:
                future.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)  # running tasks finish: their outputs stay whole
        elif not self.local:
            import ray

            for ref in self.in_flight:
                ray.cancel(ref, force=True)
        self.in_flight.clear()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _import_task_modules() -> None:
    """A pool worker's start: this module and with it every task function's (pmd.build, final, urls; pyarrow)."""
    import importlib

    importlib.import_module(__name__)


def pool_workers(config: BuildConfig) -> int:
    """Tasks the "pool" executor runs at once: the CPUs given (`num_cpus`, default this machine's) over `task_cpus`."""
    return max(1, int((config.num_cpus or os.cpu_count() or 1) / config.task_cpus))


# ------------------------------------------------------------------------------------------------------ stages
def _ingest(config: BuildConfig, spec: SourceSpec) -> dict:
    """The source's ingest summary, reusing OUT/work/ingest/SOURCE when it matches the inputs and options."""
    from pipelines.ingest import run_ingest

    summary = _reusable_ingest(config, spec)
    if summary is not None:
        log.info("reusing the ingest of %s in %s", spec.name, config.work / "ingest" / spec.name)
        return summary
    return run_ingest(_ingest_config(config, spec))


def _reusable_ingest(config: BuildConfig, spec: SourceSpec) -> dict | None:
    summary = read_summary(config.work / "ingest" / spec.name)
    if (summary is not None and summary.get("inputs") == input_fingerprint(spec.inputs)
            and summary.get("options") == spec.options and summary.get("schema_version") == schema.SCHEMA_VERSION
            and summary.get("candidate_columns") == list(schema.CANDIDATE_SCHEMA.names)):
        return summary
    return None


def _ingest_config(config: BuildConfig, spec: SourceSpec):  # -> pipelines.ingest.IngestConfig
    from pipelines.ingest import IngestConfig

    return IngestConfig(source=spec.name, inputs=spec.inputs, out=config.work / "ingest",
                        options=spec.options, executor="local" if config.executor in ("local", "pool") else "auto",
                        ray_address=config.ray_address, num_cpus=config.num_cpus, progress=config.progress)


def _ingest_all(config: BuildConfig, timings: dict) -> dict[str, dict]:
    t = time.perf_counter()
    summaries = {spec.name: _ingest(config, spec) for spec in config.sources}
    timings["ingest_s"] = time.perf_counter() - t
    return summaries


def _ingests_in_driver(config: BuildConfig) -> bool:
    """Whether every source's ingest runs in this process (reused, or small enough for the local executor)."""
    return all(_reusable_ingest(config, spec) is not None or _ingest_config(config, spec).choose_executor() == "local"
               for spec in config.sources)


@dataclass
class _Plan:
    """What the driver knows about the build: a few integers per source, group and bucket."""

    config: BuildConfig
    summaries: dict[str, dict]
    layout: final.Layout
    takedowns: takedown.TakedownFilter = field(default_factory=takedown.TakedownFilter)  # recorded requests
    takedowns_ref: object = None  # the same, as the executor passes it to tasks

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.config.sources]

    def n_chunks(self, spec: SourceSpec) -> int:
        return -(-self.summaries[spec.name]["counts"]["pairs"] // self.config.chunk_rows)

    def groups(self, spec: SourceSpec) -> list[range]:
        return final.group_ranges(self.layout, self.n_chunks(spec))

    def chunk_path(self, spec: SourceSpec, index: int) -> storage.WorkPath:
        return WorkLayout.of(self.config.work).chunk(spec.name, index)

    @property
    def paths(self) -> final.FinalPaths:
        return self.config.dirs.paths

    @property
    def in_flight_groups(self) -> int:
        n = sum(len(self.groups(s)) for s in self.config.sources)
        return max(1, int(final.IN_FLIGHT_SHARE * n))

    @property
    def in_flight_buckets(self) -> int:
        return max(1, int(final.IN_FLIGHT_SHARE * self.layout.n_buckets))


def _archive_state(spec: SourceSpec, executor: _Executor, work: Path | str | None = None) -> object:
    if spec.mode != "archive":
        return None
    from pmd.archives import ARCHIVE_INDEX_DIR, ArchiveIndex

    # Remote archives' member lists are kept beside the work state: a tar's index costs one ranged read per member.
    cache = storage.join(work, ARCHIVE_INDEX_DIR) if work is not None else None
    return executor.put(ArchiveIndex.build(spec.images, cache=cache).to_state())


def _url_pass(plan: _Plan, executor: _Executor) -> dict[str, dict[str, int]]:
    """pmd.urls' three passes over the URL sources; returns {source: {urls, unique_urls}}."""
    config = plan.config
    specs = [(i, s) for i, s in enumerate(config.sources) if s.mode == "url"]
    if not specs:
        return {}
    out = config.dirs
    n_buckets = urls.n_url_buckets(sum(plan.summaries[s.name]["counts"]["pairs"] for _, s in specs))
    paths = urls.UrlPaths(out)
    if not all(paths.owners_marker(u).exists() for u in range(n_buckets)):
        for s_index, spec in specs:
            pairs = plan.summaries[spec.name]["counts"]["pairs"]
            cand_dir = str(config.work / "ingest" / spec.name / CANDIDATES_DIR)
            for g, chunks in enumerate(plan.groups(spec)):
                if not paths.chunks_marker(s_index, g).exists():
                    executor.submit(urls.split_group, out, cand_dir, s_index, g, chunks.start * config.chunk_rows,
                                    min(chunks.stop * config.chunk_rows, pairs), n_buckets)
        executor.drain()
    counts: dict[str, Counter] = {s.name: Counter() for _, s in specs}

    def add(summary: dict) -> None:
        for name, c in summary["downloads"].items():
            counts[name].update(c)

    for u in range(n_buckets):
        executor.submit(urls.owners_bucket, out, u, config.chunk_rows, plan.layout.chunks_per_group, plan.names,
                        on_done=add)
    executor.drain()
    for s_index, spec in specs:
        for g, chunks in enumerate(plan.groups(spec)):
            if not plan.paths.group_marker(spec.name, g).exists():
                executor.submit(urls.chunks_group, out, spec.name, s_index, g, list(chunks))
    executor.drain()
    return {name: dict(c) for name, c in counts.items()}


def _images(plan: _Plan, s_index: int, spec: SourceSpec, executor: _Executor, screens: object = (None, None)
            ) -> None:
    """Submit every chunk of the source not yet done (its file exists, or its group was already scattered)."""
    config = plan.config
    source_dir = config.work / "ingest" / spec.name
    total = plan.summaries[spec.name]["counts"]["pairs"]
    n_chunks = plan.n_chunks(spec)
    done = pmd_plan.done_chunks(WorkLayout.of(config.work), spec.name, n_chunks, plan.groups(spec))
    bar = tqdm(total=total, desc=f"images {spec.name}", unit=" pairs", unit_scale=True,
               disable=not config.progress)
    bar.update(min(total, len(done) * config.chunk_rows))
    if len(done) == n_chunks:
        bar.close()
        return

    def task(index: int, table: pa.Table) -> ChunkTask:
        return ChunkTask(source=spec.name, index=index, candidates=table, path=plan.chunk_path(spec, index),
                         image_options=config.image, seed=config.seed, mode=spec.mode, download=config.download,
                         source_index=s_index, first_candidate=index * config.chunk_rows)

    try:
        if spec.mode == "url":
            url_paths = urls.UrlPaths(config.dirs)
            for index in range(n_chunks):
                if index not in done:
                    executor.submit(_run_url_chunk, task(index, pa.table({})), str(url_paths.chunk(spec.name, index)),
                                    screens, on_done=lambda r: bar.update(r["rows"]))
        else:
            archive_state = _archive_state(spec, executor, config.work)
            for index, table in enumerate(_candidate_batches(source_dir, config.chunk_rows)):
                if index not in done:
                    executor.submit(_run_chunk_with_state, task(index, table), archive_state, screens,
                                    on_done=lambda r: bar.update(r["rows"]))
        executor.drain()
    finally:
        bar.close()


def _scatter(plan: _Plan, executor: _Executor) -> list[dict]:
    """Pass A over every group; returns the group markers (a few numbers each)."""
    markers: list[dict] = []
    for s_index, spec in enumerate(plan.config.sources):
        for g, chunks in enumerate(plan.groups(spec)):
            marker = plan.paths.group_marker(spec.name, g)
            paths = [str(plan.chunk_path(spec, i)) for i in chunks]
            if not marker.exists():
                missing = [p for p in paths if not storage.exists(p)]
                if missing:
                    raise BuildError(f"{missing[0]}: chunk missing after the image stage")
            executor.submit(final.scatter_group, plan.config.dirs, spec.name, s_index, g, paths, plan.layout,
                            plan.names, on_done=markers.append, limit=plan.in_flight_groups)
    executor.drain()
    return markers


def _dedup(plan: _Plan, executor: _Executor) -> list[dict]:
    summaries: list[dict] = []
    for b in range(plan.layout.n_buckets):
        executor.submit(final.dedup_bucket, plan.config.dirs, b, plan.names, plan.takedowns_ref,
                        plan.config.download.placeholder_min_urls, on_done=summaries.append)
    executor.drain()
    return sorted(summaries, key=lambda s: s["bucket"])


def _offsets(buckets: list[dict]) -> list[int]:
    offsets, position = [], 0
    for b in buckets:
        offsets.append(position)
        position += b["kept"]
    return offsets


def _write(plan: _Plan, executor: _Executor, buckets: list[dict]) -> int:
    """Passes B2 and merge: every shard on disk; returns the number of shards."""
    out = plan.config.dirs
    offsets = _offsets(buckets)
    total = sum(b["kept"] for b in buckets)
    n_shards = -(-total // plan.layout.shard_rows)
    bar = tqdm(total=n_shards, desc="shards", unit=" shards", disable=not plan.config.progress)
    try:
        for b, offset in zip(range(plan.layout.n_buckets), offsets):
            executor.submit(final.write_bucket, out, b, offset, total, plan.layout, plan.takedowns_ref,
                            plan.config.download.placeholder_min_urls,
                            on_done=lambda r: bar.update(len(r["shards"])), limit=plan.in_flight_buckets)
        executor.drain()
        for shard in range(n_shards):
            if not (plan.paths.entry(shard).exists() and storage.exists(out.output(shard_name(shard)))):
                executor.submit(final.merge_shard, out, shard, plan.layout.row_group_rows,
                                on_done=lambda _: bar.update(1))
        executor.drain()
    finally:
        bar.close()
    return n_shards


def _unbuild(plan: _Plan, executor: _Executor) -> None:
    """Take a finished final phase back to bucket pieces (before a retry). Resumable: unbuild.json marks it."""
    paths = plan.paths
    state = paths.unbuild_state
    if not state.exists():
        buckets = _dedup(plan, executor)
        _write(plan, executor, buckets)  # finish what a killed run left, so every row is in a shard
        offsets = _offsets(buckets)
        atomic.write_json({"phase": "shards", "buckets": [[b["bucket"], o, b["kept"]]
                                                          for b, o in zip(buckets, offsets)]}, state)
    info = json.loads(state.read_text())
    spans = info["buckets"]
    if info["phase"] == "shards":
        rows = plan.layout.shard_rows
        total = sum(k for _, _, k in spans)
        for shard in range(-(-total // rows)):
            lo, hi = shard * rows, min((shard + 1) * rows, total)
            mine = [(b, o, k) for b, o, k in spans if k and o < hi and o + k > lo]
            executor.submit(final.unbuild_shard, plan.config.dirs, shard, plan.layout, plan.config.seed, mine,
                            limit=plan.in_flight_buckets)
        executor.drain()
        atomic.write_json({**info, "phase": "buckets"}, state)
    for b in range(plan.layout.n_buckets):
        executor.submit(final.reopen_bucket, plan.config.dirs, b)
    executor.drain()
    state.unlink()


def _retry(plan: _Plan, executor: _Executor, markers: list[dict], screens: object) -> list[dict]:
    """One retry round over every scattered group; returns the updated markers."""
    config = plan.config
    if pmd_plan.final_written(WorkLayout.of(config.work), OutLayout.of(config.out)) or \
            plan.paths.unbuild_state.exists():
        _unbuild(plan, executor)
    updated: list[dict] = []
    states = {}
    for spec in config.sources:
        states[spec.name] = _archive_state(spec, executor, config.work)
    for m in markers:
        spec = config.sources[m["source_index"]]
        task = ChunkTask(source=spec.name, index=m["group"], candidates=pa.table({}), path=Path(),
                         image_options=config.image, seed=config.seed, mode=spec.mode, download=config.download,
                         source_index=m["source_index"])
        executor.submit(_retry_group_with_state, config.dirs, spec.name, m["group"], m["attempts"] + 1, task,
                        plan.layout, plan.names, states[spec.name], screens, on_done=updated.append)
    executor.drain()
    return updated


def _source_entry(spec: SourceSpec, summary: dict, downloads: dict) -> dict:
    return {
        "inputs": [manifest_input(p) for p in spec.inputs],
        "images": "url" if spec.mode == "url" else "archive",
        "archives": [manifest_input(p, digest=False) for p in spec.images],
        "options": dict(spec.options),
        "ingest": summary["counts"],
        "downloads": downloads,
    }


# --------------------------------------------------------------------------------------------------------- run
def run_build(config: BuildConfig) -> dict:
    """Build (or resume) the corpus in config.out; returns the manifest, also written to OUT/manifest.json."""
    with budget_service(config) as config:  # host budgets for every download process of the build
        return _run_build(config)


def _run_build(config: BuildConfig) -> dict:
    started = time.perf_counter()
    out = config.out
    if not storage.is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    config.work.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(out):
        log.info("building into %s; work directory %s", out, config.work)
    for spec in config.sources:
        for p in [*spec.inputs, *spec.images]:
            if not storage.exists(p):
                raise BuildError(f"{spec.name}: input {p} does not exist")
    for p in config.decontaminate.paths:
        if not storage.exists(p):
            raise BuildError(f"decontamination input {p} does not exist")
    _check_state(config)
    for d in (SHARDS_DIR, FAILURES_DIR):
        atomic.remove_temp_files(storage.join(out, d))
    atomic.remove_temp_files(config.work)
    storage.remove_tree(config.work / "tmp")
    storage.delete(manifest_path(out))  # present only once this run has finished

    timings: dict[str, float] = {}
    kind = config.executor
    summaries: dict | None = None
    pool: _Executor | None = None
    if kind == "auto":
        kind = "ray"
        if resolve_address(config.ray_address) is None and _ingests_in_driver(config):
            # The pool's workers start (speculatively: ~0.3 s of imports each) beside the driver's ingest, whose
            # candidate count then decides; a build above POOL_MAX_CANDIDATES starts Ray after its ingest.
            pool = _Executor(dataclasses.replace(config, executor="pool"))
            try:
                summaries = _ingest_all(config, timings)
            except BaseException:
                pool.cancel()
                raise
            kind = "pool" if _candidates(config, summaries) <= POOL_MAX_CANDIDATES else "ray"
            if kind == "ray":
                pool.cancel()
        log.info("executor auto: %s", kind)
    if kind in ("local", "pool"):
        executor = pool or _Executor(dataclasses.replace(config, executor=kind))  # a pool's workers start here
        try:
            if summaries is None:
                summaries, url_counts = _driver_side_start(config, timings)
            else:
                url_counts = _driver_side_urls(config, summaries, timings)
            manifest = _images_and_final(config, summaries, executor, timings, url_counts)
        except BaseException:
            executor.cancel()
            raise
        executor.close()
    else:
        # Ray starts in this thread (ray.init sets a SIGTERM handler, main thread only) while a driver-side ingest
        # runs beside it: Ray's start is mostly waiting on its own processes (~2-3 s), a small build's ingest is
        # then free. An ingest that uses Ray itself (large inputs, a cluster) runs after, in the same session
        # (one Ray start per build, not one for the ingest and one for the rest).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmd-ingest") as threads:
            if summaries is not None:  # "auto" above POOL_MAX_CANDIDATES: ingested, the URL pass is left
                start = threads.submit(_with_driver_side_urls, config, summaries, timings)
            else:
                start = threads.submit(_driver_side_start, config, timings) if _ingests_in_driver(config) else None
            with ray_session(config.ray_address, config.num_cpus):
                summaries, url_counts = start.result() if start is not None else (_ingest_all(config, timings), None)
                executor = _Executor(dataclasses.replace(config, executor="ray"))
                try:
                    manifest = _images_and_final(config, summaries, executor, timings, url_counts)
                except BaseException:
                    executor.cancel()
                    raise
    storage.remove_tree(config.work / "tmp")
    manifest["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    manifest["executor"] = kind  # what ran (config.executor keeps what was asked for: "auto")
    card.write_docs(Manifest(out, manifest))  # README.md + croissant.json, from the manifest about to be written
    Manifest(out, manifest).write()  # last: its presence means the build is complete
    log.info("built %s: %d pairs in %d shards", out, manifest["totals"]["pairs"], len(manifest["shards"]))
    return manifest


def _make_plan(config: BuildConfig, summaries: dict) -> _Plan:
    chunks = [-(-summaries[s.name]["counts"]["pairs"] // config.chunk_rows) for s in config.sources]
    layout = final.plan_layout(chunks, _candidates(config, summaries), config.shard_rows, config.row_group_rows)
    return _Plan(config, summaries, layout)


def _timed_url_pass(plan: _Plan, executor: _Executor, timings: dict) -> dict[str, dict[str, int]]:
    t = time.perf_counter()
    url_counts = _url_pass(plan, executor)
    timings["urls_s"] = time.perf_counter() - t
    return url_counts


def _url_rows(config: BuildConfig, summaries: dict) -> int:
    return sum(summaries[s.name]["counts"]["pairs"] for s in config.sources if s.mode == "url")


def _driver_side_start(config: BuildConfig, timings: dict) -> tuple[dict, dict | None]:
    """What runs in the driver while Ray starts: the ingest, and the URL pass of a small build (a few of pmd.urls'
    file passes, a fraction of a second in one process, where Ray rounds would cost more than the work).
    Returns (summaries, URL counts or None when the URL pass is left to Ray)."""
    summaries = _ingest_all(config, timings)
    return summaries, _driver_side_urls(config, summaries, timings)


def _with_driver_side_urls(config: BuildConfig, summaries: dict, timings: dict) -> tuple[dict, dict | None]:
    return summaries, _driver_side_urls(config, summaries, timings)


def _driver_side_urls(config: BuildConfig, summaries: dict, timings: dict) -> dict | None:
    """The URL pass in the driver when it covers at most LOCAL_URL_PASS_ROWS URL rows, else None (left to the
    executor)."""
    if _url_rows(config, summaries) > LOCAL_URL_PASS_ROWS:
        return None
    local = _Executor(dataclasses.replace(config, executor="local"))
    return _timed_url_pass(_make_plan(config, summaries), local, timings)


def _candidates(config: BuildConfig, summaries: dict) -> int:
    return sum(summaries[s.name]["counts"]["pairs"] for s in config.sources)


def _images_and_final(config: BuildConfig, summaries: dict, executor: _Executor, timings: dict,
                      url_counts: dict | None = None) -> dict:
    """Everything after the ingest; `url_counts`: the URL pass was already run (driver side, `_driver_side_start`)."""
    plan = _make_plan(config, summaries)
    plan.takedowns = takedown.load_filter(config.out)
    plan.takedowns_ref = executor.put(plan.takedowns)

    screens = executor.put(config.decontaminate.load())  # evaluation photo ids and pHashes, once for every source
    if url_counts is None:
        url_counts = _timed_url_pass(plan, executor, timings)
    t = time.perf_counter()
    for s_index, spec in enumerate(config.sources):
        _images(plan, s_index, spec, executor, screens)
    timings["images_s"] = time.perf_counter() - t

    t = time.perf_counter()
    markers = _scatter(plan, executor)
    timings["scatter_s"] = time.perf_counter() - t
    if config.retry_failures:
        t = time.perf_counter()
        markers = _retry(plan, executor, markers, screens)
        timings["retry_s"] = time.perf_counter() - t
    elif pmd_plan.final_action(WorkLayout.of(config.work), OutLayout.of(config.out),
                               [r.id for r in plan.takedowns.requests], retry=False) != pmd_plan.FinalAction.KEEP:
        _unbuild(plan, executor)
    rows_by_source: Counter = Counter()
    for m in markers:
        rows_by_source.update(m["rows_by_source"])
    for spec in config.sources:
        if rows_by_source[spec.name] != summaries[spec.name]["counts"]["pairs"]:
            raise BuildError(f"{spec.name}: chunks held {rows_by_source[spec.name]} rows, ingest produced "
                             f"{summaries[spec.name]['counts']['pairs']}")

    t = time.perf_counter()
    buckets = _dedup(plan, executor)
    timings["plan_s"] = time.perf_counter() - t
    accounting, totals, downloads = final.accounting(plan.names, {n: s["counts"] for n, s in summaries.items()},
                                                     markers, buckets, url_counts)
    problems = accounting_problems(accounting)
    if problems:
        raise BuildError("accounting does not add up: " + "; ".join(problems))

    t = time.perf_counter()
    n_shards = _write(plan, executor, buckets)
    shard_s = time.perf_counter() - t
    timings["shards_s"] = shard_s
    failure_entries: dict[str, dict] = {}
    by_source: dict[str, list[dict]] = {}
    for m in sorted(markers, key=lambda m: (m["source_index"], m["group"])):
        by_source.setdefault(m["source"], []).append(m)
    files = [str(plan.paths.failed(spec.name, m["group"], 0).with_name(m["failed_file"]))
             for spec in config.sources for m in by_source.get(spec.name, [])]
    for s_index, spec in enumerate(config.sources):
        executor.submit(final.write_failures, config.dirs, spec.name, s_index, files, plan.layout.n_buckets,
                        on_done=lambda e, name=spec.name: failure_entries.__setitem__(name, e))
    executor.drain()
    # The rows of in-place takedowns are in failures/SOURCE.parquet now (durable: written and renamed above).
    for path in storage.list_files(storage.join(config.out, FAILURES_DIR), ".parquet"):
        if storage.basename(path).startswith(f"{takedown.TAKEDOWN}-"):
            storage.delete(path)
    rows_by_request: dict[str, Counter] = {}
    for b in buckets:
        for request, by_source in b.get("takedowns_by_request", {}).items():
            rows_by_request.setdefault(request, Counter()).update(by_source)

    entries = [json.loads(plan.paths.entry(i).read_text()) for i in range(n_shards)]
    written_rows = sum(e["rows"] for e in entries)
    written_bytes = sum(e["bytes"] for e in entries)
    for i, entry in enumerate(entries):
        expected = min(config.shard_rows, totals["pairs"] - i * config.shard_rows)
        if entry["rows"] != expected:
            raise BuildError(f"{entry['file']}: {entry['rows']} rows on disk, the plan places {expected}; it comes "
                             "from another build: delete it and rerun")
    return {
        "format": MANIFEST_FORMAT,
        "schema_version": schema.SCHEMA_VERSION,
        "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config.to_dict(),
        "sources": {spec.name: _source_entry(spec, summaries[spec.name], downloads[spec.name])
                    for spec in config.sources},
        "shards": entries,
        "failures": [failure_entries[spec.name] for spec in config.sources],
        "accounting": accounting,
        "totals": totals,
        "layout": plan.layout.to_dict(),
        "takedowns": takedown.manifest_entries(plan.takedowns, rows_by_request),
        "timings": {**{k: round(v, 3) for k, v in timings.items()},
                    "shard_rows_per_s": round(written_rows / shard_s, 1) if written_rows and shard_s else None,
                    "shard_mb_per_s": round(written_bytes / 1e6 / shard_s, 2) if written_bytes and shard_s else None},
    }
