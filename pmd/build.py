"""The image stage of one chunk of candidates: fetch (URL download or archive member) -> process_image -> one file.

Library code (no Ray): pmd.build_plan submits `run_chunk` (and, through pmd.final, `retry_rows`) as tasks to an
executor that decides where they run.

A chunk is the unit of work and of resume. Its result is ONE Arrow IPC file, `work/images/SOURCE/chunk-NNNNN.arrow`,
written to a temp name and renamed, holding every candidate of the chunk in candidate order: the pair columns,
the processed image (null on failure), its sha256 and sizes, the failure stage/reason/detail (null on success),
the placement and dedup hashes, and the row's place in the input order (`source_index`, `candidate_index`: the dedup
rule's "first in source order, then candidate order"). The chunk's download counts are in the file's schema
metadata (`pmd.downloads`). Its existence means the chunk is done; it is never recomputed.

Per image, the steps are: fetch (download or archive read) -> crop box -> `process_image` (decode, checks, resize,
encode) -> sha256. Each step that fails records (stage, reason, detail) and ends the row's pipeline.

Why Arrow IPC and not Parquet: the final phase (pmd.final) reads chunks memory-mapped, selecting columns and rows
without decoding pages; an uncompressed IPC file gives that for free. It also keeps `*.parquet` globs of OUT to the
shards and failures.

Transient failures (`pmd.http_client.is_transient`): a later `--retry-failures` downloads those rows again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from PIL import Image

from pmd import atomic, schema, storage
from pmd.decontaminate import EVAL_OVERLAP, screen
from pmd.decontaminate import STAGE as DECONTAMINATE_STAGE
from pmd.eval_ids import screen_candidates
from pmd.images import ImageOptions, ImageRejected, process_image
from pmd.reasons import Reason, Stage
from pmd.shards import shuffle_hash, text_hash
from pmd.download import DownloadOptions, download_chunk
# One rule for "worth another attempt", shared with the download client's own retries (defined beside it).

log = logging.getLogger(__name__)

STAGE = schema.STAGE
REASON = schema.REASON
DETAIL = schema.DETAIL
SHUFFLE_HASH = "shuffle_hash"
TEXT_HASH = "text_hash"
SOURCE_INDEX = "source_index"  # the source's position in the build config
CANDIDATE_INDEX = "candidate_index"  # the row's position in its source's candidates


# Stage of each process_image rejection reason.
_CHECK_STAGE = {Reason.DECODE_ERROR: Stage.DECODE, EVAL_OVERLAP: DECONTAMINATE_STAGE}

CHUNK_SCHEMA = pa.schema(
    [
        *(f.with_nullable(True) for f in schema.PAIR_SCHEMA),
        pa.field(schema.IMAGE, pa.binary()),
        pa.field(schema.IMAGE_SHA256, pa.string()),
        pa.field(schema.WIDTH, pa.int32()),
        pa.field(schema.HEIGHT, pa.int32()),
        pa.field(schema.ORIGINAL_WIDTH, pa.int32()),
        pa.field(schema.ORIGINAL_HEIGHT, pa.int32()),
        pa.field(STAGE, pa.string()),
        pa.field(REASON, pa.string()),
        pa.field(DETAIL, pa.string()),
        pa.field(SHUFFLE_HASH, pa.uint64()),
        pa.field(TEXT_HASH, pa.uint64()),
        pa.field(SOURCE_INDEX, pa.int32()),
        pa.field(CANDIDATE_INDEX, pa.int64()),
    ]
)


@dataclass
class ChunkTask:
    """What a worker needs for one chunk. `candidates` holds the chunk's rows (CANDIDATE_SCHEMA: its `crop` column
    says which region of each image to keep)."""

    source: str
    index: int
    candidates: pa.Table
    path: Path  # the chunk's result file (for a retry: the scratch space is next to it)
    image_options: ImageOptions
    seed: int
    mode: str  # "url" | "archive"
    download: DownloadOptions = field(default_factory=DownloadOptions)
    archive_state: object | None = None  # ArchiveIndex.to_state(), for mode "archive"
    eval_ids: dict | None = None  # Flickr photo id -> evaluation image (pmd.eval_ids); None = no id screening
    eval_index: object | None = None  # pmd.decontaminate.EvalHashIndex; None = no pHash screening
    source_index: int = 0
    candidate_index: list[int] | None = None  # each row's index in its source; default: consecutive from
    first_candidate: int = 0  # ... this one


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}.arrow"


def _fetch_urls(task: ChunkTask, urls: list[str | None], transform) -> dict[str, tuple[object, str, str, str]]:
    """url -> (bytes or processed result, stage, reason, detail). Each distinct URL is downloaded once."""
    distinct = sorted({u for u in urls if u})
    if storage.is_remote(str(task.path)):  # a node's scratch, never the store: it lives for this task only
        import tempfile

        work = Path(tempfile.gettempdir()) / f"pmd-download-{os.getpid()}" / task.source / f"chunk-{task.index:05d}"
    else:
        work = task.path.parent.parent.parent / "tmp" / task.source / f"chunk-{task.index:05d}"
    fetched: dict = {}
    if distinct:
        # Keys go through to the backend as given (here: the URL itself); each URL is fetched once per chunk.
        for d in download_chunk(distinct, distinct, task.download, work, transform,
                                max_bytes=task.image_options.max_image_bytes, source=task.source,
                                state_dir=task.path.parent.parent.parent):
            fetched[d.key] = (d.data, Stage.DOWNLOAD, d.reason, d.detail)
    return fetched


# Per worker process. Building an ArchiveIndex from its state (every member name and path suffix) and opening its
# zips (the central directory) costs seconds for archives of 10^5-10^6 members: measured ~3.5 s of a 4 s chunk task
# at 800,000 members. Ray reuses worker processes, so each process builds it once and its chunk tasks share it.
_ARCHIVE_INDEXES: dict[tuple, object] = {}


def _archive_index(state: dict):
    from pmd.archives import ArchiveIndex

    key = (os.getpid(), tuple((s["kind"], s["path"], s.get("size"), len(s["members"]), _mtime(s["path"]))
                              for s in state["sources"]))
    index = _ARCHIVE_INDEXES.get(key)
    if index is None:
        for old in _ARCHIVE_INDEXES.values():
            old.close()
        _ARCHIVE_INDEXES.clear()
        index = _ARCHIVE_INDEXES[key] = ArchiveIndex.from_state(state)
    return index


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None  # read_many reports the missing archive for its refs


def _fetch_archive(task: ChunkTask, refs: list[str | None]) -> dict[str, tuple[bytes | None, str, str, str]]:
    index = _archive_index(task.archive_state)
    distinct = sorted({r for r in refs if r})
    fetched: dict = {}
    for ref, data, error in index.read_many(distinct, max_bytes=task.image_options.max_image_bytes):
        if data is None:
            # pmd.archives errors read "reason" or "reason: detail" (missing_member, archive_error, too_large).
            reason, _, detail = str(error).partition(":")
            fetched[ref] = (None, Stage.READ, reason.strip() or Reason.ARCHIVE_ERROR, detail.strip()[:500])
        else:
            fetched[ref] = (data, Stage.READ, None, None)
    for ref in distinct:
        fetched.setdefault(ref, (None, Stage.READ, Reason.ARCHIVE_ERROR, "the archive reader returned nothing"))
    return fetched


def _crop_boxes(cand: pa.Table) -> list[tuple[int, int, int, int] | None]:
    """Each row's crop (x, y, width, height) from the candidates' `crop` column, None for the whole image. Tables
    without the column (pair columns only) crop nothing."""
    if schema.CROP not in cand.column_names:
        return [None] * cand.num_rows
    return [None if c is None else (c["x"], c["y"], c["width"], c["height"])
            for c in cand.column(schema.CROP).to_pylist()]


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _stable_detail(detail: str | None) -> str:
    """A rejection's detail without object addresses (Pillow names `<_io.BytesIO object at 0x7f...>`): the failures
    files must be the same bytes in every run."""
    return _ADDRESS.sub("", detail or "")[:500]


def _process(data: bytes, options: ImageOptions, box, with_phash: bool = False) -> object:
    """ProcessedImage, or the ImageRejected that says why not (returned, so it can be cached per image).
    `with_phash`: its pHash too, for the evaluation screen (computed from the pixels, not a second decode)."""
    try:
        return process_image(data, options, box, with_phash=with_phash)
    except ImageRejected as e:
        return e


def _process_rows(task: ChunkTask) -> pa.Table:
    """The chunk's rows through fetch -> crop box -> process_image -> sha256: the result table in CHUNK_SCHEMA.

    Each distinct locator is fetched once per chunk and each (locator, crop box) processed once, so COCO's five
    captions of an image cost one decode and a URL named by several rows one download.
    """
    cand = task.candidates
    keys = cand.column(schema.KEY).to_pylist()
    texts = cand.column(schema.TEXT).to_pylist()
    # Pillow warns on images over its pixel limit before process_image rejects them as too_many_pixels: noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    boxes = _crop_boxes(cand)
    # Evaluation photos by Flickr id: failed before any download (pmd.eval_ids).
    screened = screen_candidates(task.eval_ids, cand)
    processed: dict[tuple, object] = {}
    hashed = task.eval_index is not None
    if task.mode == "url":
        locators = [u if hit is None else None for u, hit in zip(cand.column(schema.IMAGE_URL).to_pylist(), screened)]
        # Without crop boxes (every URL source) each image is processed as it arrives, overlapping the downloads.
        inline = all(b is None for b in boxes)
        fetched = _fetch_urls(task, locators, (lambda data: screen(_process(data, task.image_options, None, hashed),
                                                                   task.eval_index, ImageRejected)) if inline
                              else None)
        if inline:
            for url, (result, *_rest) in fetched.items():
                if result is not None:
                    processed[(url, None)] = result
        missing = (Stage.DOWNLOAD, Reason.NO_URL, "candidate has no image_url")
    elif task.mode == "archive":
        locators = [r if hit is None else None for r, hit in zip(cand.column(schema.IMAGE_REF).to_pylist(), screened)]
        fetched = _fetch_archive(task, locators)
        missing = (Stage.READ, Reason.NO_IMAGE_REF, "candidate has no image_ref")
    else:
        raise ValueError(f"unknown image mode {task.mode!r}")

    n = len(keys)
    out: dict[str, list] = {c: [None] * n for c in (schema.IMAGE, schema.IMAGE_SHA256, schema.WIDTH, schema.HEIGHT,
                                                      schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT, STAGE, REASON,
                                                      DETAIL)}
    for i, (locator, box) in enumerate(zip(locators, boxes)):
        if screened[i] is not None:
            out[STAGE][i], out[REASON][i], out[DETAIL][i] = screened[i]
            continue
        if not locator:
            out[STAGE][i], out[REASON][i], out[DETAIL][i] = missing
            continue
        data, stage, reason, detail = fetched[locator]
        if data is None:
            out[STAGE][i], out[REASON][i], out[DETAIL][i] = stage, reason, detail
            continue
        cache_key = (locator, box)
        result = processed.get(cache_key)
        if result is None:
            # Evaluation images by perceptual hash (pmd.decontaminate): a match becomes an eval_overlap failure.
            result = processed[cache_key] = screen(_process(data, task.image_options, box, hashed), task.eval_index,
                                                   ImageRejected)
        if isinstance(result, ImageRejected):
            out[STAGE][i] = _CHECK_STAGE.get(result.reason, Stage.CHECK)
            out[REASON][i], out[DETAIL][i] = result.reason, _stable_detail(result.detail)
            continue
        out[schema.IMAGE][i] = result.data
        out[schema.IMAGE_SHA256][i] = result.sha256
        out[schema.WIDTH][i], out[schema.HEIGHT][i] = result.width, result.height
        out[schema.ORIGINAL_WIDTH][i], out[schema.ORIGINAL_HEIGHT][i] = result.original_width, result.original_height

    arrays = [cand.column(f.name) for f in schema.PAIR_SCHEMA]
    for f in CHUNK_SCHEMA:
        if f.name in out:
            arrays.append(pa.array(out[f.name], type=f.type))
    arrays.append(pa.array([shuffle_hash(task.seed, k) for k in keys], type=pa.uint64()))
    arrays.append(pa.array([text_hash(t) for t in texts], type=pa.uint64()))
    if SOURCE_INDEX in cand.column_names:  # rows regrouped by URL (pmd.urls) carry their own place
        arrays.append(cand.column(SOURCE_INDEX).cast(pa.int32()))
    else:
        arrays.append(pa.array([task.source_index] * n, type=pa.int32()))
    if task.candidate_index is not None:
        arrays.append(pa.array(task.candidate_index, type=pa.int64()))
    elif CANDIDATE_INDEX in cand.column_names:
        arrays.append(cand.column(CANDIDATE_INDEX).cast(pa.int64()))
    else:
        arrays.append(pa.array(range(task.first_candidate, task.first_candidate + n), type=pa.int64()))
    return pa.Table.from_arrays(arrays, schema=CHUNK_SCHEMA)


def run_chunk(task: ChunkTask) -> dict:
    """Process one chunk and write its result file atomically. Returns {rows, ok, failures_by_reason}."""
    table = _process_rows(task)
    write_ipc_atomic(table, task.path)
    reasons = Counter(r for r in table.column(REASON).to_pylist() if r is not None)
    return {"source": task.source, "index": task.index, "rows": table.num_rows,
            "ok": table.num_rows - sum(reasons.values()), "failures_by_reason": dict(reasons)}


def retry_rows(task: ChunkTask) -> pa.Table:
    """Fetch and process again the rows of `task.candidates` (failed rows; CHUNK_SCHEMA or PAIR_SCHEMA columns).

    Their `candidate_index` must be given in the task: the result (CHUNK_SCHEMA, same row order) replaces the old
    rows exactly as if the first attempt had given it. Only download failures are retried, and no URL source has
    a crop (Visual Genome, the one source that crops, reads archives), so the rows are processed whole.
    """
    if task.candidate_index is None:
        raise ValueError("retry_rows needs each row's candidate_index")
    pair = task.candidates.select(list(schema.PAIR_SCHEMA.names)).cast(schema.PAIR_SCHEMA)
    if SOURCE_INDEX in task.candidates.column_names:
        pair = pair.append_column(SOURCE_INDEX, task.candidates.column(SOURCE_INDEX))
    task = dataclasses.replace(task, candidates=pair)
    return _process_rows(task)


# Work files (chunks, pieces) are Arrow IPC with zstd-compressed buffers: the metadata columns (captions, meta JSON)
# shrink to about their Parquet size, so the work copy of a row costs no more disk than its shard row; JPEG buffers
# do not compress and zstd passes over them at GB/s.
IPC_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def ipc_writer(sink, schema_: pa.Schema) -> pa.ipc.RecordBatchFileWriter:
    return pa.ipc.new_file(sink, schema_, options=IPC_WRITE_OPTIONS)


def write_ipc_atomic(table: pa.Table, path: Path) -> None:
    """A work file, written atomically (pmd.atomic) with the work files' compression."""
    atomic.write_ipc(table, path, IPC_WRITE_OPTIONS)


def read_ipc(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A work file; with `columns`, only those columns' buffers are read and decompressed. A local file is
    memory-mapped; one on object storage is read whole in one GET: a ranged GET per column of each record batch
    made the dedup pass 75x slower than on disk (docs/benchmarks.md), for a saving of the image bytes only."""
    if storage.is_remote(str(path)):
        source = pa.BufferReader(storage.read_bytes(path))
    else:
        source = pa.memory_map(str(path), "r")
    return read_ipc_from(source, columns)


def read_ipc_from(source, columns: list[str] | None = None) -> pa.Table:
    """An Arrow IPC file from an open source (a memory map, a buffer); with `columns`, only those columns."""
    if columns is None:
        return pa.ipc.open_file(source).read_all()
    names = pa.ipc.open_file(source).schema.names
    options = pa.ipc.IpcReadOptions(included_fields=[names.index(c) for c in columns])
    return pa.ipc.open_file(source, options=options).read_all().select(columns)


def read_chunk(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A chunk file of the image stage (CHUNK_SCHEMA)."""
    return read_ipc(path, columns)
