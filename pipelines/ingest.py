"""`pmd ingest`: upstream metadata files -> candidate pairs + rejects, in-process or spread over Ray.

The driver streams records out of the upstream files (decompression is sequential anyway) and hands chunks of them
to workers; at most a few chunks are in flight, so memory stays constant whatever the input size. Each chunk is
converted by the source adapter and written as one part file by the worker, so the local and the Ray path produce
the same parts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from pmd import storage
from pmd.config_loader import ConfigError
from pmd.ingest import IngestCounts, chunk_size, iter_chunks, prepare_output, process_chunk, write_summary
from pmd.sources import create_adapter
from pmd.sources.inputs import require_file
from pipelines.ray_runtime import TASK_RETRIES, ray_session, resolve_address

log = logging.getLogger(__name__)

# Inputs at least this large go to Ray when the executor is "auto"; below it, starting Ray costs more than it saves.
RAY_MIN_INPUT_BYTES = 256 * 1024**2


INGEST_EXECUTORS = ("auto", "local", "ray")


@dataclass
class IngestConfig:
    source: str
    inputs: list[Path | str]  # local paths or URLs (pmd.storage)
    out: Path  # a local directory or, as a storage.RemotePath, a prefix on object storage
    options: Mapping[str, str] = field(default_factory=dict)
    chunk_records: int = 50_000
    executor: str = "auto"  # one of INGEST_EXECUTORS
    ray_address: str | None = None
    num_cpus: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.inputs = [storage.location(p) for p in self.inputs]
        self.out = storage.as_path(self.out)
        if self.executor not in INGEST_EXECUTORS:
            raise ConfigError(f"executor must be one of {', '.join(INGEST_EXECUTORS)}, not {self.executor!r}")
        if self.chunk_records < 1:
            raise ConfigError("chunk_records must be positive")
        if not self.inputs:
            raise ConfigError(f"no input files given for {self.source!r}")

    @property
    def source_dir(self) -> Path:
        return self.out / self.source

    def choose_executor(self) -> str:
        if self.executor != "auto":
            return self.executor
        if resolve_address(self.ray_address):
            return "ray"
        total = sum(storage.size(p) for p in self.inputs)
        return "ray" if total >= RAY_MIN_INPUT_BYTES else "local"


def run_ingest(config: IngestConfig) -> dict:
    """Ingest one source; returns the summary that is also written to OUT/SOURCE/ingest.json."""
    adapter = create_adapter(config.source, config.options)
    for path in config.inputs:
        require_file(path)
    # Before any output is cleared: loading the lookups (Visual Genome's image data, the Karpathy ids) fails on an
    # unreadable input, and the earlier run is then left intact.
    context = adapter.prepare(config.inputs)
    prepare_output(config.source_dir)
    executor = config.choose_executor()
    started = time.perf_counter()
    counts = IngestCounts()
    bar = tqdm(desc=f"ingest {config.source}", unit=" records", unit_scale=True, disable=not config.progress)
    chunks = iter_chunks(adapter, config.inputs, config.chunk_records)
    try:
        if executor == "local":
            parts = 0
            for index, chunk in enumerate(chunks):
                counts.add(process_chunk(adapter, context, chunk, index, config.source_dir))
                parts = index + 1
                bar.update(chunk_size(chunk))
        else:
            parts = _run_on_ray(config, adapter, context, chunks, counts, bar)
    finally:
        bar.close()
    summary = write_summary(config.source_dir, config.source, config.inputs, config.options, counts, parts,
                            time.perf_counter() - started, executor)
    log.info("ingested %s: %d records -> %d pairs, %d rejects", config.source, counts.records, counts.pairs,
             counts.rejects)
    return summary


def _run_on_ray(config: IngestConfig, adapter, context, chunks, counts: IngestCounts, bar) -> int:
    import ray

    with ray_session(config.ray_address, config.num_cpus):
        remote_chunk = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(process_chunk)
        # Put once in the object store: every task gets a reference, not its own copy of the context (a few MB for
        # Visual Genome's image data, docs/sources.md).
        adapter_ref, context_ref = ray.put(adapter), ray.put(context)
        max_in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        in_flight: dict = {}
        parts = 0

        def collect(ready: Sequence) -> None:
            for ref in ready:
                counts.add(ray.get(ref))
                bar.update(in_flight.pop(ref))

        try:
            for index, chunk in enumerate(chunks):
                if len(in_flight) >= max_in_flight:
                    ready, _ = ray.wait(list(in_flight), num_returns=1)
                    collect(ready)
                ref = remote_chunk.remote(adapter_ref, context_ref, chunk, index, config.source_dir)
                in_flight[ref] = chunk_size(chunk)
                parts = index + 1
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                collect(ready)
        except BaseException:
            for ref in in_flight:
                ray.cancel(ref, force=True)
            raise
        return parts
