"""The source catalog (manifests/sources.toml): upstream files, licences and the paper's Table 2 figures."""

from __future__ import annotations

import importlib.resources
import tomllib
from dataclasses import asdict, dataclass
from functools import lru_cache

from pmd.config_loader import ConfigError, Where, from_dict
from pmd.schema import SOURCE_NAMES

CATALOG_FILE = "manifests/sources.toml"
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

    def __post_init__(self) -> None:
        if self.commercial not in COMMERCIAL:
            raise ValueError(f"{self.name}: commercial must be one of {COMMERCIAL}, not {self.commercial!r}")
        if self.images not in ("url", "archive"):
            raise ValueError(f"{self.name}: images must be 'url' or 'archive', not {self.images!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metadata"] = list(self.metadata)
        d["image_archives"] = list(self.image_archives)
        return d


class CatalogError(ValueError):
    pass


def _rows(raw: dict, table: str, cls: type) -> list:
    """Each ``[[table]]`` of the catalog as a ``cls``; a bad row is a CatalogError naming it."""
    try:
        return [from_dict(cls, row, Where(CATALOG_FILE, f"{table}[{i}]")) for i, row in enumerate(raw.get(table, []))]
    except ConfigError as e:
        raise CatalogError(str(e)) from None


def _parse(raw: dict) -> tuple[CatalogEntry, ...]:
    entries = tuple(_rows(raw, "source", CatalogEntry))
    names = tuple(e.name for e in entries)
    if names != SOURCE_NAMES:
        raise CatalogError(f"catalog sources {names} differ from the schema's {SOURCE_NAMES}")
    return entries


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
    package, name = CATALOG_FILE.split("/")
    return tomllib.loads((importlib.resources.files(package) / name).read_text())


@lru_cache(maxsize=1)
def load_catalog() -> tuple[CatalogEntry, ...]:
    return _parse(_raw_catalog())


@lru_cache(maxsize=1)
def manual_steps() -> tuple[ManualStep, ...]:
    steps = _rows(_raw_catalog(), "manual", ManualStep)
    for step in steps:
        unknown = set(step.sources) - set(SOURCE_NAMES)
        if unknown:
            raise CatalogError(f"manual step {step.what!r} names unknown sources {sorted(unknown)}")
    return tuple(steps)


def catalog_entry(name: str) -> CatalogEntry:
    for entry in load_catalog():
        if entry.name == name:
            return entry
    raise KeyError(name)


CITATIONS_FILE = "manifests/citations.toml"
PMD_CITATION_KEY = "pmd"  # the corpus itself, as the FLAVA paper defines it


@dataclass(frozen=True)
class Citation:
    """Who made a source (or PMD itself) and how to cite it."""

    key: str  # PMD_CITATION_KEY or a source name
    creators: tuple[str, ...]
    url: str
    bibtex: str


@lru_cache(maxsize=1)
def citations() -> dict[str, Citation]:
    """Every citation of manifests/citations.toml by key: PMD's and exactly one per source of the catalog."""
    package, name = CITATIONS_FILE.split("/")
    raw = tomllib.loads((importlib.resources.files(package) / name).read_text())
    try:
        rows = [from_dict(Citation, row, Where(CITATIONS_FILE, f"citation[{i}]"))
                for i, row in enumerate(raw.get("citation", []))]
    except ConfigError as e:
        raise CatalogError(str(e)) from None
    found = {c.key: c for c in rows}
    expected = {PMD_CITATION_KEY, *SOURCE_NAMES}
    if len(found) != len(rows) or set(found) != expected:
        raise CatalogError(f"{CITATIONS_FILE}: needs one citation per key of {sorted(expected)}; "
                           f"has {sorted(c.key for c in rows)}")
    return found
@dataclass(frozen=True)
class HostGroup:
    """Host names one site spreads over (a CDN's numbered hosts): one politeness budget (pmd.politeness)."""

    name: str
    domains: tuple[str, ...]  # a host is in the group when it is one of these or a subdomain of one


@lru_cache(maxsize=1)
def host_groups() -> tuple[HostGroup, ...]:
    groups = _rows(_raw_catalog(), "host_group", HostGroup)
    seen: dict[str, str] = {}
    for g in groups:
        for d in g.domains:
            if d.lower() in seen:
                raise CatalogError(f"host_group domain {d!r} is in both {seen[d.lower()]!r} and {g.name!r}")
            seen[d.lower()] = g.name
    return tuple(groups)


@dataclass(frozen=True)
class PlaceholderRule:
    """What a host serves in place of a removed image, for the listed sources (pmd.placeholders)."""

    sources: tuple[str, ...]
    what: str
    redirect_paths: tuple[str, ...] = ()  # fnmatch patterns of a redirect's path (any host: mirrors and CDNs)
    sha256: tuple[str, ...] = ()  # digests of the placeholder images' bytes as served


@lru_cache(maxsize=1)
def placeholder_rules() -> tuple[PlaceholderRule, ...]:
    rules = _rows(_raw_catalog(), "placeholder", PlaceholderRule)
    for rule in rules:
        unknown = set(rule.sources) - set(SOURCE_NAMES)
        if unknown:
            raise CatalogError(f"placeholder {rule.what!r} names unknown sources {sorted(unknown)}")
        bad = [d for d in rule.sha256 if len(d) != 64 or set(d) - set("0123456789abcdef")]
        if bad:
            raise CatalogError(f"placeholder {rule.what!r}: {bad[0]!r} is not a lowercase hex sha256")
    return tuple(rules)
