"""URL images of one chunk of candidates: the download entry point, its options and failure reasons.

`download_chunk` fetches a chunk's URLs into memory with one of two backends (`DownloadOptions.backend`):
- `http` (default): pmd's own client (pmd.http_client, pmd.download_http): keep-alive connection pools per host,
  a DNS cache, at most `max_per_host` connections per host for the whole build (pmd.politeness), robots.txt
  (pmd.robots), placeholders (pmd.placeholders), backoff on 429/503 honouring Retry-After,
  hosts interleaved, each image read with a byte cap and an overall deadline;
- `img2dataset`: img2dataset's downloader run in-process (pmd.download_img2dataset): a new connection per image,
  whole bodies read; kept for comparison and as a fallback.
Both report the same failure reasons (docs/build-format.md) for the same server behaviour, except where
img2dataset cannot bound a download (see pmd.download_img2dataset and docs/build.md). The measured speeds are in
docs/benchmarks.md (`benchmarks/bench_build.py --connect-delay-ms`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmd import netguard, resolver
from pmd.resolver import DEFAULT_CONCURRENCY as DEFAULT_DNS_CONCURRENCY
from pmd.resolver import DEFAULT_TIMEOUT_S as DEFAULT_DNS_TIMEOUT_S

log = logging.getLogger(__name__)

# X-Robots-Tag directives that opt an image out of AI training: img2dataset's default list, spelled out so the
# manifest records what was respected.
DEFAULT_DISALLOWED_DIRECTIVES: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
BACKENDS: tuple[str, ...] = ("http", "img2dataset")
# Connections to one host (or catalog host group) for the whole build, every download process together
# (pmd.politeness). PMD's images sit on few hosts (Flickr's CDN serves half of them); 16 keep-alive connections
# fetch a few hundred images/s from a CDN, where img2dataset opens one per image in flight.
DEFAULT_MAX_PER_HOST = 16


@dataclass
class DownloadOptions:
    timeout: float = 10.0  # seconds per attempt: the whole download with `http`, each socket read with img2dataset
    retries: int = 0
    thread_count: int = 64
    user_agent_token: str | None = "pmd"
    disallowed_header_directives: list[str] = field(default_factory=lambda: list(DEFAULT_DISALLOWED_DIRECTIVES))
    backend: str = "http"  # one of BACKENDS
    max_per_host: int = DEFAULT_MAX_PER_HOST  # `http`: requests in flight per host, the whole build (and process)
    max_retry_after: float = 30.0  # `http`: longest pause of a host that answered 429/503 (Retry-After capped)
    # `http`, for the whole build (pmd.politeness): requests per second to one host (budget key); 0: no cap
    max_rate_per_host: float = 0.0
    respect_robots_txt: bool = True  # `http`: robots.txt (pmd.robots); --ignore-robots turns it off
    # images served for at least this many distinct URLs fail `placeholder` in the final phase (pmd.placeholders);
    # 0 turns the rule off
    placeholder_min_urls: int = 20
    # networks a download may connect to beside the globally routable addresses (pmd.netguard, docs/build.md
    # "Network safety"): CIDRs such as "10.1.0.0/16" for a mirror; `--allow-network CIDR`. Empty: only global
    # addresses (no loopback, private, link-local, CGNAT ...) are connected to.
    allow_networks: list[str] = field(default_factory=list)
    # IP[:PORT] of a DNS resolver to ask (pmd.resolver: a local caching resolver); None: the system's getaddrinfo.
    # It and dns_concurrency are wiring, left out of to_dict like budget_address.
    resolver: str | None = None
    dns_timeout: float = DEFAULT_DNS_TIMEOUT_S  # seconds one name's lookup may take (then `dns_error`, transient)
    dns_concurrency: int = DEFAULT_DNS_CONCURRENCY  # lookups at once per download process
    # host:port of the build's budget server (pmd.politeness), set by the build for its tasks; None: this
    # process's own budgets. Wiring, not a setting: left out of to_dict (the manifest, the build's identity).
    budget_address: str | None = None

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("download timeout must be positive")
        if self.retries < 0:
            raise ValueError("download retries must be >= 0")
        if self.thread_count < 1:
            raise ValueError("download thread_count must be positive")
        if self.backend not in BACKENDS:
            raise ValueError(f"download backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.backend == "img2dataset":
            from pmd.download_img2dataset import WARNING

            log.warning(WARNING)
        if not isinstance(self.max_per_host, int) or isinstance(self.max_per_host, bool) or self.max_per_host < 1:
            raise ValueError(f"download max_per_host must be a positive int, got {self.max_per_host!r}")
        if not self.max_retry_after >= 0:
            raise ValueError(f"download max_retry_after must be >= 0, got {self.max_retry_after!r}")
        if not isinstance(self.max_rate_per_host, (int, float)) or isinstance(self.max_rate_per_host, bool) \
                or not self.max_rate_per_host >= 0 or self.max_rate_per_host == float("inf"):
            raise ValueError(f"download max_rate_per_host must be a finite number >= 0 (0: no cap), got "
                             f"{self.max_rate_per_host!r}")
        if not isinstance(self.placeholder_min_urls, int) or isinstance(self.placeholder_min_urls, bool) \
                or self.placeholder_min_urls < 0 or self.placeholder_min_urls == 1:
            raise ValueError(f"download placeholder_min_urls must be 0 (off) or an int >= 2, got "
                             f"{self.placeholder_min_urls!r}")
        self.disallowed_header_directives = [str(d) for d in self.disallowed_header_directives]
        if isinstance(self.allow_networks, str):
            raise ValueError(f"download allow_networks must be a list of CIDRs, got the string {self.allow_networks!r}")
        # normalised ("127.0.0.1" -> "127.0.0.1/32"): what the manifest records is what was admitted
        self.allow_networks = [str(n) for n in netguard.parse_networks(self.allow_networks, "download allow_networks")]
        if self.resolver is not None:
            resolver.parse_nameserver(str(self.resolver))
        if not isinstance(self.dns_timeout, (int, float)) or isinstance(self.dns_timeout, bool) \
                or not 0 < self.dns_timeout < float("inf"):
            raise ValueError(f"download dns_timeout must be a positive number of seconds, got {self.dns_timeout!r}")
        if not isinstance(self.dns_concurrency, int) or isinstance(self.dns_concurrency, bool) \
                or self.dns_concurrency < 1:
            raise ValueError(f"download dns_concurrency must be a positive int, got {self.dns_concurrency!r}")

    def to_dict(self) -> dict:
        """The settings (what the manifest records and the work state depends on)."""
        d = dataclasses.asdict(self)
        # how to reach things, not what is fetched: a rerun may change them and keep its work state
        for wiring in ("budget_address", "resolver", "dns_concurrency"):
            del d[wiring]
        return d


@dataclass(frozen=True, slots=True)
class Downloaded:
    key: str
    data: Any  # the downloaded bytes, or what `transform` made of them; None on failure
    reason: str | None  # None on success
    detail: str | None


_HTTP = re.compile(r"HTTP Error (\d{3})")


def classify_error(message: str) -> str:
    """img2dataset's free-text `error_message` -> a short, stable failure reason."""
    m = _HTTP.search(message)
    if m:
        return f"http_{m.group(1)}"
    lowered = message.lower()
    if "x-robots-tag" in lowered:
        return "opted_out"
    if "timed out" in lowered or "timeout" in lowered:
        return "timeout"
    if "incompleteread" in lowered or "incomplete read" in lowered:
        return "truncated_body"
    if "redirect" in lowered:
        return "redirect_error"
    if any(s in lowered for s in ("connection refused", "connection reset", "remote end closed", "name or service",
                                   "temporary failure in name resolution", "no route", "urlopen error")):
        return "connection_error"
    return "download_error"


def download_chunk(keys: list[str], urls: list[str], options: DownloadOptions, work_dir: Path,
                   transform: Callable[[bytes], Any] | None = None,
                   max_bytes: int | None = None, source: str | None = None,
                   state_dir: Path | None = None) -> Iterator[Downloaded]:
    """Download `urls` (one per key) into memory; yields one `Downloaded` per key, in input order.

    `transform`, if given, is applied to each image's bytes as soon as it arrives (it must not raise); its result
    is the `data` of that key. `max_bytes` caps one image's body (default: `ImageOptions().max_image_bytes`):
    past it the key fails with `too_large`. `work_dir` is scratch space for the img2dataset backend's input
    file; it is removed at the end. `source` picks the catalog's placeholders (None: every source's);
    `state_dir` (the build's work directory) keeps the robots.txt answers every process of the build shares.
    """
    if max_bytes is None:
        from pmd.images import ImageOptions

        max_bytes = ImageOptions().max_image_bytes
    if options.backend == "img2dataset":
        from pmd import download_img2dataset

        by_key = download_img2dataset.download(keys, urls, options, work_dir, max_bytes, transform, classify_error)
    else:
        from pmd import download_http

        by_key = download_http.download(keys, urls, options, max_bytes, transform, source, state_dir)
    for key in keys:
        got = by_key.get(key)
        # A row the backend did not report is a failure with a reason, never a silent loss.
        yield Downloaded(key, *got) if got is not None else \
            Downloaded(key, None, "download_error", f"the {options.backend} backend returned no row")
