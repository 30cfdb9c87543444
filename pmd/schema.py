"""The pair schema: the one contract shared by every stage that writes or reads pairs.

Column names compatible with the published PMD loader (`text`, `image_url`, `source`, `meta`), extended with a
stable `key`, an `image_ref` for archive sources, a `split`, and the YFCC language decision.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

SCHEMA_VERSION = 1

# Source names exactly as the published `facebook/pmd` loader spells them.
SOURCE_NAMES: tuple[str, ...] = (
    "coco",
    "sbu_captions",
    "localized_narratives__coco",
    "localized_narratives__flickr30k",
    "localized_narratives__ADE20k",
    "localized_narratives__openimages",
    "conceptual_captions",
    "visual_genome",
    "wit",
    "conceptual_12m",
    "red_caps",
    "yfcc100m",
)

SPLITS: tuple[str, ...] = ("train", "validation", "test")

KEY = "key"
SOURCE = "source"
TEXT = "text"
IMAGE_URL = "image_url"
IMAGE_REF = "image_ref"
SPLIT = "split"
META = "meta"
LANG = "lang"
LANG_SCORE = "lang_score"

_METADATA = {b"pmd.schema": b"pair", b"pmd.schema_version": str(SCHEMA_VERSION).encode()}

PAIR_SCHEMA = pa.schema(
    [
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(TEXT, pa.string(), nullable=False),
        pa.field(IMAGE_URL, pa.string()),
        pa.field(IMAGE_REF, pa.string()),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(META, pa.string(), nullable=False),
        pa.field(LANG, pa.string()),
        pa.field(LANG_SCORE, pa.float32()),
    ],
    metadata=_METADATA,
)

# Where a rejected input row came from and why: enough to find the row again in the upstream file.
REASON = "reason"
DETAIL = "detail"
INPUT_FILE = "input_file"
POSITION = "position"
RECORD = "record"

REJECT_SCHEMA = pa.schema(
    [
        pa.field(KEY, pa.string()),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(DETAIL, pa.string()),
        pa.field(INPUT_FILE, pa.string(), nullable=False),
        # 1-based line number for line formats, 0-based element index for JSON arrays.
        pa.field(POSITION, pa.int64(), nullable=False),
        pa.field(RECORD, pa.string()),
        pa.field(LANG, pa.string()),
        pa.field(LANG_SCORE, pa.float32()),
    ],
    metadata={b"pmd.schema": b"reject", b"pmd.schema_version": str(SCHEMA_VERSION).encode()},
)

# A candidate (what ingest writes and the image stage reads) is a pair plus what only the image stage needs: the
# region to crop the image to (Visual Genome), in pixels of the upright full-size image; null = the whole image.
# Shards keep PAIR_SCHEMA: the crop is spent making the image (the adapter's `meta` also records it).
CROP = "crop"
CROP_TYPE = pa.struct([pa.field(name, pa.int32()) for name in ("x", "y", "width", "height")])
CANDIDATE_SCHEMA = pa.schema(
    [*PAIR_SCHEMA, pa.field(CROP, CROP_TYPE)],
    metadata={b"pmd.schema": b"candidate", b"pmd.schema_version": str(SCHEMA_VERSION).encode()},
)

PAIR_COLUMNS: tuple[str, ...] = tuple(PAIR_SCHEMA.names)


def schema_version(schema: pa.Schema) -> int | None:
    """The pmd schema version stored in a Parquet/Arrow schema's metadata, or None if it is not one of ours."""
    raw = (schema.metadata or {}).get(b"pmd.schema_version")
    return int(raw) if raw is not None else None


# ------------------------------------------------------------------------------------------------- shards
# A built corpus: the pair columns plus the image, re-encoded once, with its digest and sizes before/after resizing.
IMAGE = "image"
IMAGE_SHA256 = "image_sha256"
WIDTH = "width"
HEIGHT = "height"
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"

SHARD_SCHEMA = pa.schema(
    [
        *PAIR_SCHEMA,
        pa.field(IMAGE, pa.binary(), nullable=False),
        pa.field(IMAGE_SHA256, pa.string(), nullable=False),
        pa.field(WIDTH, pa.int32(), nullable=False),
        pa.field(HEIGHT, pa.int32(), nullable=False),
        pa.field(ORIGINAL_WIDTH, pa.int32(), nullable=False),
        pa.field(ORIGINAL_HEIGHT, pa.int32(), nullable=False),
    ],
    metadata={b"pmd.schema": b"shard", b"pmd.schema_version": str(SCHEMA_VERSION).encode()},
)
SHARD_COLUMNS: tuple[str, ...] = tuple(SHARD_SCHEMA.names)
# Everything but the image bytes: what statistics and audits read.
SHARD_METADATA_COLUMNS: tuple[str, ...] = tuple(n for n in SHARD_COLUMNS if n != IMAGE)

# Where a candidate that did not become a shard row went, and why (download, decode, checks, dedup).
STAGE = "stage"
FAILURE_SCHEMA = pa.schema(
    [
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(IMAGE_URL, pa.string()),
        pa.field(IMAGE_REF, pa.string()),
        pa.field(STAGE, pa.string(), nullable=False),  # a pmd.reasons.Stage (read, download, ... takedown)
        pa.field(REASON, pa.string(), nullable=False),  # a pmd.reasons.Reason, or http_reason(status)
        pa.field(DETAIL, pa.string()),
    ],
    metadata={b"pmd.schema": b"failure", b"pmd.schema_version": str(SCHEMA_VERSION).encode()},
)


# Columns whose min/max prune nothing (free text, JSON, URLs, bytes) but cost a comparison per value to compute: for
# YFCC's ~650-byte `meta` a third of the column's write time.
_NO_STATISTICS = frozenset({IMAGE, TEXT, META, IMAGE_URL, DETAIL, RECORD})


def parquet_options(names: Sequence[str]) -> dict:
    """How the columns are stored in Parquet (pyarrow.parquet.write_table keywords). The image column is stored
    uncompressed and without dictionary (JPEG bytes do not compress; zstd over them costs CPU for nothing); the
    metadata columns are zstd-compressed. Statistics only where a reader can prune with them (keys, ids, categories,
    numbers)."""
    return {"compression": {name: ("none" if name == IMAGE else "zstd") for name in names},
            "use_dictionary": [n for n in names if n not in (IMAGE, IMAGE_SHA256, KEY)],
            "write_statistics": [n for n in names if n not in _NO_STATISTICS]}
