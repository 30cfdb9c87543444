"""The image stage of one chunk of candidates: fetch (URL download or archive member) -> process_image -> one file.

A chunk is the unit of work and of resume. Its result is ONE Arrow IPC file, `work/images/SOURCE/chunk-NNNNN.arrow`,
written to a temp name and renamed, holding every candidate of the chunk in candidate order: the pair columns,
the processed image (null on failure), its sha256 and sizes, the failure stage/reason/detail (null on success),
and the placement and dedup hashes. Its existence means the chunk is done; it is never recomputed.

Why Arrow IPC and not Parquet: the shard writer gathers rows from many chunks at random; an uncompressed IPC file is
memory-mapped and `take` touches only the pages of the rows it needs (Parquet would decode whole row groups). It also
keeps `*.parquet` globs of OUT to the shards and failures.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from PIL import Image

from pmd import schema
from pmd.images import ImageOptions, ImageRejected, process_image
from pmd.shards import shuffle_hash, text_hash
from pmd.download import DownloadOptions, download_chunk
from pmd.decontaminate import EVAL_OVERLAP, screen
from pmd.decontaminate import STAGE as DECONTAMINATE_STAGE
from pmd.eval_ids import screen_candidates

log = logging.getLogger(__name__)

STAGE = schema.STAGE
REASON = schema.REASON
DETAIL = schema.DETAIL
SHUFFLE_HASH = "shuffle_hash"
TEXT_HASH = "text_hash"

# Stage of each process_image rejection reason.
_CHECK_STAGE = {"decode_error": "decode", EVAL_OVERLAP: DECONTAMINATE_STAGE}

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
    ]
)
METADATA_COLUMNS = [n for n in CHUNK_SCHEMA.names if n != schema.IMAGE]


@dataclass
class ChunkTask:
    """What a worker needs for one chunk. `candidates` holds the chunk's rows (PAIR_SCHEMA)."""

    source: str
    index: int
    candidates: pa.Table
    path: Path  # the chunk's result file
    image_options: ImageOptions
    seed: int
    mode: str  # "url" | "archive"
    download: DownloadOptions = field(default_factory=DownloadOptions)
    archive_state: object | None = None  # ArchiveIndex.to_state(), for mode "archive"
    eval_ids: dict | None = None  # Flickr photo id -> evaluation image (pmd.eval_ids); None = no id screening
    eval_index: object | None = None  # pmd.decontaminate.EvalHashIndex; None = no pHash screening


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}.arrow"


def _crop_box(meta: str | None) -> tuple[int, int, int, int] | None:
    """Visual Genome's region box `meta.box` = {x, y, width, height}; None for every other source."""
    if not meta or '"box"' not in meta:
        return None
    box = json.loads(meta).get("box")
    if not isinstance(box, dict):
        return None
    return (box["x"], box["y"], box["width"], box["height"])


def _fetch_urls(task: ChunkTask, urls: list[str | None], transform) -> dict[str, tuple[object, str, str, str]]:
    """url -> (bytes or processed result, stage, reason, detail). Each distinct URL is downloaded once."""
    distinct = sorted({u for u in urls if u})
    work = task.path.parent.parent.parent / "tmp" / task.source / f"chunk-{task.index:05d}"
    fetched: dict = {}
    if distinct:
        # img2dataset keys rows by its own ids; ours go through as the `pmd_key` column (here: the URL itself).
        for d in download_chunk(distinct, distinct, task.download, work, transform,
                                max_bytes=task.image_options.max_image_bytes):
            fetched[d.key] = (d.data, "download", d.reason, d.detail)
    return fetched


def _fetch_archive(task: ChunkTask, refs: list[str | None]) -> dict[str, tuple[bytes | None, str, str, str]]:
    from pmd.archives import ArchiveIndex

    index = ArchiveIndex.from_state(task.archive_state)
    distinct = sorted({r for r in refs if r})
    fetched: dict = {}
    try:
        for ref, data, error in index.read_many(distinct):
            if data is None:
                # pmd.archives errors read "reason" or "reason: detail" (missing_member, archive_error).
                reason, _, detail = str(error).partition(":")
                fetched[ref] = (None, "read", reason.strip() or "archive_error", detail.strip()[:500])
            else:
                fetched[ref] = (data, "read", None, None)
    finally:
        index.close()
    for ref in distinct:
        fetched.setdefault(ref, (None, "read", "archive_error", "the archive reader returned nothing"))
    return fetched


def _safe_box(meta: str | None) -> tuple[int, int, int, int] | None | str:
    """The crop box, None, or (a str) why meta.box cannot be read."""
    try:
        return _crop_box(meta)
    except (ValueError, KeyError, TypeError) as e:
        return f"meta.box unreadable: {e}"


def _process(data: bytes, options: ImageOptions, box) -> object:
    """ProcessedImage, or the ImageRejected that says why not (returned, so it can be cached per image)."""
    try:
        return process_image(data, options, box)
    except ImageRejected as e:
        return e


def run_chunk(task: ChunkTask) -> dict:
    """Process one chunk and write its result file atomically. Returns {rows, ok, failures_by_reason}."""
    cand = task.candidates
    keys = cand.column(schema.KEY).to_pylist()
    texts = cand.column(schema.TEXT).to_pylist()
    metas = cand.column(schema.META).to_pylist()
    # Pillow warns on images over its pixel limit before process_image rejects them as too_many_pixels: noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    boxes = [_safe_box(m) for m in metas]
    # Evaluation photos by Flickr id: failed before any download (pmd.eval_ids).
    screened = screen_candidates(task.eval_ids, cand)
    processed: dict[tuple, object] = {}
    if task.mode == "url":
        locators = [u if hit is None else None for u, hit in zip(cand.column(schema.IMAGE_URL).to_pylist(), screened)]
        # Without crop boxes (every URL source) each image is processed as it arrives, overlapping the downloads.
        inline = all(b is None for b in boxes)
        fetched = _fetch_urls(task, locators, (lambda data: screen(_process(data, task.image_options, None),
                                                                   task.eval_index, ImageRejected)) if inline
                              else None)
        if inline:
            for url, (result, *_rest) in fetched.items():
                if result is not None:
                    processed[(url, None)] = result
        missing = ("download", "no_url", "candidate has no image_url")
    elif task.mode == "archive":
        locators = [r if hit is None else None for r, hit in zip(cand.column(schema.IMAGE_REF).to_pylist(), screened)]
        fetched = _fetch_archive(task, locators)
        missing = ("read", "no_image_ref", "candidate has no image_ref")
    else:
        raise ValueError(f"unknown image mode {task.mode!r}")

    n = len(keys)
    out: dict[str, list] = {c: [None] * n for c in (schema.IMAGE, schema.IMAGE_SHA256, schema.WIDTH, schema.HEIGHT,
                                                      schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT, STAGE, REASON,
                                                      DETAIL)}
    # COCO has five captions per image: the image is decoded and encoded once per (locator, crop box).
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
        if isinstance(box, str):
            out[STAGE][i], out[REASON][i], out[DETAIL][i] = "check", "bad_box", box
            continue
        cache_key = (locator, box)
        result = processed.get(cache_key)
        if result is None:
            # Evaluation images by perceptual hash (pmd.decontaminate): a match becomes an eval_overlap failure.
            result = processed[cache_key] = screen(_process(data, task.image_options, box), task.eval_index,
                                                   ImageRejected)
        if isinstance(result, ImageRejected):
            out[STAGE][i] = _CHECK_STAGE.get(result.reason, "check")
            out[REASON][i], out[DETAIL][i] = result.reason, (result.detail or "")[:500]
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
    table = pa.Table.from_arrays(arrays, schema=CHUNK_SCHEMA)
    write_ipc_atomic(table, task.path)
    reasons = Counter(r for r in out[REASON] if r is not None)
    return {"source": task.source, "index": task.index, "rows": n, "ok": n - sum(reasons.values()),
            "failures_by_reason": dict(reasons)}


def write_ipc_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_chunk(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A chunk file, memory-mapped: selecting columns or taking rows reads only those pages."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    return table.select(columns) if columns is not None else table
