"""The manifest of a built corpus (OUT/manifest.json) as a type: reading, writing, validation, the accounting identity.

Every reader and writer of the manifest goes through `Manifest`; the file layout is in docs/build-format.md. The
JSON is kept as written (key order, every section, including ones this version does not interpret), so a manifest
read and written again is byte-identical; the parts code reasons about (the file lists, the accounting) have typed
accessors. OUT may be a local directory or an object-storage URL (pmd.storage).

The accounting identity, per source and in total: input_rows = pairs + rejects + failures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pmd import atomic, redact, storage

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
FAILURES_DIR = "failures"
MANIFEST_FORMAT = "pmd-build"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or not a pmd build's; the message names the file and the fault."""


class ManifestMissing(ManifestError, FileNotFoundError):
    pass


def not_written_yet(out: str | os.PathLike) -> str | None:
    """Why `out` is a build whose manifest is not written yet (a writer holds or held its lease, or it has shards
    but no manifest: a build runs, or stopped before its end); None when it has a manifest or is no build at all.
    Readers (verify, stats, the trainer) refuse such a build: its files are not a corpus yet."""
    from pmd import lease  # only on this path: a reader of a finished build never needs it

    if storage.exists(manifest_path(out)):
        return None
    path = manifest_path(out)
    try:
        holder = lease.current_holder(out)
    except OSError:
        holder = None
    if holder is not None:
        return (f"{path}: not written yet: {holder.describe()} is writing this build (or stopped before its end); "
                "read it once that command has finished")
    if storage.is_dir(storage.join(out, SHARDS_DIR)):
        return f"{path}: not written yet: the build stopped before its end; rerun the same `pmd build` to finish it"
    return None


@dataclass
class FileEntry:
    """A shard or failures file as listed in the manifest."""

    file: str  # relative to OUT
    rows: int
    bytes: int
    sha256: str
    sources: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"file": self.file, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256,
                "sources": dict(sorted(self.sources.items()))}

    @classmethod
    def from_dict(cls, entry: Mapping) -> FileEntry:
        return cls(entry["file"], int(entry["rows"]), int(entry["bytes"]), entry["sha256"],
                   dict(entry.get("sources") or {}))


def manifest_path(out: str | os.PathLike) -> str | Path:
    return storage.location(storage.join(out, MANIFEST_FILE))


def identity_holds(acc: Mapping[str, int]) -> bool:
    return acc["input_rows"] == acc["pairs"] + acc["rejects"] + acc["failures"]


def identity_problem(name: str, acc: Mapping[str, int]) -> str | None:
    """The sentence for a source (or the total) whose counts do not add up; None when they do."""
    if identity_holds(acc):
        return None
    return (f"{name}: input_rows {acc['input_rows']} != pairs {acc['pairs']} + rejects {acc['rejects']} + "
            f"failures {acc['failures']}")


def accounting_problems(accounting: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Every source of `accounting` whose identity does not hold."""
    return [p for s, a in accounting.items() if (p := identity_problem(s, a)) is not None]


@dataclass
class Manifest:
    """A build's manifest: `data` is the JSON object, in its key order; `out` the build it describes."""

    out: str | Path
    data: dict

    @classmethod
    def read(cls, out: str | os.PathLike) -> Manifest:
        """The manifest of the build in `out`. Raises ManifestMissing when there is none (the build did not
        finish), ManifestError when it is not valid JSON or not a pmd build's manifest."""
        out = storage.location(out)
        path = manifest_path(out)
        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            raise ManifestMissing(not_written_yet(out) or f"{path}: missing, not a finished pmd build") from None
        except OSError as e:
            raise ManifestError(f"{path}: unreadable ({e})") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: not a JSON object")
        for section in ("shards", "failures"):
            entries = data.get(section, [])
            if not isinstance(entries, list) or not all(isinstance(e, dict) and "file" in e for e in entries):
                raise ManifestError(f"{path}: `{section}` is not a list of file entries")
        return cls(out, data)

    @classmethod
    def new(cls, out: str | os.PathLike, shards: Sequence[FileEntry], failures: Sequence[FileEntry] = (),
            **sections: object) -> Manifest:
        """A manifest in the documented layout (format, schema_version, shards, failures, then `sections`, e.g.
        accounting, totals): what test fixtures and benchmarks write for the corpora they make by hand."""
        from pmd.schema import SCHEMA_VERSION

        return cls(storage.location(out), {"format": MANIFEST_FORMAT, "schema_version": SCHEMA_VERSION,
                                           "shards": [e.to_dict() for e in shards],
                                           "failures": [e.to_dict() for e in failures], **sections})

    @classmethod
    def exists(cls, out: str | os.PathLike) -> bool:
        return storage.exists(manifest_path(out))

    def write(self) -> None:
        """Atomically (pmd.atomic): a reader sees the previous manifest or this one, whole."""
        atomic.write_json(redact.value(self.data), manifest_path(self.out))  # no credential is ever recorded

    @property
    def path(self) -> str | Path:
        return manifest_path(self.out)

    @property
    def format_problem(self) -> str | None:
        if self.data.get("format") != MANIFEST_FORMAT:
            return f"{self.path}: format is {self.data.get('format')!r}, not {MANIFEST_FORMAT!r}"
        return None

    @property
    def shards(self) -> list[FileEntry]:
        return [FileEntry.from_dict(e) for e in self.data.get("shards", [])]

    @property
    def failures(self) -> list[FileEntry]:
        return [FileEntry.from_dict(e) for e in self.data.get("failures", [])]

    @property
    def accounting(self) -> dict[str, dict]:
        return self.data.get("accounting", {})

    @property
    def rows(self) -> int:
        """Pairs in the shards, as listed."""
        return sum(int(e.get("rows") or 0) for e in self.data.get("shards", []))

    def location(self, relative: str) -> str | Path:
        """Where a file the manifest lists (relative to OUT) is."""
        return storage.location(storage.join(self.out, *relative.split("/")))

    def shard_locations(self) -> list[str | Path]:
        return [self.location(e.file) for e in self.shards]

    def accounting_problems(self) -> list[str]:
        """The identity per source, as sentences starting with `accounting`."""
        return [f"accounting {p}" for p in accounting_problems(self.accounting)]
