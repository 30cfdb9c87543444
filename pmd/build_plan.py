"""The plan of `pmd build`: its phases, each a list of tasks with deterministic names, run on any executor.

A build is a sequence of phases (PHASES); each phase is a list of tasks: a library function (pmd.ingest,
pmd.urls, pmd.build, pmd.final), its arguments and a name `phase/unit` that is a pure function of the
configuration and the ingest counts (`images/coco/chunk-00003`, `scatter/coco/group-00000`, `dedup/bucket-00001`,
`merge/shard-00000`, `failures/coco`). A task is done when its marker exists (written last, after every output:
pmd.atomic): the plan asks the markers (pmd.plan: done_chunks, final_action; the per-task markers of pmd.urls and
pmd.final) before it submits anything, reads a done task's result from its marker, and submits only the others.
A rerun of a finished build therefore submits no task; a takedown recorded since, `--retry-failures` or a killed
run invalidates exactly what pmd.plan says; a changed option is refused (pmd.plan.configuration_changes).

  ingest    OUT/work/ingest/SOURCE/ingest.json (reused when inputs and options are unchanged)
  urls      pmd.urls' three passes over the URL sources (split, owners, chunks), each task with its marker
  images    OUT/work/images/SOURCE/chunk-NNNNN.arrow: one task per chunk of `chunk_rows` candidates
  scatter, unbuild, retry, dedup, write, merge, failures: pmd.final's passes over groups of chunks and buckets
  manifest  OUT/manifest.json (with README.md and croissant.json before it), written by the driver, last

Where tasks run is not decided here: `run_plan(config, summaries, executor, ...)` takes any pmd.executor.Executor
(`pipelines/build.py` chooses and starts one: process pool or Ray; tests use pmd.executor.InProcessExecutor), and
`run(config, executor)` is a whole build on one executor. The driver holds counts, file names and one small
summary per group and bucket, never a row per candidate. OUT and the work state (`work`, default OUT/work) are on
storage every node sees (object storage, where every work file is an object written once under its final name, or
a shared mount); a node's local disk holds only one task's scratch. An executor may run a task twice (Ray re-runs
a task of a lost node, `TASK_RETRIES`): every task is idempotent, so a retried or resumed task writes the same
bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pmd import atomic, card, final, schema, storage, takedown, urls
from pmd import plan as pmd_plan
from pmd.build import ChunkTask, read_chunk, run_chunk
from pmd.build_config import BuildConfig, SourceSpec
from pmd.executor import BuildError, Executor, InProcessExecutor
from pmd.ingest import CANDIDATES_DIR, CHUNK_RECORDS, ingest_source, input_fingerprint, manifest_input, read_summary
from pmd.layout import OutLayout, WorkLayout
from pmd.manifest import FAILURES_DIR, MANIFEST_FORMAT, SHARDS_DIR, Manifest, accounting_problems, manifest_path
from pmd.shards import shard_name

log = logging.getLogger(__name__)

# The phases of a build, in the order they run (unbuild only when a takedown or a retry invalidates the written
# shards, retry only when asked).
PHASES = ("ingest", "urls", "images", "scatter", "unbuild", "retry", "dedup", "write", "merge", "failures",
          "manifest")
# A URL pass over at most this many URL rows runs in the driver while Ray starts (`driver_side_start`): at 10,000
# rows its ~0.4 s there are hidden behind Ray's start, where three rounds of Ray tasks after it cost ~0.6 s; far
# above, Ray's parallelism wins.
LOCAL_URL_PASS_ROWS = 100_000
_MARKER_READERS = 16  # done tasks' markers are read in threads: on object storage each is a request


def task_name(phase: str, *unit: str) -> str:
    """A task's deterministic name: `phase/unit...` (the unit named as its marker or output file is, no suffix)."""
    return "/".join((phase, *unit))


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


def check_state(config: BuildConfig) -> None:
    """Refuse a work state of another configuration (pmd.plan.configuration_changes); start one if none."""
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


def _read_markers(paths: Iterable[storage.WorkPath]) -> list[dict]:
    paths = list(paths)
    if len(paths) <= 1:
        return [json.loads(p.read_text()) for p in paths]
    with ThreadPoolExecutor(max_workers=min(_MARKER_READERS, len(paths))) as threads:
        return list(threads.map(lambda p: json.loads(p.read_text()), paths))


# --------------------------------------------------------------------------------------------------------- tasks
def _chunk_done(task: ChunkTask) -> dict | None:
    """The summary of a chunk already written: a task re-run by Ray after its node died, having finished there."""
    if not task.path.is_file():
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
        try:
            task.candidates = read_chunk(storage.as_path(candidates))
        except FileNotFoundError:
            # Another attempt of this task (Ray re-running it while the first still ran) finished and deleted the
            # input after writing the chunk: the chunk is the result.
            result = _chunk_done(task)
            if result is None:
                raise
            return result
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


def _failures_inputs(failed_files: list[str], buckets: list[dict]) -> str:
    """What failures/SOURCE.parquet is made of: the groups' failed files (named by attempt) and every bucket's
    decisions (dedup_bucket's summaries, takedown requests included). Its marker records this digest."""
    text = json.dumps({"failed": failed_files, "buckets": buckets}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_failures(dirs: final.BuildDirs, source: str, source_index: int, failed_files: list[str],
                    n_buckets: int, inputs: str) -> dict:
    """final.write_failures, then its marker (the manifest entry and the inputs it was written from)."""
    entry = final.write_failures(dirs, source, source_index, failed_files, n_buckets)
    atomic.write_json({"inputs": inputs, "entry": entry}, dirs.paths.failures_marker(source))
    return entry


# ---------------------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What the driver knows about the build: a few integers per source, group and bucket."""

    config: BuildConfig
    summaries: dict[str, dict]
    layout: final.Layout
    takedowns: takedown.TakedownFilter = field(default_factory=takedown.TakedownFilter)  # recorded requests
    takedowns_ref: object = None  # the same, as the executor passes it to tasks
    packed: dict[int, list] = field(default_factory=dict)  # bucket -> its pieces in the groups' packs (scatter)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.config.sources]

    def n_chunks(self, spec: SourceSpec) -> int:
        return -(-self.summaries[spec.name]["counts"]["pairs"] // self.config.chunk_rows)

    def groups(self, spec: SourceSpec) -> list[range]:
        return final.group_ranges(self.layout, self.n_chunks(spec))

    @property
    def work(self) -> WorkLayout:
        return WorkLayout.of(self.config.work)

    def chunk_path(self, spec: SourceSpec, index: int) -> storage.WorkPath:
        return self.work.chunk(spec.name, index)

    @property
    def paths(self) -> final.FinalPaths:
        return self.config.dirs.paths

    # The caps bound the data a local work disk holds twice (a group's chunks beside its pieces, a bucket's pieces
    # beside its shards). Work on object storage has no such disk, and a cap there would only hold a cluster's
    # scatter to ~20% of its groups at once (~9 tasks at PMD's 48 groups, whatever the cluster's size): the
    # executor's own slots bound it instead.
    @property
    def in_flight_groups(self) -> int:
        n = sum(len(self.groups(s)) for s in self.config.sources)
        return n if self.work_is_remote else max(1, int(final.IN_FLIGHT_SHARE * n))

    @property
    def in_flight_buckets(self) -> int:
        n = self.layout.n_buckets
        return n if self.work_is_remote else max(1, int(final.IN_FLIGHT_SHARE * n))

    @property
    def work_is_remote(self) -> bool:
        return storage.is_remote(str(self.config.work))


def make_plan(config: BuildConfig, summaries: dict) -> Plan:
    chunks = [-(-summaries[s.name]["counts"]["pairs"] // config.chunk_rows) for s in config.sources]
    layout = final.plan_layout(chunks, candidates(config, summaries), config.shard_rows, config.row_group_rows)
    return Plan(config, summaries, layout)


def candidates(config: BuildConfig, summaries: dict) -> int:
    return sum(summaries[s.name]["counts"]["pairs"] for s in config.sources)


def _names(directory: storage.WorkPath, pattern: str) -> set[str]:
    """The file names in a directory of markers: one listing, not one request per marker."""
    return {p.name for p in directory.glob(pattern)}


# -------------------------------------------------------------------------------------------------------- phases
def start(config: BuildConfig) -> None:
    """Before any phase: inputs exist, the work state is this configuration's (or new), a killed run's temporary
    files are gone, and the manifest is absent until this run has finished."""
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
    check_state(config)
    for d in (SHARDS_DIR, FAILURES_DIR):
        atomic.remove_temp_files(storage.join(out, d))
    atomic.remove_temp_files(config.work)
    storage.remove_tree(config.work / "tmp")
    storage.delete(manifest_path(out))  # present only once this run has finished


def reusable_ingest(config: BuildConfig, spec: SourceSpec) -> dict | None:
    """The source's ingest summary in OUT/work/ingest/SOURCE when it matches the inputs and options, else None."""
    summary = read_summary(config.work / "ingest" / spec.name)
    if (summary is not None and summary.get("inputs") == input_fingerprint(spec.inputs)
            and summary.get("options") == spec.options and summary.get("schema_version") == schema.SCHEMA_VERSION
            and summary.get("candidate_columns") == list(schema.CANDIDATE_SCHEMA.names)):
        return summary
    return None


IngestRunner = Callable[[BuildConfig, SourceSpec], dict]  # one source's ingest, where the caller chooses


def in_process_ingest(executor: Executor) -> IngestRunner:
    """An ingest whose part tasks go to `executor` (pmd.ingest.ingest_source)."""
    def ingest(config: BuildConfig, spec: SourceSpec) -> dict:
        return ingest_source(spec.name, spec.inputs, config.work / "ingest", spec.options, CHUNK_RECORDS, executor,
                             config.progress)
    return ingest


def ingest_all(config: BuildConfig, timings: dict, ingest: IngestRunner | None = None) -> dict[str, dict]:
    """Every source's ingest summary: reused, or made by `ingest` (default: in this process)."""
    ingest = ingest or in_process_ingest(InProcessExecutor())
    t = time.perf_counter()
    summaries = {}
    for spec in config.sources:
        summary = reusable_ingest(config, spec)
        if summary is not None:
            log.info("reusing the ingest of %s in %s", spec.name, config.work / "ingest" / spec.name)
        else:
            summary = ingest(config, spec)
        summaries[spec.name] = summary
    timings["ingest_s"] = time.perf_counter() - t
    return summaries


def _archive_state(spec: SourceSpec, executor: Executor, work: Path | str | None = None) -> object:
    if spec.mode != "archive":
        return None
    from pmd.archives import ARCHIVE_INDEX_DIR, ArchiveIndex

    # Remote archives' member lists are kept beside the work state: a tar's index costs one ranged read per member.
    cache = storage.join(work, ARCHIVE_INDEX_DIR) if work is not None else None
    return executor.put(ArchiveIndex.build(spec.images, cache=cache).to_state())


def url_pass(plan: Plan, executor: Executor) -> dict[str, dict[str, int]]:
    """pmd.urls' three passes over the URL sources; returns {source: {urls, unique_urls}}."""
    config = plan.config
    specs = [(i, s) for i, s in enumerate(config.sources) if s.mode == "url"]
    if not specs:
        return {}
    out = config.dirs
    n_buckets = urls.n_url_buckets(sum(plan.summaries[s.name]["counts"]["pairs"] for _, s in specs))
    paths = urls.UrlPaths(out)
    owners = [paths.owners_marker(u) for u in range(n_buckets)]
    owned = _names(paths.root / "owners", "u-*.json")
    if not all(m.name in owned for m in owners):
        split = _names(paths.root / "split", "*.json")
        chunked = _names(paths.root / "chunks-done", "*.json")
        for s_index, spec in specs:
            pairs = plan.summaries[spec.name]["counts"]["pairs"]
            cand_dir = str(config.work / "ingest" / spec.name / CANDIDATES_DIR)
            for g, chunks in enumerate(plan.groups(spec)):
                marker = paths.split_marker(s_index, g)
                if paths.chunks_marker(s_index, g).name not in chunked and marker.name not in split:
                    executor.submit(urls.split_group, out, cand_dir, s_index, g, chunks.start * config.chunk_rows,
                                    min(chunks.stop * config.chunk_rows, pairs), n_buckets,
                                    name=task_name("urls", "split", marker.stem))
        executor.drain()
    counts: dict[str, Counter] = {s.name: Counter() for _, s in specs}

    def add(summary: dict) -> None:
        for name, c in summary["downloads"].items():
            counts[name].update(c)

    for summary in _read_markers(m for m in owners if m.name in owned):
        add(summary)
    for u, marker in enumerate(owners):
        if marker.name not in owned:
            executor.submit(urls.owners_bucket, out, u, config.chunk_rows, plan.layout.chunks_per_group, plan.names,
                            on_done=add, name=task_name("urls", "owners", marker.stem))
    executor.drain()
    chunked = _names(paths.root / "chunks-done", "*.json")
    for s_index, spec in specs:
        scattered = _names(plan.paths.root / "groups" / spec.name, "group-*.json")
        for g, chunks in enumerate(plan.groups(spec)):
            marker = paths.chunks_marker(s_index, g)
            if plan.paths.group_marker(spec.name, g).name not in scattered and marker.name not in chunked:
                executor.submit(urls.chunks_group, out, spec.name, s_index, g, list(chunks),
                                name=task_name("urls", "chunks", marker.stem))
    executor.drain()
    return {name: dict(c) for name, c in counts.items()}


def images(plan: Plan, s_index: int, spec: SourceSpec, executor: Executor, screens: object = (None, None)
           ) -> None:
    """Submit every chunk of the source not yet done (its file exists, or its group was already scattered)."""
    config = plan.config
    source_dir = config.work / "ingest" / spec.name
    total = plan.summaries[spec.name]["counts"]["pairs"]
    n_chunks = plan.n_chunks(spec)
    done = pmd_plan.done_chunks(plan.work, spec.name, n_chunks, plan.groups(spec))
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

    def name(index: int) -> str:
        return task_name("images", spec.name, plan.chunk_path(spec, index).stem)

    try:
        if spec.mode == "url":
            url_paths = urls.UrlPaths(config.dirs)
            for index in range(n_chunks):
                if index not in done:
                    executor.submit(_run_url_chunk, task(index, pa.table({})), str(url_paths.chunk(spec.name, index)),
                                    screens, on_done=lambda r: bar.update(r["rows"]), name=name(index))
        else:
            archive_state = _archive_state(spec, executor, config.work)
            for index, table in enumerate(_candidate_batches(source_dir, config.chunk_rows)):
                if index not in done:
                    executor.submit(_run_chunk_with_state, task(index, table), archive_state, screens,
                                    on_done=lambda r: bar.update(r["rows"]), name=name(index))
        executor.drain()
    finally:
        bar.close()


def scatter(plan: Plan, executor: Executor) -> list[dict]:
    """Pass A over every group; returns the group markers (a few numbers each). A group is done when its marker
    exists and none of its chunks is left (a run killed between the two deletes them in the task)."""
    markers: list[dict] = []
    done: list[storage.WorkPath] = []
    for s_index, spec in enumerate(plan.config.sources):
        scattered = _names(plan.paths.root / "groups" / spec.name, "group-*.json")
        written = _names(plan.work.images(spec.name), "chunk-*.arrow")
        for g, chunks in enumerate(plan.groups(spec)):
            marker = plan.paths.group_marker(spec.name, g)
            paths = [plan.chunk_path(spec, i) for i in chunks]
            left = [p for p in paths if p.name in written]
            if marker.name in scattered:
                if not left:
                    done.append(marker)
                    continue
            elif len(left) < len(paths):
                missing = next(p for p in paths if p.name not in written)
                raise BuildError(f"{missing}: chunk missing after the image stage")
            executor.submit(final.scatter_group, plan.config.dirs, spec.name, s_index, g, [str(p) for p in paths],
                            plan.layout, plan.names, on_done=markers.append, limit=plan.in_flight_groups,
                            name=task_name("scatter", spec.name, marker.stem))
    markers.extend(_read_markers(done))
    executor.drain()
    plan.packed = final.pack_ranges(markers, final.consumed_packs(plan.config.dirs))
    return markers


def dedup(plan: Plan, executor: Executor) -> list[dict]:
    """Pass B1 over every bucket not decided yet; returns every bucket's summary, in bucket order."""
    summaries: list[dict] = []
    decided = _names(plan.paths.root / "dedup", "bucket-*[0-9].json")
    done = []
    for b in range(plan.layout.n_buckets):
        marker = plan.paths.dedup(b)
        if marker.name in decided:
            done.append(marker)
            continue
        executor.submit(final.dedup_bucket, plan.config.dirs, b, plan.names, plan.takedowns_ref,
                        plan.config.download.placeholder_min_urls, plan.packed.get(b, []), on_done=summaries.append,
                        name=task_name("dedup", marker.stem))
    summaries.extend(_read_markers(done))
    executor.drain()
    return sorted(summaries, key=lambda s: s["bucket"])


def _offsets(buckets: list[dict]) -> list[int]:
    offsets, position = [], 0
    for b in buckets:
        offsets.append(position)
        position += b["kept"]
    return offsets


def write(plan: Plan, executor: Executor, buckets: list[dict]) -> int:
    """Passes B2 and merge: every shard on disk; returns the number of shards."""
    out = plan.config.dirs
    offsets = _offsets(buckets)
    total = sum(b["kept"] for b in buckets)
    n_shards = -(-total // plan.layout.shard_rows)
    bar = tqdm(total=n_shards, desc="shards", unit=" shards", disable=not plan.config.progress)
    try:
        written = _names(plan.paths.root / "written", "bucket-*.json")
        done = []
        for b, offset in zip(range(plan.layout.n_buckets), offsets):
            marker = plan.paths.written(b)
            if marker.name in written:
                done.append(marker)
                continue
            executor.submit(final.write_bucket, out, b, offset, total, plan.layout, plan.takedowns_ref,
                            plan.config.download.placeholder_min_urls, plan.packed.get(b, []),
                            on_done=lambda r: bar.update(len(r["shards"])), limit=plan.in_flight_buckets,
                            name=task_name("write", marker.stem))
        for r in _read_markers(done):
            bar.update(len(r["shards"]))
        executor.drain()
        # Two listings, not two requests per shard: which shards have their entry and their file.
        entries = _names(plan.paths.root / "entries", "shard-*.json")
        files = _names(storage.as_path(out.output(SHARDS_DIR)), "shard-*.parquet")
        for shard in range(n_shards):
            if not (plan.paths.entry(shard).name in entries and storage.basename(shard_name(shard)) in files):
                executor.submit(final.merge_shard, out, shard, plan.layout.row_group_rows,
                                on_done=lambda _: bar.update(1), name=task_name("merge", plan.paths.entry(shard).stem))
        executor.drain()
        final.release_packs(out, plan.packed)  # every bucket is written: no task reads a pack again
        plan.packed = {}
    finally:
        bar.close()
    return n_shards


def unbuild(plan: Plan, executor: Executor) -> None:
    """Take a finished final phase back to bucket pieces (before a retry). Resumable: unbuild.json marks it."""
    paths = plan.paths
    state = paths.unbuild_state
    if not state.is_file():
        buckets = dedup(plan, executor)
        write(plan, executor, buckets)  # finish what a killed run left, so every row is in a shard
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
                            limit=plan.in_flight_buckets, name=task_name("unbuild", paths.entry(shard).stem))
        executor.drain()
        atomic.write_json({**info, "phase": "buckets"}, state)
    for b in range(plan.layout.n_buckets):
        executor.submit(final.reopen_bucket, plan.config.dirs, b, name=task_name("unbuild", paths.dedup(b).stem))
    executor.drain()
    state.unlink()


def retry(plan: Plan, executor: Executor, markers: list[dict], screens: object) -> list[dict]:
    """One retry round over every scattered group; returns the updated markers."""
    config = plan.config
    if pmd_plan.final_written(plan.work, OutLayout.of(config.out)) or plan.paths.unbuild_state.is_file():
        unbuild(plan, executor)
    else:  # a run stopped between dedup and the first write: decisions made without the rows this round adds
        final.forget_decided(config.dirs, pmd_plan.decided_buckets(plan.work))
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
                        plan.layout, plan.names, states[spec.name], screens, on_done=updated.append,
                        name=task_name("retry", spec.name, plan.paths.group_marker(spec.name, m["group"]).stem))
    executor.drain()
    return updated


def failures(plan: Plan, executor: Executor, markers: list[dict], buckets: list[dict]) -> dict[str, dict]:
    """failures/SOURCE.parquet of every source whose inputs changed since its marker; returns the entries."""
    config = plan.config
    entries: dict[str, dict] = {}
    by_source: dict[str, list[dict]] = {}
    for m in sorted(markers, key=lambda m: (m["source_index"], m["group"])):
        by_source.setdefault(m["source"], []).append(m)
    files = [str(plan.paths.failed(spec.name, m["group"], 0).with_name(m["failed_file"]))
             for spec in config.sources for m in by_source.get(spec.name, [])]
    # By name, not path: a work state copied or moved elsewhere is the same work state.
    inputs = _failures_inputs([f"{m['source']}/{m['failed_file']}" for spec in config.sources
                               for m in by_source.get(spec.name, [])], buckets)
    for s_index, spec in enumerate(config.sources):
        marker = plan.paths.failures_marker(spec.name)
        if marker.is_file():
            recorded = json.loads(marker.read_text())
            if recorded["inputs"] == inputs and storage.is_file(config.dirs.output(recorded["entry"]["file"])):
                entries[spec.name] = recorded["entry"]
                continue
        executor.submit(_write_failures, config.dirs, spec.name, s_index, files, plan.layout.n_buckets, inputs,
                        on_done=lambda e, name=spec.name: entries.__setitem__(name, e),
                        name=task_name("failures", spec.name))
    executor.drain()
    return entries


def _source_entry(spec: SourceSpec, summary: dict, downloads: dict) -> dict:
    return {
        "inputs": [manifest_input(p) for p in spec.inputs],
        "images": "url" if spec.mode == "url" else "archive",
        "archives": [manifest_input(p, digest=False) for p in spec.images],
        "options": dict(spec.options),
        "ingest": summary["counts"],
        "downloads": downloads,
    }


# ------------------------------------------------------------------------------------------------------------ run
def _timed_url_pass(plan: Plan, executor: Executor, timings: dict) -> dict[str, dict[str, int]]:
    t = time.perf_counter()
    url_counts = url_pass(plan, executor)
    timings["urls_s"] = time.perf_counter() - t
    return url_counts


def _url_rows(config: BuildConfig, summaries: dict) -> int:
    return sum(summaries[s.name]["counts"]["pairs"] for s in config.sources if s.mode == "url")


def driver_side_start(config: BuildConfig, timings: dict, ingest: IngestRunner | None = None
                      ) -> tuple[dict, dict | None]:
    """What runs in the driver while Ray starts: the ingest, and the URL pass of a small build (a few of pmd.urls'
    file passes, a fraction of a second in one process, where Ray rounds would cost more than the work).
    Returns (summaries, URL counts or None when the URL pass is left to Ray)."""
    summaries = ingest_all(config, timings, ingest)
    return summaries, driver_side_urls(config, summaries, timings)


def driver_side_urls(config: BuildConfig, summaries: dict, timings: dict) -> dict | None:
    """The URL pass in the driver when it covers at most LOCAL_URL_PASS_ROWS URL rows, else None (left to the
    executor)."""
    if _url_rows(config, summaries) > LOCAL_URL_PASS_ROWS:
        return None
    return _timed_url_pass(make_plan(config, summaries), InProcessExecutor(), timings)


def run_plan(config: BuildConfig, summaries: dict, executor: Executor, timings: dict,
             url_counts: dict | None = None) -> dict:
    """Every phase after the ingest on `executor`; returns the manifest (not written: `finish` writes it).
    `url_counts`: the URL pass was already run (driver side, `driver_side_start`)."""
    plan = make_plan(config, summaries)
    plan.takedowns = takedown.load_filter(config.out)
    plan.takedowns_ref = executor.put(plan.takedowns)

    screens = executor.put(config.decontaminate.load())  # evaluation photo ids and pHashes, once for every source
    if url_counts is None:
        url_counts = _timed_url_pass(plan, executor, timings)
    t = time.perf_counter()
    for s_index, spec in enumerate(config.sources):
        images(plan, s_index, spec, executor, screens)
    timings["images_s"] = time.perf_counter() - t

    t = time.perf_counter()
    markers = scatter(plan, executor)
    timings["scatter_s"] = time.perf_counter() - t
    if config.retry_failures:
        t = time.perf_counter()
        markers = retry(plan, executor, markers, screens)
        timings["retry_s"] = time.perf_counter() - t
    elif pmd_plan.final_action(plan.work, OutLayout.of(config.out), [r.id for r in plan.takedowns.requests],
                               retry=False) != pmd_plan.FinalAction.KEEP:
        unbuild(plan, executor)
    rows_by_source: Counter = Counter()
    for m in markers:
        rows_by_source.update(m["rows_by_source"])
    for spec in config.sources:
        if rows_by_source[spec.name] != summaries[spec.name]["counts"]["pairs"]:
            raise BuildError(f"{spec.name}: chunks held {rows_by_source[spec.name]} rows, ingest produced "
                             f"{summaries[spec.name]['counts']['pairs']}")

    t = time.perf_counter()
    buckets = dedup(plan, executor)
    timings["plan_s"] = time.perf_counter() - t
    accounting, totals, downloads = final.accounting(plan.names, {n: s["counts"] for n, s in summaries.items()},
                                                     markers, buckets, url_counts)
    problems = accounting_problems(accounting)
    if problems:
        raise BuildError("accounting does not add up: " + "; ".join(problems))

    t = time.perf_counter()
    n_shards = write(plan, executor, buckets)
    shard_s = time.perf_counter() - t
    timings["shards_s"] = shard_s
    failure_entries = failures(plan, executor, markers, buckets)
    # The rows of in-place takedowns are in failures/SOURCE.parquet now (durable: written and renamed above).
    for path in storage.list_files(storage.join(config.out, FAILURES_DIR), ".parquet"):
        if storage.basename(path).startswith(f"{takedown.TAKEDOWN}-"):
            storage.delete(path)
    rows_by_request: dict[str, Counter] = {}
    for b in buckets:
        for request, by_source in b.get("takedowns_by_request", {}).items():
            rows_by_request.setdefault(request, Counter()).update(by_source)

    entries = _read_markers(plan.paths.entry(i) for i in range(n_shards))
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


def finish(config: BuildConfig, manifest: dict, kind: str, started: float) -> dict:
    """The last phase: the corpus' README.md and croissant.json, then manifest.json, whose presence means the
    build is complete (written once, after every other file of the build)."""
    storage.remove_tree(config.work / "tmp")
    manifest["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    manifest["executor"] = kind  # what ran (config.executor keeps what was asked for: "auto")
    card.write_docs(Manifest(config.out, manifest))  # README.md + croissant.json, from the manifest about to be written
    Manifest(config.out, manifest).write()  # last: its presence means the build is complete
    log.info("built %s: %d pairs in %d shards", config.out, manifest["totals"]["pairs"], len(manifest["shards"]))
    return manifest


def run(config: BuildConfig, executor: Executor, ingest: IngestRunner | None = None) -> dict:
    """A whole build (or its resumption) with every task on `executor` (the ingest's parts too, unless `ingest`
    says otherwise); returns the manifest, also written to OUT/manifest.json."""
    started = time.perf_counter()
    start(config)
    timings: dict[str, float] = {}
    summaries = ingest_all(config, timings, ingest or in_process_ingest(executor))
    manifest = run_plan(config, summaries, executor, timings)
    return finish(config, manifest, executor.kind, started)
