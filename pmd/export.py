"""A built corpus as WebDataset tar shards, for training stacks that read WebDataset (OpenCLIP, img2dataset users).

Each pair becomes three members sharing one sample key: `KEY.jpg` (the stored image bytes, not re-encoded),
`KEY.txt` (the caption, UTF-8) and `KEY.json` (the pmd key, source, split, parsed `meta` and the other pair and
image columns). The sample key is the pair's position in the corpus, zero-padded (`000000042`): pmd keys hold `/`
and `.`, which WebDataset would read as a directory and an extension. `DIR/shards.json` lists the tar files with
their samples, bytes and sha256, and the brace pattern WebDataset takes (`pmd-{000000..000012}.tar`).

Streaming: shards are read one row group at a time and each tar is written to a temporary name, then renamed, so
memory does not grow with the corpus and a killed export reruns to the same files (finished tars are kept: the
output is a pure function of the corpus and `shard_size`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pmd import atomic, redact, schema, storage
from pmd.manifest import Manifest
from pmd.shards import file_sha256

log = logging.getLogger(__name__)

FORMATS = ("webdataset",)
SHARD_LIST = "shards.json"
TAR_PATTERN = "pmd-{:06d}.tar"
KEY_DIGITS = 9
# Columns carried in KEY.json besides the image and the text (which have members of their own).
_JSON_COLUMNS = (schema.KEY, schema.SOURCE, schema.SPLIT, schema.IMAGE_URL, schema.IMAGE_REF, schema.LANG,
                 schema.LANG_SCORE, schema.IMAGE_SHA256, schema.WIDTH, schema.HEIGHT, schema.ORIGINAL_WIDTH,
                 schema.ORIGINAL_HEIGHT)
_READ_COLUMNS = [*_JSON_COLUMNS, schema.TEXT, schema.META, schema.IMAGE]


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportOptions:
    format: str = "webdataset"
    shard_size: int = 10_000  # samples per tar
    progress: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ExportError(f"export format must be one of {FORMATS}, not {self.format!r}")
        if self.shard_size < 1:
            raise ExportError(f"shard size must be positive, got {self.shard_size}")


def _shard_files(build: str | Path) -> tuple[list[str | Path], int]:
    manifest = Manifest.read(build)
    return manifest.shard_locations(), manifest.rows


def _rows(files: list[str | Path]) -> Iterator[dict]:
    for path in files:
        parquet = pq.ParquetFile(storage.open_input(path))
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=_READ_COLUMNS)
            yield from table.to_pylist()


def _sample(index: int, row: dict) -> list[tuple[str, bytes]]:
    key = f"{index:0{KEY_DIGITS}d}"
    meta = json.loads(row[schema.META]) if row[schema.META] else {}
    record = {c: row[c] for c in _JSON_COLUMNS}
    record["meta"] = meta
    return [(f"{key}.jpg", row[schema.IMAGE]), (f"{key}.txt", row[schema.TEXT].encode("utf-8")),
            (f"{key}.json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # byte-identical reruns
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _TarWriter:
    """One tar at a time, written atomically (pmd.atomic); `close` puts it in place and describes it."""

    def __init__(self, path: str | Path):
        self.path = path
        self.file = atomic.AtomicFile(path)
        self.sink = _Hashing(self.file.file)  # described as written: a tar on object storage is never read back
        self.tar = tarfile.open(fileobj=self.sink, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            _add(self.tar, name, data)
        self.samples += 1

    def close(self) -> dict:
        self.tar.close()
        self.file.commit()
        return {"file": storage.basename(self.path), "samples": self.samples, "bytes": self.sink.size,
                "sha256": self.sink.digest.hexdigest()}


class _Hashing:
    """A binary sink that keeps the sha256 and size of what passes through it."""

    def __init__(self, file):
        self.file, self.digest, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.size


def _describe(path: str | Path, samples: int) -> dict:
    return {"file": storage.basename(path), "samples": samples, "bytes": storage.size(path),
            "sha256": file_sha256(path)}


def export(build: Path, out: Path, options: ExportOptions = ExportOptions()) -> dict:
    """Write the corpus in `build` as WebDataset tars into `out`; returns (and writes) the shard list."""
    build, out = storage.location(build), storage.location(out)
    files, total = _shard_files(build)
    atomic.remove_temp_files(out)  # tars a killed export left half written
    n_tars = -(-total // options.shard_size)
    entries: list[dict] = []
    writer: _TarWriter | None = None
    bar = tqdm(total=total, desc="export", unit=" pairs", disable=not options.progress)
    try:
        for index, row in enumerate(_rows(files)):
            tar_index, position = divmod(index, options.shard_size)
            path = storage.join(out, TAR_PATTERN.format(tar_index))
            if position == 0:
                if writer is not None:
                    entries.append(writer.close())
                    writer = None
                samples = min(options.shard_size, total - index)
                if storage.exists(path):  # finished by an earlier run: the same rows give the same bytes
                    entries.append(_describe(path, samples))
                else:
                    writer = _TarWriter(path)
            if writer is not None:
                writer.add(_sample(index, row))
            bar.update(1)
        if writer is not None:
            entries.append(writer.close())
    finally:
        bar.close()
    written = sum(e["samples"] for e in entries)
    if written != total or len(entries) != n_tars:
        raise ExportError(f"{build}: the manifest lists {total} rows, the shards held {written}")
    listing = {
        "format": "webdataset",
        "source": redact.text(build),
        "samples": total,
        "shard_size": options.shard_size,
        "members": ["jpg", "txt", "json"],
        "urls": f"pmd-{{{0:06d}..{max(n_tars - 1, 0):06d}}}.tar" if n_tars else "",
        "shards": entries,
    }
    atomic.write_json(listing, storage.join(out, SHARD_LIST))
    log.info("exported %d pairs from %s into %d tars in %s", total, build, n_tars, out)
    return listing

