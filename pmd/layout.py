"""The names of a build's files, each in one place: `OutLayout` for OUT (the corpus: shards, failures, manifest)
and `WorkLayout` for its work state (ingest/, urls/, images/, final/, tmp/; default OUT/work on OUT's store).

Both take a local directory or a URL (pmd.storage) and hand out `storage.WorkPath`s: a `Path` on disk, a
`RemotePath` on object storage, which offer the same few operations. The subtrees of the final phase and of the URL
pass have their own classes beside the code that writes them (`pmd.final.FinalPaths`, `pmd.urls.UrlPaths`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pmd import storage
from pmd.build import chunk_name
from pmd.final import WORK_DIR, FinalPaths
from pmd.ingest import CANDIDATES_DIR
from pmd.manifest import FAILURES_DIR, MANIFEST_FILE, SHARDS_DIR
from pmd.shards import shard_name
from pmd.urls import URLS_DIR

BUILD_STATE = "build.json"  # WORK/build.json: the configuration the work files belong to
INGEST_DIR, IMAGES_DIR, TMP_DIR = "ingest", "images", "tmp"


@dataclass(frozen=True)
class OutLayout:
    """OUT: what a finished build leaves for its readers."""

    root: storage.WorkPath

    @classmethod
    def of(cls, out: str | os.PathLike) -> OutLayout:
        return cls(storage.as_path(out))

    @property
    def shards(self) -> storage.WorkPath:
        return self.root / SHARDS_DIR

    def shard(self, index: int) -> storage.WorkPath:
        return self.root / shard_name(index)

    @property
    def failures(self) -> storage.WorkPath:
        return self.root / FAILURES_DIR

    @property
    def manifest(self) -> storage.WorkPath:
        return self.root / MANIFEST_FILE

    @property
    def default_work(self) -> storage.WorkPath:
        """OUT/work, on OUT's own store (disk or object storage): every node that sees OUT sees it."""
        return self.root / WORK_DIR


@dataclass(frozen=True)
class WorkLayout:
    """The work state: immutable files under deterministic names, each task's markers written last."""

    root: storage.WorkPath

    @classmethod
    def of(cls, work: str | os.PathLike) -> WorkLayout:
        return cls(storage.as_path(work))

    @property
    def build_state(self) -> storage.WorkPath:
        return self.root / BUILD_STATE

    @property
    def ingest(self) -> storage.WorkPath:
        return self.root / INGEST_DIR

    def ingest_source(self, source: str) -> storage.WorkPath:
        return self.ingest / source

    def candidates(self, source: str) -> storage.WorkPath:
        return self.ingest_source(source) / CANDIDATES_DIR

    def images(self, source: str) -> storage.WorkPath:
        return self.root / IMAGES_DIR / source

    def chunk(self, source: str, index: int) -> storage.WorkPath:
        return self.images(source) / chunk_name(index)

    @property
    def tmp(self) -> storage.WorkPath:
        """Scratch of a local work directory, cleared when a build starts (a remote work state never uses it)."""
        return self.root / TMP_DIR

    @property
    def urls(self) -> storage.WorkPath:
        return self.root / URLS_DIR

    @property
    def final(self) -> FinalPaths:
        return FinalPaths(self.root)
