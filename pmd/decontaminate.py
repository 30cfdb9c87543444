"""Evaluation images kept out of the corpus by perceptual hash, whatever source an image came from.

The user gives the evaluation images (`--decontaminate-against PATH`, repeatable: folders, zips, tars; each PATH is
one evaluation set, named by its file or folder name). Each is hashed once with pHash (`imagehash.phash`: the DCT
of a 32x32 greyscale thumbnail, 64 bits); every processed corpus image is hashed the same way and compared with all
of them. A Hamming distance at or below the threshold is an overlap: the pair becomes a failure with reason
`eval_overlap` whose detail names the evaluation image (`SET!MEMBER (hamming D)`).

The default threshold (`DEFAULT_THRESHOLD`) was chosen on measured distances of resized, re-encoded and cropped
copies against distances between different images (benchmarks/eval_overlap_threshold.py, figures in
docs/benchmarks.md). An evaluation set is small (Flickr30k test 1,000, COCO Karpathy val+test 10,000), so a
comparison is one XOR and popcount over a uint64 array per corpus image.
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

log = logging.getLogger(__name__)


class DecontaminationError(ValueError):
    """An evaluation set that cannot be used: unreadable, empty, or named twice."""


EVAL_OVERLAP = "eval_overlap"
#: The failure stage of both screens (an overlapping image is not an image failure: it is removed on purpose).
STAGE = "decontaminate"
#: Largest pHash Hamming distance still taken for the same picture (see the module docstring).
DEFAULT_THRESHOLD = 10
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
#: Between the evaluation set and the image in an `eval_overlap` detail: `SET!IMAGE ...`.
SET_SEPARATOR = "!"


def phash(image: Image.Image) -> int:
    """The 64-bit pHash of an image as an int (EXIF orientation applied, so a rotated upload hashes as shown)."""
    image = ImageOps.exif_transpose(image)
    bits = imagehash.phash(image).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0])


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
            path = Path(path)
            set_name = path.name
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


def iter_images(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member path, bytes) of the image files in a folder, zip or tar (compressed too), in a stable order."""
    with ArchiveIndex.build([path]) as archive:
        refs = sorted(r for r in archive.refs() if Path(r).suffix.lower() in IMAGE_SUFFIXES)
        if not refs:
            raise DecontaminationError(
                f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this evaluation set")
        for ref, data, error in archive.read_many(refs):
            if data is None:
                log.warning("evaluation image %s!%s cannot be read (%s); left out", path.name, ref, error)
                continue
            yield ref, data


def screen(result: object, index: EvalHashIndex | None, reject: type[Exception]) -> object:
    """The image stage's hook: a processed image (anything with `.data`, JPEG bytes) that matches an evaluation
    image becomes `reject(EVAL_OVERLAP, detail)`; anything else (a rejection, no index) passes through."""
    if index is None or isinstance(result, Exception):
        return result
    match = index.check_bytes(result.data)
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
