"""Evaluation images kept out of the corpus by perceptual hash, whatever source an image came from.

The user gives the evaluation images (`--decontaminate-against PATH`, repeatable: folders, zips, tars; each PATH is
one evaluation set, named by its file or folder name). Each is hashed once with pHash (`imagehash.phash`: the DCT
of a 32x32 greyscale thumbnail, 64 bits); every processed corpus image is hashed the same way, from the pixels the
image stage holds before it encodes them (`process_image(..., with_phash=True)`: no second decode), and compared
with all of them. A Hamming distance at or below the threshold is an overlap: the pair becomes a failure with reason
`eval_overlap` whose detail names the evaluation image (`SET!MEMBER (hamming D)`).

The default threshold (`DEFAULT_THRESHOLD`) was chosen on measured distances of resized, re-encoded and cropped
copies against distances between different images (benchmarks/eval_overlap_threshold.py, figures in
docs/benchmarks.md). An evaluation set is small (Flickr30k test 1,000, COCO Karpathy val+test 10,000), so a
comparison is one XOR and popcount over a uint64 array per corpus image: ~0.02 ms at 10,000 hashes and ~0.1 ms at
100,000 (benchmarks/bench_images.py --screen), where a multi-index would not pay for its lookups.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pmd import schema, storage
from pmd.archives import ArchiveIndex
from pmd.reasons import Reason, Stage

log = logging.getLogger(__name__)


class DecontaminationError(ValueError):
    """An evaluation set that cannot be used: unreadable, empty, or named twice."""


EVAL_OVERLAP = Reason.EVAL_OVERLAP
#: The failure stage of both screens (an overlapping image is not an image failure: it is removed on purpose).
STAGE = Stage.DECONTAMINATE
#: Largest pHash Hamming distance still taken for the same picture (see the module docstring).
DEFAULT_THRESHOLD = 10
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
#: Between the evaluation set and the image in an `eval_overlap` detail: `SET!IMAGE ...`.
SET_SEPARATOR = "!"
#: The pHash the image stage computes from its pixels before encoding is within this Hamming distance of the hash of
#: the stored JPEG decoded again (measured: 0 for 54 and 2 for 14 of 68 generated and real photos from 480 to 1536
#: px tall, benchmarks/bench_images.py's sets; tests/pmd/test_decontaminate.py checks it). Small beside
#: DEFAULT_THRESHOLD.
PIXEL_HASH_TOLERANCE = 2
_PHASH_SIDE = 32  # imagehash.phash's thumbnail (hash_size 8 x highfreq_factor 4)


def phash(image: Image.Image) -> int:
    """The 64-bit pHash of an image as an int (EXIF orientation applied, so a rotated upload hashes as shown)."""
    return _as_int(imagehash.phash(ImageOps.exif_transpose(image)))


def phash_pixels(image: Image.Image) -> int:
    """The pHash of the image stage's own pixels (upright, resized, before they are encoded): the 32x32 LANCZOS
    thumbnail is made after a box reduction (`reducing_gap=2`), 0.3 ms instead of 0.7 ms from 341x256, and the hash
    stays within PIXEL_HASH_TOLERANCE of `phash` of the stored JPEG."""
    thumbnail = image.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return _as_int(imagehash.phash(thumbnail))  # at 32x32 already: imagehash's own resize changes nothing


def _as_int(value: imagehash.ImageHash) -> int:
    return int(np.packbits(value.hash.flatten()).view(">u8")[0])


def phash_bytes(data: bytes) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return phash(image)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class Match:
    eval_set: str
    image: str  # member path inside the evaluation set
    distance: int

    @property
    def detail(self) -> str:
        return f"{self.eval_set}{SET_SEPARATOR}{self.image} (hamming {self.distance})"


def eval_set_of(detail: str | None) -> str | None:
    """The evaluation set named by an `eval_overlap` detail (the inverse of `Match.detail`)."""
    if not detail or SET_SEPARATOR not in detail:
        return None
    return detail.split(SET_SEPARATOR, 1)[0]


class EvalHashIndex:
    """pHashes of the evaluation images; `check` finds the nearest one within the threshold."""

    def __init__(self, hashes: np.ndarray, names: Sequence[str], set_ids: np.ndarray, set_names: Sequence[str],
                 threshold: int = DEFAULT_THRESHOLD):
        if not 0 <= threshold < 64:
            raise ValueError(f"the Hamming threshold must be within [0, 63], got {threshold}")
        if not len(hashes) == len(names) == len(set_ids):
            raise ValueError("hashes, names and set ids must have the same length")
        self.hashes = np.asarray(hashes, dtype=np.uint64)
        self.names = list(names)
        self.set_ids = np.asarray(set_ids, dtype=np.int32)
        self.set_names = list(set_names)
        self.threshold = threshold

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def build(cls, paths: Iterable[Path | str], threshold: int = DEFAULT_THRESHOLD) -> EvalHashIndex:
        """Hash every image of every evaluation set. An image that does not decode is logged and left out (it
        could not be matched anyway); a set with no image at all is an error, since it would protect nothing."""
        hashes: list[int] = []
        names: list[str] = []
        set_ids: list[int] = []
        set_names: list[str] = []
        for path in paths:
            path = storage.location(path)
            set_name = storage.basename(path)
            if set_name in set_names:
                raise DecontaminationError(f"two evaluation sets are named {set_name!r}; give them different names")
            set_id = len(set_names)
            set_names.append(set_name)
            found = bad = 0
            for member, data in iter_images(path):
                try:
                    value = phash_bytes(data)
                except Exception as exc:  # noqa: BLE001 - any decoder error: that image cannot be matched
                    bad += 1
                    log.warning("evaluation image %s!%s does not decode (%s); left out", set_name, member, exc)
                    continue
                hashes.append(value)
                names.append(member)
                set_ids.append(set_id)
                found += 1
            if not found:
                raise DecontaminationError(f"{path}: no readable image in this evaluation set")
            log.info("evaluation set %s: %d images hashed, %d unreadable", set_name, found, bad)
        return cls(np.array(hashes, dtype=np.uint64), names, np.array(set_ids, dtype=np.int32), set_names,
                   threshold)

    def distances(self, value: int) -> np.ndarray:
        return np.bitwise_count(self.hashes ^ np.uint64(value))

    def check(self, image: Image.Image) -> Match | None:
        return self.check_hash(phash(image))

    def check_bytes(self, data: bytes) -> Match | None:
        return self.check_hash(phash_bytes(data))

    def check_hash(self, value: int) -> Match | None:
        """The nearest evaluation image within the threshold (the first one on a tie), or None."""
        if not len(self.hashes):
            return None
        d = self.distances(value)
        i = int(np.argmin(d))
        if d[i] > self.threshold:
            return None
        return Match(self.set_names[self.set_ids[i]], self.names[i], int(d[i]))


def iter_images(path: Path | str) -> Iterator[tuple[str, bytes]]:
    """(member path, bytes) of the image files in a folder, zip or tar (compressed too), in a stable order."""
    with ArchiveIndex.build([path]) as archive:
        refs = sorted(r for r in archive.refs() if Path(r).suffix.lower() in IMAGE_SUFFIXES)
        if not refs:
            raise DecontaminationError(
                f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this evaluation set")
        for ref, data, error in archive.read_many(refs):
            if data is None:
                log.warning("evaluation image %s!%s cannot be read (%s); left out", storage.basename(path), ref,
                            error)
                continue
            yield ref, data


def screen(result: object, index: EvalHashIndex | None, reject: type[Exception]) -> object:
    """The image stage's hook: a processed image (anything with `.data`, JPEG bytes, and `.phash`, its pHash or
    None) that matches an evaluation image becomes `reject(EVAL_OVERLAP, detail)`; anything else (a rejection, no
    index) passes through. Without `.phash` the stored JPEG is decoded and hashed."""
    if index is None or isinstance(result, Exception):
        return result
    value = getattr(result, "phash", None)
    match = index.check_bytes(result.data) if value is None else index.check_hash(value)
    return result if match is None else reject(EVAL_OVERLAP, match.detail)


def eval_overlap_counts(failures: Sequence[Path] | pa.Table) -> dict[str, dict[str, int]]:
    """source -> evaluation set -> pairs removed as `eval_overlap` (by photo id or by pHash), read from failure
    files (or one failure table): what `pmd stats` reports beside the per-reason counts."""
    if isinstance(failures, pa.Table):
        tables = [failures.filter(pc.equal(failures.column(schema.REASON), EVAL_OVERLAP))]
    else:
        tables = []
        for path in failures:
            try:
                tables.append(pq.read_table(storage.open_input(path),
                                            columns=[schema.SOURCE, schema.REASON, schema.DETAIL],
                                            filters=[(schema.REASON, "=", EVAL_OVERLAP)]))
            except (OSError, pa.ArrowException) as exc:  # the audit reports unreadable failure files itself
                log.warning("%s: not read for eval_overlap counts (%s)", path, exc)
    counts: dict[str, dict[str, int]] = {}
    for table in tables:
        for source, detail in zip(table.column(schema.SOURCE).to_pylist(), table.column(schema.DETAIL).to_pylist()):
            per = counts.setdefault(source, {})
            eval_set = eval_set_of(detail) or "unknown"
            per[eval_set] = per.get(eval_set, 0) + 1
    return {s: dict(sorted(v.items())) for s, v in sorted(counts.items())}
