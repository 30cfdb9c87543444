"""Placeholder images: what a host serves in place of a removed image, failed as `placeholder`, never a pair.

Two rules:
- known placeholders, per source, from the catalog (manifests/sources.toml `[[placeholder]]`): a download
  redirected to one of a rule's `redirect_paths` fails before its body is read; a body whose sha256 is one of
  its digests fails after it. Flickr answers a removed photo with a redirect to its "photo unavailable" image.
- the generic rule, in the final phase: the same image bytes (image_sha256) served for at least
  `placeholder_min_urls` distinct URLs (DEFAULT_PLACEHOLDER_MIN_URLS) are a placeholder whatever the host: every
  row of that digest fails `placeholder`. A real image is rarely at 20 URLs of one corpus (re-uploads are
  re-encoded: other bytes); a placeholder is under every dead URL of its host. Every row of one digest lies in
  one bucket of the final phase (pmd.final), so the rule is decided there, one bucket at a time.
`pmd stats` lists the digests failed so, with a sample of their URLs (pmd.stats), to add to the catalog.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from urllib3.util import parse_url

from pmd import schema, storage

log = logging.getLogger(__name__)

PLACEHOLDER = "placeholder"  # the failure reason, download and final phase alike
DEFAULT_PLACEHOLDER_MIN_URLS = 20


@dataclass(frozen=True)
class Placeholders:
    """The known placeholders of one source (or of every source, for a download without one)."""

    redirect_paths: tuple[str, ...] = ()
    digests: frozenset[str] = frozenset()

    def redirect(self, location: str) -> str | None:
        """A detail if a redirect to `location` is a known placeholder, else None."""
        if not self.redirect_paths:
            return None
        try:
            path = parse_url(location).path or "/"
        except Exception:  # noqa: BLE001 - an unparseable location is the redirect's own failure
            return None
        for pattern in self.redirect_paths:
            if fnmatch.fnmatchcase(path, pattern):
                return f"{_REDIRECT_PREFIX}{location}"[:500]
        return None

    def body(self, data: bytes) -> str | None:
        """A detail if `data` is a known placeholder image, else None (hashed only when digests are known)."""
        if not self.digests:
            return None
        digest = hashlib.sha256(data).hexdigest()
        return f"known placeholder image sha256 {digest}" if digest in self.digests else None


@lru_cache(maxsize=64)
def for_source(source: str | None) -> Placeholders:
    """The catalog's placeholders of `source`; None: every source's."""
    from pmd.catalog import placeholder_rules

    rules = [r for r in placeholder_rules() if source is None or source in r.sources]
    return Placeholders(tuple(dict.fromkeys(p for r in rules for p in r.redirect_paths)),
                        frozenset(d for r in rules for d in r.sha256))


PLACEHOLDER_URLS = "placeholder_urls"  # column of `mark`: distinct URLs that served the row's image


def mark(meta: pl.DataFrame, min_urls: int) -> pl.DataFrame:
    """`meta` (columns image_sha256, image_url; the rows of whole digests: a final-phase bucket) with
    PLACEHOLDER_URLS, the distinct URLs its image was served for, and PLACEHOLDER: whether that is at least
    `min_urls` (0: the rule is off). Rows without a URL (archive members) count none, but share their digest's
    fate."""
    urls = pl.col(schema.IMAGE_URL).drop_nulls().n_unique().over(schema.IMAGE_SHA256)
    meta = meta.with_columns(pl.when(pl.col(schema.IMAGE_SHA256).is_null()).then(0).otherwise(urls)
                             .cast(pl.Int64).alias(PLACEHOLDER_URLS))
    flag = (pl.col(PLACEHOLDER_URLS) >= min_urls) if min_urls else pl.lit(False)
    return meta.with_columns(flag.alias(PLACEHOLDER))


def detail(digest: str, urls: int) -> str:
    return f"image sha256 {digest} served for {urls} distinct URLs: a placeholder"


_DIGEST = re.compile(r"sha256 ([0-9a-f]{64})")
_REDIRECT_PREFIX = "redirected to a known placeholder: "
SAMPLE_URLS = 5


def report(failure_files: Sequence[str | Path], sample: int = SAMPLE_URLS) -> list[dict]:
    """What `pmd stats` says of the build's placeholder failures: one entry per placeholder (an image digest, or
    the redirect target of a known one) with its rows, distinct URLs, sources and a sample of the URLs (the
    first in URL order), most rows first. Reads only the failures of reason PLACEHOLDER."""
    frames = []
    for path in failure_files:
        try:
            table = pq.read_table(storage.open_input(path), columns=[schema.SOURCE, schema.IMAGE_URL, schema.DETAIL],
                                  filters=[(schema.REASON, "=", PLACEHOLDER)])
        except (OSError, pa.ArrowException) as exc:  # the audit reports unreadable failure files itself
            log.warning("%s: not read for the placeholder report (%s)", path, exc)
            continue
        if table.num_rows:
            frames.append(pl.from_arrow(table))
    if not frames:
        return []
    rows = pl.concat(frames)
    detail = pl.col(schema.DETAIL).fill_null("")
    rows = rows.with_columns(
        pl.when(detail.str.starts_with(_REDIRECT_PREFIX)).then(pl.lit("redirect"))
        .when(detail.str.starts_with("known placeholder")).then(pl.lit("known_digest"))
        .otherwise(pl.lit("many_urls")).alias("rule"),
        detail.str.extract(_DIGEST.pattern, 1).alias("sha256"),
        pl.when(detail.str.starts_with(_REDIRECT_PREFIX)).then(detail.str.slice(len(_REDIRECT_PREFIX)))
        .alias("redirect"))
    out = []
    for (rule, digest, target), group in rows.group_by(["rule", "sha256", "redirect"]):
        urls = group.get_column(schema.IMAGE_URL).drop_nulls().unique().sort()
        entry = {"rule": rule, "sha256": digest, "rows": group.height, "urls": urls.len(),
                 "sources": dict(sorted(group.get_column(schema.SOURCE).value_counts().iter_rows())),
                 "sample_urls": urls.head(sample).to_list()}
        if target is not None:
            entry["redirect"] = target
        out.append(entry)
    return sorted(out, key=lambda e: (-e["rows"], e["rule"], e["sha256"] or "", e.get("redirect") or ""))
