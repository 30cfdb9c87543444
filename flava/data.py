"""Streaming data for FLAVA pretraining: Parquet shards (a PMD build) -> fixed-shape batches, resumable exactly.

Three kinds of data (paper section 3.4): ``pairs`` (PMD shards: image + caption; GC, ITM, MMM), ``images`` (image
shards or an image folder; MIM) and ``text`` (Parquet with a ``text`` column or .txt files; MLM).

Order is a pure function of (seed, pass, position), which is what makes stop/resume exact:

* a source is cut into *units* (a Parquet row group, or a slice of one when there are fewer row groups than
  streams; a chunk of an image folder; a slice of a text file);
* every pass over a source permutes its units with ``rng(seed, source, pass)`` and deals them round-robin to the
  ``world_size x num_workers`` *streams* (one per dataloader worker per rank): no row is read twice in a pass, and
  every pass has a new order;
* a stream reads its units in *windows* of about ``shuffle_buffer`` rows (row groups are read lazily, one window at
  a time) and emits each window in a permutation drawn from ``rng(seed, source, pass, stream, window)``;
* every random choice on a row (crop, patch mask) uses ``rng(seed, source, pass, stream, window, row)``, and every
  batch-level choice (BERT masking, ITM negatives) the generator of the row that starts the batch.

A stream's position is its *cursor* ``(pass, window, offset)``. Each batch carries the cursor after its last row;
the main process keeps the cursor of the last batch it consumed from every worker (prefetched batches are simply
regenerated after a resume). Bad rows (undecodable image, empty text) are skipped and counted, never raised.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from pmd import storage
from pmd.lease import warn_if_written
from pmd.manifest import MANIFEST_FILE, Manifest, ManifestError, not_written_yet
from pmd.schema import IMAGE, SPLIT, TEXT

from .masking import BlockMaskGenerator, bert_mask_tokens, itm_negatives

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TEXT_SUFFIXES = (".txt",)
_SOURCE_IDS = {"pairs": 1, "images": 2, "text": 3}
_FOLDER_CHUNK = 256  # images per unit of an image folder
_TEXT_CHUNK = 4096  # lines per unit of a text file


class DataError(ValueError):
    """Data that cannot be trained on (missing shard, wrong schema, empty source); raised before training."""


# ------------------------------------------------------------------------------------------------------------------
# locating and validating sources
# ------------------------------------------------------------------------------------------------------------------
def _manifest_files(build: str | Path) -> list[str | Path]:
    """The shards a build's manifest lists (a local directory or an object-storage URL), all present."""
    warn_if_written(build)
    try:
        files = Manifest.read(build).shard_locations()
    except (ManifestError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{storage.join(build, MANIFEST_FILE)}: not a readable build manifest ({e})") from None
    missing = [str(f) for f in files if not storage.is_file(f)]
    if missing:
        raise DataError(f"{storage.join(build, MANIFEST_FILE)}: {len(missing)} shard(s) listed but missing, "
                        f"e.g. {missing[:3]}")
    if not files:
        raise DataError(f"{storage.join(build, MANIFEST_FILE)}: lists no shards")
    return files


def parquet_file(f: str | Path) -> pq.ParquetFile:
    """A shard on local disk, or on object storage through pmd.storage (ranged reads of one row group)."""
    return pq.ParquetFile(storage.open_input(f)) if storage.is_remote(f) else pq.ParquetFile(f)


def _resolve_remote(url: str, kind: str) -> tuple[str, list[str | Path]]:
    """Pair and text shards on object storage: a build (its manifest), a manifest.json, a .parquet, or a prefix
    holding shards/*.parquet or *.parquet."""
    url = url.rstrip("/")
    if url.endswith("/" + MANIFEST_FILE):
        return "parquet", _manifest_files(url.rsplit("/", 1)[0])
    if url.endswith(".parquet"):
        if not storage.is_file(url):
            raise DataError(f"data path does not exist: {url}")
        return "parquet", [url]
    if storage.is_file(storage.join(url, MANIFEST_FILE)):
        return "parquet", _manifest_files(url)
    if (unfinished := not_written_yet(url)) is not None:
        raise DataError(unfinished)
    for prefix in (storage.join(url, "shards"), url):
        files = storage.list_files(prefix, ".parquet")
        if files:
            return "parquet", files
    raise DataError(f"{url}: no shards (manifest.json, shards/*.parquet or *.parquet) found for {kind}")


def resolve_files(path: str | os.PathLike, kind: str) -> tuple[str, list[Path]]:
    """A build dir / manifest.json / shard dir / .parquet / image folder / .txt -> ``(format, files)`` with
    format ``parquet``, ``folder`` or ``txt``. Builds and shards may be on object storage (``s3://...``)."""
    if storage.is_remote(path):
        return _resolve_remote(str(path), kind)
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path does not exist: {p}")
    if p.is_file():
        if p.name == MANIFEST_FILE:
            return "parquet", _manifest_files(p.parent)
        if p.suffix == ".parquet":
            return "parquet", [p]
        if p.suffix in TEXT_SUFFIXES and kind == "text":
            return "txt", [p]
        raise DataError(f"{p}: not a .parquet shard, a manifest.json{' or a .txt file' if kind == 'text' else ''}")
    if (p / MANIFEST_FILE).is_file():
        return "parquet", _manifest_files(p)
    if (unfinished := not_written_yet(p)) is not None:
        raise DataError(unfinished)
    for pattern in ("shards/*.parquet", "*.parquet"):
        files = sorted(Path(f) for f in glob.glob(str(p / pattern)))
        if files:
            return "parquet", files
    if kind == "text":
        files = sorted(Path(f) for f in glob.glob(str(p / "*.txt")))
        if files:
            return "txt", files
    if kind == "images":
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            return "folder", files
    raise DataError(f"{p}: no shards (manifest.json, shards/*.parquet or *.parquet) found for {kind}")


REQUIRED_COLUMNS = {"pairs": (IMAGE, TEXT), "images": (IMAGE,), "text": (TEXT,)}


@dataclass(frozen=True)
class Unit:
    """A slice ``[start, stop)`` of rows readable on its own: of a Parquet row group (``group >= 0``), or of an
    image-folder file list / text file (``group == -1``)."""

    file: int  # index into Source.files
    group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


class Source:
    """One kind's rows, cut into units. Built in the main process (reads only Parquet footers)."""

    def __init__(self, kind: str, paths: list[str], split: str | None = None) -> None:
        if kind not in REQUIRED_COLUMNS:
            raise DataError(f"unknown data kind {kind!r}")
        if not paths:
            raise DataError(f"no {kind} data given")
        self.kind = kind
        self.split = split
        self.files: list[str] = []
        self.formats: list[str] = []
        units: list[Unit] = []
        folder: list[str] = []
        # byte offset of every _TEXT_CHUNK-th line of each .txt file: a unit seeks to its chunk instead of reading
        # the file from line 0 (which made a pass O(lines^2))
        self._text_offsets: dict[int, list[int]] = {}
        for path in paths:
            fmt, files = resolve_files(path, kind)
            if fmt == "folder":
                folder.extend(str(f) for f in files)
                continue
            for f in files:
                idx = len(self.files)
                self.files.append(str(f))
                self.formats.append(fmt)
                if fmt == "parquet":
                    units.extend(self._parquet_units(f, idx))
                else:
                    n, self._text_offsets[idx] = _line_offsets(f, _TEXT_CHUNK)
                    units.extend(Unit(idx, -1, s, min(s + _TEXT_CHUNK, n)) for s in range(0, n, _TEXT_CHUNK))
        if folder:
            idx = len(self.files)
            self.files.append(json.dumps(folder))  # the file list itself; small next to the images
            self.formats.append("folder")
            units.extend(
                Unit(idx, -1, s, min(s + _FOLDER_CHUNK, len(folder))) for s in range(0, len(folder), _FOLDER_CHUNK)
            )
        units = [u for u in units if u.rows > 0]
        if not units:
            raise DataError(f"{kind} data {paths} has no rows")
        self.units = units
        self.num_rows = sum(u.rows for u in units)
        self._folder_cache: dict[int, list[str]] = {}

    def _parquet_units(self, f: Path, idx: int) -> list[Unit]:
        try:
            pf = parquet_file(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(f"{f}: not a readable Parquet file ({e})") from None
        names = set(pf.schema_arrow.names)
        need = set(REQUIRED_COLUMNS[self.kind]) | ({SPLIT} if self.split and self.kind == "pairs" else set())
        missing = sorted(need - names)
        if missing:
            raise DataError(
                f"{f}: wrong schema for {self.kind} data: missing column(s) {missing} (has {sorted(names)}); "
                "pair shards follow pmd.schema.SHARD_SCHEMA"
            )
        md = pf.metadata
        return [Unit(idx, g, 0, md.row_group(g).num_rows) for g in range(md.num_row_groups)]

    def split_units(self, n_streams: int) -> list[Unit]:
        """Units, cut further when there are fewer than streams so that every stream gets rows each pass."""
        units = self.units
        if len(units) >= n_streams:
            return units
        if self.num_rows < n_streams:
            raise DataError(
                f"{self.kind} data has {self.num_rows} rows, fewer than ranks x workers ({n_streams})"
            )
        pieces = math.ceil(n_streams / len(units))
        out = []
        for u in units:
            k = min(pieces, u.rows)
            bounds = np.linspace(u.start, u.stop, k + 1).round().astype(int)
            out.extend(Unit(u.file, u.group, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a)
        if len(out) < n_streams:  # uneven row groups: cut the largest until there are enough
            while len(out) < n_streams:
                out.sort(key=lambda u: -u.rows)
                u = out.pop(0)
                mid = (u.start + u.stop) // 2
                out += [Unit(u.file, u.group, u.start, mid), Unit(u.file, u.group, mid, u.stop)]
            out.sort(key=lambda u: (u.file, u.group, u.start))
        return out

    def read(self, unit: Unit, columns: tuple[str, ...]) -> dict[str, list]:
        """Rows of ``unit`` as column lists (``image`` bytes, ``text`` str, ``split``)."""
        fmt, path = self.formats[unit.file], self.files[unit.file]
        if fmt == "parquet":
            pf = parquet_file(path)
            names = set(pf.schema_arrow.names)
            table = pf.read_row_group(unit.group, columns=[c for c in columns if c in names])
            table = table.slice(unit.start, unit.rows)
            return {c: table.column(c).to_pylist() for c in table.column_names}
        if fmt == "folder":
            files = self._folder_cache.get(unit.file)
            if files is None:
                files = self._folder_cache[unit.file] = json.loads(path)
            out: list[bytes | None] = []
            for f in files[unit.start : unit.stop]:
                try:
                    out.append(Path(f).read_bytes())
                except OSError:
                    out.append(None)
            return {IMAGE: out}
        chunk = unit.start // _TEXT_CHUNK  # split_units may cut a chunk: skip to the unit's start within it
        first = chunk * _TEXT_CHUNK
        lines = []
        with open(path, "rb") as fh:
            fh.seek(self._text_offsets[unit.file][chunk])
            for i, raw in enumerate(fh, start=first):
                if i >= unit.stop:
                    break
                if i >= unit.start:
                    lines.append(raw.decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r"))
        return {TEXT: lines}


def _line_offsets(path: Path, every: int) -> tuple[int, list[int]]:
    """``(number of lines, byte offset of lines 0, every, 2*every, ...)`` in one read of the file."""
    offsets, pos, n = [], 0, 0
    with open(path, "rb") as f:
        for line in f:
            if n % every == 0:
                offsets.append(pos)
            pos += len(line)
            n += 1
    return n, offsets


# ------------------------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------------------------
def crop_box(width: int, height: int, rng: np.random.Generator, scale, ratio) -> tuple[float, float, float, float]:
    """torchvision ``RandomResizedCrop.get_params`` -> ``(left, top, right, bottom)`` in source pixels."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: centre crop at the nearest allowed aspect
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def decode_train(
    data: bytes, size: int, codebook_size: int | None, rng: np.random.Generator, scale, ratio
) -> tuple[np.ndarray, np.ndarray | None]:
    """One random resized crop, resized twice: ``size`` (BICUBIC, encoder) and ``codebook_size`` (LANCZOS, dVAE),
    so codebook targets align with patches. Returns uint8 HWC arrays. JPEGs are decoded at reduced size (DCT
    scaling via ``draft``) when the crop is much larger than needed; the crop is chosen in original pixels first,
    so the random choice does not depend on the decode size."""
    im = Image.open(io.BytesIO(data))
    w0, h0 = im.size
    box = crop_box(w0, h0, rng, scale, ratio)
    need = max(size, codebook_size or 0)
    # smallest crop side is >= sqrt(scale_min * ratio_min) of the image side (~0.82 at paper values); keep >= need
    im.draft("RGB", (math.ceil(need / 0.8), math.ceil(need / 0.8)))
    im = im.convert("RGB")
    sx, sy = im.size[0] / w0, im.size[1] / h0
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    enc = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=box))
    cb = None
    if codebook_size:
        cb = np.asarray(im.resize((codebook_size, codebook_size), Image.Resampling.LANCZOS, box=box))
    return enc, cb


def decode_eval(data: bytes, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (BICUBIC) and centre-crop: the evaluation transform."""
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (size, size))
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=box))


def normalize_images(pixels_u8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> CLIP-normalised float (done on the training device: batches travel as uint8)."""
    x = pixels_u8.to(dtype=torch.float32) / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def _hwc_to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------------------------
# the streaming dataset
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class DataSpec:
    """What a worker needs to turn rows into batches (everything picklable)."""

    kind: str
    batch_size: int
    image_size: int
    codebook_size: int
    grid_size: int
    text_max_length: int
    seed: int
    shuffle_buffer: int = 1000
    crop_scale: tuple = (0.9, 1.0)
    crop_ratio: tuple = (0.75, 4 / 3)
    itm_probability: float = 0.1
    mlm_probability: float = 0.15
    mask_patches: int | None = None
    mask_min_block: int | None = None
    ignore_index: int = -100
    pad_to_longest: bool = True
    prefetch_window: bool = True  # data.prefetch_window


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def _read_ahead(windows: Iterator[tuple], read, enabled: bool) -> Iterator[tuple]:
    """``(pass, window, read(units))`` in the order of ``windows``; with ``enabled`` the next window is read by a
    background thread while the caller consumes this one (a worker blocked ~5,000 rows' read per window before).
    The order, and so the cursors and exact resume, are those of the plain reads: only the time of a read moves.
    Costs one more window in memory (``data.shuffle_buffer`` rows)."""
    if not enabled:
        for pass_idx, win, units in windows:
            yield pass_idx, win, read(units)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="flava-window") as pool:
        nxt = next(windows, None)
        future = pool.submit(read, nxt[2]) if nxt is not None else None
        while future is not None:
            cur, data = nxt, future.result()
            nxt = next(windows, None)
            future = pool.submit(read, nxt[2]) if nxt is not None else None
            yield cur[0], cur[1], data


def _torch_gen(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(0, 2**62)))


class StreamingDataset(torch.utils.data.IterableDataset):
    """Infinite stream of collated batches of one kind for one rank. Worker ``w`` of ``num_workers`` serves the
    logical stream ``(w + rotate) % num_workers`` (``rotate`` keeps the round-robin order across a resume)."""

    def __init__(
        self, source: Source, spec: DataSpec, tokenizer, rank: int, world_size: int, num_workers: int,
        cursors: list | None = None, rotate: int = 0,
    ) -> None:
        super().__init__()
        self.source, self.spec, self.tokenizer = source, spec, tokenizer
        self.rank, self.world_size = rank, world_size
        self.num_logical = max(1, num_workers)
        self.n_streams = world_size * self.num_logical
        self.units = source.split_units(self.n_streams)
        self._partitions: dict[int, list[Unit]] = {}
        self.cursors = list(cursors) if cursors else [(0, 0, 0)] * self.num_logical  # positions, see parse_position
        self.rotate = rotate
        self.source_id = _SOURCE_IDS[source.kind]
        g = spec.grid_size
        n_mask = spec.mask_patches if spec.mask_patches is not None else max(1, round(75 / 196 * g * g))
        min_block = spec.mask_min_block if spec.mask_min_block is not None else max(1, round(16 / 196 * g * g))
        self.masker = BlockMaskGenerator(g, num_masking_patches=n_mask, min_num_patches=min_block)

    # -- order -----------------------------------------------------------------------------------------------
    def stream_units(self, pass_idx: int, stream: int, n_streams: int | None = None) -> list[Unit]:
        """Units of ``stream`` in pass ``pass_idx`` when the source is dealt to ``n_streams`` streams (this
        dataset's own partition by default; another one for segments inherited from a checkpoint)."""
        n = n_streams or self.n_streams
        units = self._partition(n)
        perm = _rng(self.spec.seed, self.source_id, pass_idx).permutation(len(units))
        return [units[i] for i in perm[stream::n]]

    def _partition(self, n_streams: int) -> list[Unit]:
        if n_streams == self.n_streams:
            return self.units
        if n_streams not in self._partitions:
            self._partitions[n_streams] = self.source.split_units(n_streams)
        return self._partitions[n_streams]

    def windows(self, units: list[Unit]) -> list[list[Unit]]:
        out, cur, rows = [], [], 0
        for u in units:
            cur.append(u)
            rows += u.rows
            if rows >= self.spec.shuffle_buffer:
                out.append(cur)
                cur, rows = [], 0
        if cur:
            out.append(cur)
        return out

    def rows(
        self, stream: int, cursor: tuple[int, int, int], n_streams: int | None = None, end_pass: int | None = None
    ) -> Iterator[tuple[tuple[int, int, int], dict, tuple]]:
        """``(cursor after the row, row, rng key)`` from ``cursor`` on, forever (or to the end of pass
        ``end_pass``), for ``stream`` of a partition into ``n_streams`` streams (default: this dataset's)."""
        pass_idx, win, off = cursor
        cols = REQUIRED_COLUMNS[self.source.kind] + ((SPLIT,) if self.source.split else ())
        windows = self._window_sequence(stream, pass_idx, win, n_streams, end_pass)
        for pass_idx, win, data in _read_ahead(windows, lambda units: self._read_window(units, cols),
                                               self.spec.prefetch_window):
            n = len(data[cols[0]])
            perm = _rng(self.spec.seed, self.source_id, pass_idx, stream, win).permutation(n)
            for j in range(off, n):
                i = perm[j]
                key = (self.spec.seed, self.source_id, pass_idx, stream, win, j)
                yield (pass_idx, win, j + 1), {c: data[c][i] for c in cols}, key
            off = 0

    def _window_sequence(self, stream: int, pass_idx: int, win: int, n_streams: int | None,
                         end_pass: int | None) -> Iterator[tuple[int, int, list[Unit]]]:
        """``(pass, window, units)`` of ``stream`` from ``(pass_idx, win)`` on: the order ``rows`` reads in."""
        while end_pass is None or pass_idx <= end_pass:
            wins = self.windows(self.stream_units(pass_idx, stream, n_streams))
            for w in range(win, len(wins)):
                yield pass_idx, w, wins[w]
            pass_idx, win = pass_idx + 1, 0

    def _read_window(self, units: list[Unit], cols: tuple[str, ...]) -> dict[str, list]:
        parts = [self.source.read(u, cols) for u in units]
        data: dict[str, list] = {c: [] for c in cols}
        for part in parts:  # a column a file lacks (split of an image folder) reads as None
            n_part = len(next(iter(part.values())))
            for c in cols:
                data[c].extend(part.get(c, [None] * n_part))
        return data

    # -- batches ---------------------------------------------------------------------------------------------
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotate) % self.num_logical
        stream = self.rank * self.num_logical + logical
        return self.batches(logical, stream, self.cursors[logical])

    def batches(self, logical: int, stream: int, position) -> Iterator[dict]:
        """Batches from ``position`` on. Inherited segments (see ``reshard_loader_states``) come first, one batch
        each in turn, each batch exactly the one the old stream would have made; a segment that ends mid-batch
        completes it with rows of this stream's own partition, which every stream enters once its segments are
        done. Each batch carries the position after it."""
        spec, kind = self.spec, self.source.kind
        cursor, segments, nxt = parse_position(position)
        segments = [list(seg) for seg in segments]
        main = self.rows(stream, cursor)
        seg_rows = [self.rows(seg[1], tuple(seg[3:6]), n_streams=seg[0], end_pass=seg[2]) for seg in segments]
        bad: dict[str, int] = {}
        while True:
            samples: list[dict] = []
            first_key = None
            if segments:
                i = nxt % len(segments)
                for cur, key in self._fill(samples, seg_rows[i], spec.batch_size, bad):
                    segments[i][3:6] = cur
                    first_key = key if first_key is None else first_key
                if len(samples) < spec.batch_size:  # the segment reached the end of its pass
                    del segments[i], seg_rows[i]
                    nxt = i
                else:
                    nxt = i + 1
            if len(samples) < spec.batch_size:
                for cur, key in self._fill(samples, main, spec.batch_size, bad):
                    cursor = cur
                    first_key = key if first_key is None else first_key
            batch = self._collate(samples, _rng(*first_key, 7))
            pos = dump_position(cursor, segments, nxt % len(segments) if segments else 0)
            batch["_meta"] = {"worker": logical, "cursor": pos, "bad": bad, "kind": kind}
            yield batch
            bad = {}

    def _fill(self, samples: list[dict], rows: Iterator, batch_size: int, bad: dict) -> Iterator[tuple]:
        """Take rows into `samples` until it holds `batch_size`; yields (cursor, key) per row read, key None for a
        row that gave no sample, so the caller can record its position after every row."""
        for cur, row, key in rows:
            sample = self._sample(row, key, bad)
            if sample is not None:
                samples.append(sample)
            yield cur, key if sample is not None else None
            if len(samples) == batch_size:
                return

    def _sample(self, row: dict, key: tuple, bad: dict) -> dict | None:
        spec, kind = self.spec, self.source.kind
        if self.source.split is not None and row.get(SPLIT) is not None and row[SPLIT] != self.source.split:
            bad["filtered_split"] = bad.get("filtered_split", 0) + 1
            return None
        out: dict[str, Any] = {}
        if kind in ("pairs", "text"):
            text = row.get(TEXT)
            if not isinstance(text, str) or not text.strip():
                bad["empty_text"] = bad.get("empty_text", 0) + 1
                return None
            out["text"] = text
        rng = _rng(*key)
        if kind in ("pairs", "images"):
            data = row.get(IMAGE)
            if not data:
                bad["missing_image"] = bad.get("missing_image", 0) + 1
                return None
            try:
                out["image"], out["codebook"] = decode_train(
                    data, spec.image_size, spec.codebook_size, rng, spec.crop_scale, spec.crop_ratio
                )
            except Exception:  # noqa: BLE001 - any decoder failure makes the row bad, never the run
                bad["decode_error"] = bad.get("decode_error", 0) + 1
                return None
            out["patch_mask"] = self.masker(_torch_gen(rng)).flatten()
        return out

    def _collate(self, samples: list[dict], rng: np.random.Generator) -> dict:
        spec, kind, tok = self.spec, self.source.kind, self.tokenizer
        batch: dict[str, Any] = {}
        if kind in ("pairs", "images"):
            batch["pixels"] = _hwc_to_tensor([s["image"] for s in samples])
            batch["codebook_pixels"] = _hwc_to_tensor([s["codebook"] for s in samples])
            batch["patch_mask"] = torch.stack([s["patch_mask"] for s in samples])
        if kind in ("pairs", "text"):
            g = _torch_gen(rng)
            ids, attn = tok.encode([s["text"] for s in samples], spec.text_max_length)
            masked, labels = bert_mask_tokens(
                ids, vocab_size=tok.vocab_size, mask_token_id=tok.mask_id, special_token_ids=tok.special_ids,
                attention_mask=attn, mlm_probability=spec.mlm_probability, generator=g,
                ignore_index=spec.ignore_index,
            )
            if kind == "pairs":
                idx, itm = itm_negatives(len(samples), spec.itm_probability, g)
                ids, attn, masked, labels = ids[idx], attn[idx], masked[idx], labels[idx]
                batch["itm_labels"] = itm
            if spec.pad_to_longest:  # after masking, so every random draw is that of the full-length batch
                n = int(attn.sum(1).max())
                ids, masked, attn, labels = ids[:, :n], masked[:, :n], attn[:, :n], labels[:, :n]
            batch.update(input_ids=ids, input_ids_masked=masked, attention_mask=attn, mlm_labels=labels)
        return batch


# ------------------------------------------------------------------------------------------------------------------
# stream positions, and resuming on another number of streams
# ------------------------------------------------------------------------------------------------------------------
# A stream's position is its cursor ``(pass, window, offset)`` in its own partition, or, after a resume on another
# number of processes or workers, ``{"cursor": ..., "segments": [[n_streams, stream, end_pass, pass, window,
# offset], ...], "next": i}``: streams of an older partition that this stream finishes first (to the end of
# ``end_pass``), in turn from segment ``next``.
def parse_position(position) -> tuple[tuple[int, int, int], list[tuple[int, ...]], int]:
    if isinstance(position, dict):
        try:
            cursor = tuple(int(x) for x in position["cursor"])
            segments = [tuple(int(x) for x in seg) for seg in position.get("segments", [])]
            nxt = int(position.get("next", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"unreadable loader position {position!r} ({e})") from None
        if len(cursor) != 3 or any(len(seg) != 6 for seg in segments):
            raise DataError(f"unreadable loader position {position!r}")
        return cursor, segments, nxt  # type: ignore[return-value]
    cursor = tuple(int(x) for x in position)
    if len(cursor) != 3:
        raise DataError(f"unreadable loader cursor {position!r}")
    return cursor, [], 0  # type: ignore[return-value]


def dump_position(cursor, segments=(), nxt: int = 0):
    cursor = tuple(int(x) for x in cursor)
    if not segments:
        return cursor
    return {"cursor": list(cursor), "segments": [[int(x) for x in seg] for seg in segments], "next": int(nxt)}


def _jsonable_position(position):
    return list(position) if isinstance(position, tuple) else position


def reshard_loader_states(old: list[dict], rank: int, world_size: int, num_workers: int) -> tuple[dict, dict]:
    """The loader state of ``rank`` of ``world_size`` (``num_workers`` workers each) from the loader states of
    every rank of a checkpoint written by another number of processes or workers (``old[r]`` = rank r's).

    Nothing is repeated or skipped. Old stream ``s`` (of ``S`` old streams) is finished by new stream
    ``s % S'``, to the end of pass ``P`` (the furthest pass any old stream had reached), in the old order, with the
    old crops and masks: its batches are exactly those the old run would have made, until its last one, which is
    completed with rows of the new partition. From pass ``P + 1`` on every stream reads the new partition (and
    segments the old streams had themselves inherited are finished first, in their turn). So in
    pass P (and earlier passes a lagging old stream had not finished) every row is read exactly once, as in every
    other pass. Returns ``(state, summary)``; the summary says what moved, for the log."""
    n_logical = max(1, num_workers)
    n_new = world_size * n_logical
    out: dict[str, dict] = {}
    summary: dict[str, dict] = {}
    for kind in old[0]:
        per_rank = [st[kind]["cursors"] for st in old]
        n_old_logical = len(per_rank[0])
        n_old = len(old) * n_old_logical
        streams = [parse_position(pos) for positions in per_rank for pos in positions]  # index = old stream id
        if n_old == n_new:  # the same partition: stream s continues as stream s
            positions = [dump_position(*streams[rank * n_logical + j]) for j in range(n_logical)]
            summary[kind] = {"old_streams": n_old, "new_streams": n_new, "inherited": 0}
        else:
            # a cursor (p, 0, 0) has read nothing of pass p yet
            end_pass = max(c[0] - (1 if c[1:] == (0, 0) else 0) for c, _, _ in streams)
            inherit: list[list[tuple[int, ...]]] = [[] for _ in range(n_new)]
            for s, (cursor, segs, nxt) in enumerate(streams):
                k = nxt % len(segs) if segs else 0
                own = [(n_old, s, end_pass, *cursor)] if cursor[0] <= end_pass else []
                inherit[s % n_new] += [*segs[k:], *segs[:k], *own]
            positions = [
                dump_position((end_pass + 1, 0, 0), inherit[rank * n_logical + j]) for j in range(n_logical)
            ]
            mine = sum(len(inherit[rank * n_logical + j]) for j in range(n_logical))
            summary[kind] = {"old_streams": n_old, "new_streams": n_new, "end_pass": end_pass, "inherited": mine}
        bad: dict[str, int] = {}
        if rank == 0:  # bad-row counts are cumulative and logged by rank 0: it keeps the old total
            for st in old:
                for key, v in st[kind].get("bad", {}).items():
                    bad[key] = bad.get(key, 0) + int(v)
        out[kind] = {"cursors": [_jsonable_position(p) for p in positions], "batches": 0, "bad": bad}
    return out, summary


# ------------------------------------------------------------------------------------------------------------------
# main-process side: one loader per kind, and the per-step kind choice
# ------------------------------------------------------------------------------------------------------------------
class SourceLoader:
    """A DataLoader over one kind, remembering what was consumed (per-worker cursors, batch count, bad rows)."""

    def __init__(self, dataset_args: dict, num_workers: int, prefetch_factor: int, state: dict | None = None):
        self.args = dataset_args
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        n = max(1, num_workers)
        state = state or {}
        self.cursors = [dump_position(*parse_position(c)) for c in state.get("cursors", [(0, 0, 0)] * n)]
        if len(self.cursors) != n:
            raise DataError(
                f"loader state has {len(self.cursors)} worker cursors but data.num_workers gives {n}: resume with "
                "the same number of workers"
            )
        self.batches = int(state.get("batches", 0))
        self.bad = dict(state.get("bad", {}))
        self._it = None
        self.dataset: StreamingDataset | None = None

    def _start(self) -> None:
        n = max(1, self.num_workers)
        self.dataset = StreamingDataset(**self.args, num_workers=self.num_workers, cursors=self.cursors,
                                        rotate=self.batches % n)
        if self.num_workers == 0:
            self._it = iter(self.dataset)
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
            # pinned host memory: otherwise the trainer's non_blocking copies to the GPU are synchronous
            persistent_workers=True, pin_memory=torch.cuda.is_available(),
        )
        self._it = iter(loader)

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        batch = next(self._it)
        meta = batch.pop("_meta")
        self.cursors[meta["worker"]] = dump_position(*parse_position(meta["cursor"]))
        for k, v in meta["bad"].items():
            self.bad[k] = self.bad.get(k, 0) + int(v)
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        return {"cursors": [_jsonable_position(c) for c in self.cursors], "batches": self.batches,
                "bad": dict(self.bad)}

    def close(self) -> None:
        self._it = None  # workers exit when the iterator is collected


def kind_for_step(seed: int, step: int, ratios: dict[str, float]) -> str:
    """The kind every rank takes at optimizer step ``step``: a pure function of (seed, step), so no broadcast
    and nothing to save."""
    kinds = [k for k in ("pairs", "images", "text") if float(ratios.get(k, 0)) > 0]
    if len(kinds) == 1:
        return kinds[0]
    u = _rng(seed, 0x5EED, step).random()
    acc = 0.0
    for k in kinds:
        acc += float(ratios[k])
        if u < acc:
            return k
    return kinds[-1]


class MultiSourceLoader:
    """Holds one ``SourceLoader`` per active kind; ``next(kind)`` draws a batch of that kind."""

    def __init__(
        self, sources: dict[str, Source], specs: dict[str, DataSpec], tokenizer, rank: int, world_size: int,
        num_workers: int, prefetch_factor: int = 2, state: dict | None = None,
    ) -> None:
        state = state or {}
        self.loaders = {
            kind: SourceLoader(
                dict(source=sources[kind], spec=specs[kind], tokenizer=tokenizer, rank=rank, world_size=world_size),
                num_workers, prefetch_factor, state.get(kind),
            )
            for kind in sources
        }

    def next(self, kind: str) -> dict:
        return next(self.loaders[kind])

    def state_dict(self) -> dict:
        return {k: v.state_dict() for k, v in self.loaders.items()}

    def bad_rows(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for loader in self.loaders.values():
            for k, v in loader.bad.items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()


def build_specs(run_cfg, model_cfg, seed: int | None = None) -> dict[str, DataSpec]:
    """DataSpecs for the active kinds of a RunConfig and FlavaConfig."""
    d = run_cfg.data
    common = dict(
        batch_size=run_cfg.run.micro_batch_size, image_size=model_cfg.image.image_size,
        codebook_size=model_cfg.codebook.image_size, grid_size=model_cfg.image.grid_size,
        seed=run_cfg.run.seed if seed is None else seed, shuffle_buffer=d.shuffle_buffer,
        crop_scale=tuple(d.crop_scale), crop_ratio=tuple(d.crop_ratio), itm_probability=d.itm_probability,
        mlm_probability=d.mlm_probability, mask_patches=d.mask_patches, mask_min_block=d.mask_min_block,
        ignore_index=model_cfg.ce_ignore_index, pad_to_longest=d.pad_to_longest,
        prefetch_window=d.prefetch_window,
    )
    return {
        kind: DataSpec(kind=kind, text_max_length=d.text_only_max_length if kind == "text" else d.text_max_length,
                       **common)
        for kind in d.active_kinds()
    }


def iter_texts(paths: list[str], limit: int = 1_000_000) -> Iterator[str]:
    """Captions/texts of Parquet sources (only the ``text`` column is read): the tokenizer's training corpus."""
    n = 0
    for path in paths:
        fmt, files = resolve_files(path, "text")
        for f in files:
            if fmt == "txt":
                with open(f, encoding="utf-8", errors="replace") as fh:
                    rows = [line.strip() for line in fh]
            else:
                pf = parquet_file(f)
                if TEXT not in pf.schema_arrow.names:
                    raise DataError(f"{f}: no `text` column to train a tokenizer on")
                rows = pf.read(columns=[TEXT]).column(TEXT).to_pylist()
            for t in rows:
                if t:
                    yield t
                    n += 1
                    if n >= limit:
                        return

