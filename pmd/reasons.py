"""The names a row's fate is recorded under: the stage where a candidate stopped (`stage` of FAILURE_SCHEMA) and the
reason of a rejection or failure (`reason` of REJECT_SCHEMA and FAILURE_SCHEMA). One enumeration each, here.

Both are `StrEnum`s: a member *is* its string (`Stage.READ == "read"`, `f"{Reason.TIMEOUT}"` is `"timeout"`), so
Parquet files, manifests and reports hold the same bytes as when these were literals. Adding a reason is one line
in `Reason`. A polars expression must be given `.value` (polars would take a bare member for an Enum literal).

HTTP statuses are reasons too, but a family, not members: `http_reason(404)` is `"http_404"`.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """Where a candidate that is not a shard row stopped, in the order a candidate meets them."""

    READ = "read"  # an archive member read (archive sources)
    DOWNLOAD = "download"  # a URL fetched (URL sources)
    DECODE = "decode"  # the bytes are not an image Pillow opens
    CHECK = "check"  # the image fails a check of pmd.images (size, aspect ratio, pixels, box)
    DECONTAMINATE = "decontaminate"  # an evaluation image (Flickr id or pHash)
    DEDUP = "dedup"  # the same image and text as a pair kept
    TAKEDOWN = "takedown"  # removed on request after the build (pmd.takedown)


#: The stages of the image stage proper: a failure there means no usable image came of the candidate.
IMAGE_STAGES: tuple[Stage, ...] = (Stage.READ, Stage.DOWNLOAD, Stage.DECODE, Stage.CHECK)


class Reason(StrEnum):
    """Why an input row was rejected (ingest) or a candidate failed (image stage, dedup, takedown): short, stable,
    machine-readable strings that reports group on."""

    # -- ingest: a row of an upstream file that gives no candidate
    MALFORMED = "malformed"  # a line or element that does not parse (bad JSON, bad escape, missing key)
    WRONG_FIELD_COUNT = "wrong_field_count"
    INVALID_UTF8 = "invalid_utf8"
    EMPTY_TEXT = "empty_text"
    NO_URL = "no_url"  # also a URL-source candidate without an image_url
    NOT_ENGLISH = "not_english"
    TOO_SHORT = "too_short"
    VIDEO = "video"
    DECONTAMINATED = "decontaminated"  # image in an evaluation split (Karpathy COCO val/test)
    DUPLICATE_KEY = "duplicate_key"
    NO_IMAGE_METADATA = "no_image_metadata"  # e.g. a Visual Genome region whose image is not in image_data.json
    BAD_BOX = "bad_box"  # also an image check: a crop box outside the image
    LINE_TOO_LONG = "line_too_long"  # a line over limits.MAX_LINE_BYTES: skipped unread, the rest of the file read
    TOO_LONG = "too_long"  # a caption over its source's max_caption_chars / max_caption_words (sources.toml)
    NO_OUTPUT = "no_output"  # an adapter produced nothing for a record: recorded, never silently dropped

    # -- read: an archive member (pmd.archives)
    MISSING_MEMBER = "missing_member"
    ARCHIVE_ERROR = "archive_error"
    NO_IMAGE_REF = "no_image_ref"  # an archive-source candidate without an image_ref
    TOO_LARGE = "too_large"  # also a download body or an image over its byte cap

    # -- download (pmd.http_client, pmd.download); HTTP statuses are http_reason(status)
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    TRUNCATED_BODY = "truncated_body"
    DOWNLOAD_ERROR = "download_error"
    REDIRECT_ERROR = "redirect_error"
    OPTED_OUT = "opted_out"  # X-Robots-Tag noai/noimageai/noindex/noimageindex
    ROBOTS_DISALLOWED = "robots_disallowed"  # robots.txt disallows the URL (pmd.robots); never requested
    ROBOTS_UNAVAILABLE = "robots_unavailable"  # robots.txt answered 5xx: disallowed for now, transient
    PLACEHOLDER = "placeholder"  # a host's stand-in for a removed image (pmd.placeholders)
    BLOCKED_ADDRESS = "blocked_address"  # not a globally routable address, nor allowed (pmd.netguard); never sent
    DNS_NXDOMAIN = "dns_nxdomain"  # the host name does not exist / has no address (pmd.resolver): permanent
    DNS_ERROR = "dns_error"  # the resolver failed or timed out (pmd.resolver): transient

    # -- decode and check (pmd.images)
    DECODE_ERROR = "decode_error"
    TOO_SMALL = "too_small"
    ASPECT_RATIO = "aspect_ratio"
    TOO_MANY_PIXELS = "too_many_pixels"

    # -- decontaminate, dedup, takedown
    EVAL_OVERLAP = "eval_overlap"
    DUPLICATE = "duplicate"
    TAKEDOWN = "takedown"


HTTP_PREFIX = "http_"


def http_reason(status: int) -> str:
    """The reason of a download answered with an HTTP error status: `http_404`."""
    return f"{HTTP_PREFIX}{status}"
