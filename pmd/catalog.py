"""The source catalog (manifests/sources.toml): upstream files, licences and the paper's Table 2 figures."""

from __future__ import annotations

import importlib.resources
import tomllib
from dataclasses import asdict, dataclass
from functools import lru_cache

from pmd.schema import SOURCE_NAMES

# Table 2 of the FLAVA paper, totals row.
PAPER_TOTAL_PAIRS = 70_000_000
PAPER_AVG_WORDS = 12.1
# Whether a pair's licence allows commercial use.
COMMERCIAL: tuple[str, ...] = ("allowed", "not", "unknown")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    paper_ref: int
    metadata: tuple[str, ...]
    format: str
    images: str  # "url" | "archive"
    image_archives: tuple[str, ...]
    manual: bool
    licence: str
    homepage: str
    table2_pairs: int
    table2_avg_words: float
    max_caption_chars: int
    max_caption_words: int
    table2_apportioned: bool = False
    pair_licence: str = ""
    commercial: str = "unknown"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metadata"] = list(self.metadata)
        d["image_archives"] = list(self.image_archives)
        return d


class CatalogError(ValueError):
    pass


def _parse(raw: dict) -> tuple[CatalogEntry, ...]:
    entries = []
    fields = set(CatalogEntry.__dataclass_fields__)
    for row in raw.get("source", []):
        unknown = set(row) - fields
        if unknown:
            raise CatalogError(f"catalog entry {row.get('name')!r} has unknown fields {sorted(unknown)}")
        row = dict(row)
        row["metadata"] = tuple(row["metadata"])
        row["image_archives"] = tuple(row["image_archives"])
        entry = CatalogEntry(**row)
        if entry.commercial not in COMMERCIAL:
            raise CatalogError(f"{entry.name}: commercial must be one of {COMMERCIAL}, not {entry.commercial!r}")
        if entry.images not in ("url", "archive"):
            raise CatalogError(f"{entry.name}: images must be 'url' or 'archive', not {entry.images!r}")
        entries.append(entry)
    names = tuple(e.name for e in entries)
    if names != SOURCE_NAMES:
        raise CatalogError(f"catalog sources {names} differ from the schema's {SOURCE_NAMES}")
    return tuple(entries)


@dataclass(frozen=True)
class ManualStep:
    """A file a program cannot fetch (login, form, click-through): what it is and what the user must do."""

    sources: tuple[str, ...]
    what: str
    step: str
    url_prefix: str = ""  # empty: a step for the sources' images, not a metadata URL

    def matches(self, url: str) -> bool:
        return bool(self.url_prefix) and url.startswith(self.url_prefix)


@lru_cache(maxsize=1)
def _raw_catalog() -> dict:
    return tomllib.loads((importlib.resources.files("manifests") / "sources.toml").read_text())


@lru_cache(maxsize=1)
def load_catalog() -> tuple[CatalogEntry, ...]:
    return _parse(_raw_catalog())


@lru_cache(maxsize=1)
def manual_steps() -> tuple[ManualStep, ...]:
    steps = []
    for row in _raw_catalog().get("manual", []):
        step = ManualStep(**{**row, "sources": tuple(row["sources"])})
        unknown = set(step.sources) - set(SOURCE_NAMES)
        if unknown:
            raise CatalogError(f"manual step {step.what!r} names unknown sources {sorted(unknown)}")
        steps.append(step)
    return tuple(steps)


def catalog_entry(name: str) -> CatalogEntry:
    for entry in load_catalog():
        if entry.name == name:
            return entry
    raise KeyError(name)
