"""Under which licence each pair's image may be used, and whether that allows commercial use.

Where the upstream row states a licence (YFCC100M's per-photo `license_url`, kept in the pair's `meta`), that is
the pair's licence; otherwise the source's `pair_licence` and `commercial` from the catalog. Creative Commons
licences are named from their deed URL (`.../licenses/by-nc-sa/2.0/` -> `CC BY-NC-SA 2.0`); NC licences forbid
commercial use, the other CC licences, CC0 and the public-domain marks allow it. Vectorised over polars frames, so
the audit classifies a row group at a time.
"""

from __future__ import annotations

import re
from functools import lru_cache

import polars as pl

from pmd import schema
from pmd.catalog import load_catalog

LICENCE = "licence"
COMMERCIAL_USE = "commercial"
# meta keys holding a row's own licence URL, per source
_ROW_LICENCE_URL = {"yfcc100m": "$.license_url"}
_CC = re.compile(r"creativecommons\.org/licenses/([a-z-]+)/(\d+(?:\.\d+)?)")
_PUBLIC = {"creativecommons.org/publicdomain/zero": "CC0",
           "creativecommons.org/publicdomain/mark": "Public Domain Mark",
           "flickr.com/commons/usage": "No known copyright restrictions"}


@lru_cache(maxsize=4096)
def classify_url(url: str) -> tuple[str, str] | None:
    """(licence, commercial) of a licence deed URL; None when the URL names no licence we know."""
    m = _CC.search(url)
    if m:
        kind, version = m.group(1), m.group(2)
        return f"CC {kind.upper()} {version}", "not" if "nc" in kind.split("-") else "allowed"
    for fragment, name in _PUBLIC.items():
        if fragment in url:
            return name, "allowed"
    return None


def _catalog_columns() -> tuple[dict[str, str], dict[str, str]]:
    catalog = load_catalog()
    return {e.name: e.pair_licence for e in catalog}, {e.name: e.commercial for e in catalog}


def with_licences(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` (with `source` and `meta` columns) plus `licence` and `commercial` columns, one per pair."""
    licence_of, commercial_of = _catalog_columns()
    out = frame.with_columns(pl.col(schema.SOURCE).replace_strict(licence_of, default="unknown source")
                             .alias(LICENCE),
                             pl.col(schema.SOURCE).replace_strict(commercial_of, default="unknown")
                             .alias(COMMERCIAL_USE))
    for source, path in _ROW_LICENCE_URL.items():
        mask = out[schema.SOURCE] == source
        if not mask.any():
            continue
        urls = out.filter(mask)[schema.META].str.json_path_match(path)
        # Few distinct licences: classify each distinct URL once.
        known = {u: classify_url(u) for u in urls.drop_nulls().unique().to_list()}
        names = urls.replace_strict({u: c[0] for u, c in known.items() if c}, default=None, return_dtype=pl.String)
        uses = urls.replace_strict({u: c[1] for u, c in known.items() if c}, default=None, return_dtype=pl.String)
        idx = mask.arg_true()
        out = out.with_columns(
            out[LICENCE].scatter(idx, names.fill_null(f"{source}: licence not stated in the row")),
            out[COMMERCIAL_USE].scatter(idx, uses.fill_null("unknown")))
    return out


def licence_counts(frame: pl.DataFrame) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Pairs per (source, licence) and per (source, commercial use) in `frame`; partial counts a caller adds up."""
    tagged = with_licences(frame.select(schema.SOURCE, schema.META))
    by_licence: dict[str, dict[str, int]] = {}
    by_use: dict[str, dict[str, int]] = {}
    for source, licence, n in tagged.group_by(schema.SOURCE, LICENCE).len().iter_rows():
        by_licence.setdefault(source, {})[licence] = n
    for source, use, n in tagged.group_by(schema.SOURCE, COMMERCIAL_USE).len().iter_rows():
        by_use.setdefault(source, {})[use] = n
    return by_licence, by_use
