"""`pmd ingest`: upstream metadata files -> candidate pairs + rejects, in-process or spread over Ray.

This module chooses and starts the executor (pipelines.executors: in-process, or Ray for large inputs and named
clusters); the plan is library code, pmd.ingest.ingest_source: the driver streams records out of the upstream files
and submits one task per chunk (`process_chunk`, one part file each), a few in flight, so memory stays constant
whatever the input size, and every executor writes the same parts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pmd import storage
from pmd.config_loader import ConfigError
from pmd.ingest import CHUNK_RECORDS, ingest_source, prepare_source
from pipelines.executors import Executor, LocalExecutor, RayExecutor
from pipelines.ray_runtime import ray_session, resolve_address

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
    chunk_records: int = CHUNK_RECORDS
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
    """Ingest one source (pmd.ingest.ingest_source) on the executor chosen; returns the summary that is also written
    to OUT/SOURCE/ingest.json."""
    prepared = prepare_source(config.source, config.inputs, config.options)
    if config.choose_executor() == "local":
        summary = _ingest(config, LocalExecutor(), prepared)
    else:
        with ray_session(config.ray_address, config.num_cpus):
            summary = _ingest(config, RayExecutor(task_cpus=1), prepared)
    counts = summary["counts"]
    log.info("ingested %s: %d records -> %d pairs, %d rejects", config.source, counts["records"], counts["pairs"],
             counts["rejects"])
    return summary


def _ingest(config: IngestConfig, executor: Executor, prepared) -> dict:
    return ingest_source(config.source, config.inputs, config.out, config.options, config.chunk_records, executor,
                         config.progress, prepared)
