"""`pmd fetch-metadata`: the public upstream metadata files of the catalog, downloaded once, resumably.

What to fetch comes from the catalog (manifests/sources.toml): each source's `metadata` entries, a URL first
(with `{0..9}` ranges expanded), minus those a `[[manual]]` entry covers, whose step is printed instead.

Each file is written to `NAME.part` and renamed when complete. An interrupted transfer (a cut connection, a killed
process) resumes with an HTTP range request from the bytes already on disk, within the same run (up to `attempts`
tries) and across runs; a server that ignores ranges sends the whole file again. `DIR/fetched.json` records each
file's URL, size and sha256, so a rerun skips what is done and a user can check the files later.

Connections go through the address guard (pmd.netguard, as the download stage's do): an upstream host, or a
redirect hop, that resolves to a loopback, private, link-local ... address fails its file with `blocked_address`
and is not retried. `mirror`'s own addresses (resolved once at the start) are admitted for this command, and
`allow_networks` admits more (CIDRs).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import urllib3
from tqdm.auto import tqdm

from pmd import atomic
from pmd.http_client import GuardRefused, guarded_pool_manager
from pmd.netguard import BLOCKED_ADDRESS, AddressGuard, BlockedAddress, parse_networks
from pmd.resolver import ResolveError, resolver_for
from pmd.catalog import ManualStep, load_catalog, manual_steps
from pmd.shards import file_sha256

log = logging.getLogger(__name__)

RECORD = "fetched.json"
PART_SUFFIX = ".part"
_BLOCK = 1 << 20
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_TOTAL = re.compile(r"/(\d+)\s*$")


class FetchError(RuntimeError):
    pass


@dataclass(frozen=True)
class PlannedFile:
    url: str
    name: str
    sources: tuple[str, ...]


@dataclass
class FetchPlan:
    files: list[PlannedFile] = field(default_factory=list)
    manual: list[ManualStep] = field(default_factory=list)


def _expand(url: str) -> list[str]:
    """`...-0000{0..9}-of-00010.tsv.gz` -> ten URLs (the shell's brace range, as the catalog writes WIT)."""
    m = _RANGE.search(url)
    if not m:
        return [url]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") and len(lo) == len(hi) else 0
    return [u for i in range(int(lo), int(hi) + 1)
            for u in _expand(url[:m.start()] + str(i).zfill(width) + url[m.end():])]


def plan(sources: Sequence[str] = ()) -> FetchPlan:
    """The files to fetch for `sources` (all when empty), each once, and the manual steps that apply."""
    catalog = load_catalog()
    known = [e.name for e in catalog]
    unknown = set(sources) - set(known)
    if unknown:
        raise FetchError(f"unknown sources {sorted(unknown)}; see `pmd sources`")
    wanted = [e for e in catalog if not sources or e.name in sources]
    steps = manual_steps()
    by_url: dict[str, list[str]] = {}
    manual: list[ManualStep] = []
    for entry in wanted:
        for item in entry.metadata:
            url = item.split()[0]
            step = next((s for s in steps if s.matches(url)), None)
            if step is not None:
                if step not in manual:
                    manual.append(step)
                continue
            for u in _expand(url):
                by_url.setdefault(u, []).append(entry.name)
        for step in steps:
            if not step.url_prefix and entry.name in step.sources and step not in manual:
                manual.append(step)
    files = [PlannedFile(u, Path(urlsplit(u).path).name, tuple(s)) for u, s in by_url.items()]
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise FetchError(f"two URLs share a file name: {sorted(n for n in names if names.count(n) > 1)}")
    return FetchPlan(files, manual)


def _mirrored(url: str, mirror: str | None) -> str:
    """With a mirror (an internal cache, or the tests' loopback server): MIRROR/HOST/PATH?QUERY."""
    if not mirror:
        return url
    parts = urlsplit(url)
    return f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def _load_record(to: Path) -> dict:
    path = to / RECORD
    if not path.is_file():
        return {"files": {}}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FetchError(f"{path} is not valid JSON ({exc}); move it away to start the record again") from exc
    if not isinstance(record.get("files"), dict):
        raise FetchError(f"{path} has no `files` table")
    return record


def _transfer(http: urllib3.PoolManager, url: str, part: Path, timeout: float, progress: bool, label: str) -> None:
    """One request: from the bytes already in `part` to the end (or as far as the connection lasts)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "pmd-fetch-metadata", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    r = http.request("GET", url, headers=headers, preload_content=False, redirect=True,
                     timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=urllib3.Retry(total=2, redirect=5,
                                                                                                   backoff_factor=0.5))
    try:
        if r.status == 416 and have:
            total = _TOTAL.search(r.headers.get("Content-Range", ""))
            if total and int(total.group(1)) == have:
                return  # the part is already the whole file
            raise FetchError(f"{url}: the server refuses to resume from byte {have}; delete {part} and rerun")
        if r.status not in (200, 206):
            raise FetchError(f"{url}: HTTP {r.status}")
        mode = "ab" if r.status == 206 else "wb"  # 200: the server ignored the range, so the whole file again
        start = have if r.status == 206 else 0
        length = r.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=label,
                                         disable=not progress, leave=False) as bar:
            # read1: whatever one read returns, so the bytes before a cut connection reach the disk and are kept
            while block := r.read1(_BLOCK):
                f.write(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
        if total is not None and part.stat().st_size != total:
            raise urllib3.exceptions.IncompleteRead(part.stat().st_size, total - part.stat().st_size)
    finally:
        r.release_conn()


def _guard(mirror: str | None, allow_networks: Sequence[str]) -> AddressGuard:
    """The address guard of this command: `allow_networks`, plus the addresses `mirror`'s host resolves to now."""
    try:
        guard = AddressGuard(parse_networks(allow_networks, "--allow-network"))
    except ValueError as exc:
        raise FetchError(str(exc)) from None
    if not mirror:
        return guard
    host = urllib3.util.parse_url(mirror).host
    if not host:
        raise FetchError(f"--mirror {mirror!r} names no host")
    try:
        addresses = resolver_for().resolve(host)
    except ResolveError as exc:
        raise FetchError(f"--mirror: {exc}") from None
    return guard.admit(addresses)


def fetch(to: Path, sources: Sequence[str] = (), mirror: str | None = None, attempts: int = 5,
          timeout: float = 60.0, progress: bool = True, allow_networks: Sequence[str] = ()) -> dict:
    """Fetch (or finish fetching) the metadata files of `sources` into `to`; returns the summary it records."""
    if attempts < 1:
        raise FetchError("attempts must be >= 1")
    guard = _guard(mirror, allow_networks)
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    the_plan = plan(sources)
    record = _load_record(to)
    http = guarded_pool_manager(guard, resolver_for(), num_pools=8)
    fetched, skipped, failed = [], [], {}
    for item in the_plan.files:
        final = to / item.name
        done = record["files"].get(item.name)
        if done and done.get("url") == item.url and final.is_file() and final.stat().st_size == done["bytes"]:
            skipped.append(item.name)
            continue
        part = final.with_name(final.name + PART_SUFFIX)
        if final.is_file() and not part.exists():
            final.rename(part)  # a file not in the record (e.g. an earlier wget): resume it, never trust it
        url = _mirrored(item.url, mirror)
        error: str | None = None
        for attempt in range(1, attempts + 1):
            try:
                _transfer(http, url, part, timeout, progress, item.name)
                error = None
                break
            except urllib3.exceptions.MaxRetryError as exc:
                refused = exc.reason.cause if isinstance(exc.reason, GuardRefused) else None
                error = f"{type(exc).__name__}: {exc}"
                if isinstance(refused, BlockedAddress):  # the same answer every time: not retried
                    error = f"{BLOCKED_ADDRESS}: {refused}"
                    break
                log.warning("%s: attempt %d/%d cut short (%s); resuming from byte %d", item.name, attempt, attempts,
                            error, part.stat().st_size if part.exists() else 0)
                time.sleep(min(2.0 ** attempt * 0.1, 5.0))
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: attempt %d/%d cut short (%s); resuming from byte %d", item.name, attempt, attempts,
                            error, part.stat().st_size if part.exists() else 0)
                time.sleep(min(2.0 ** attempt * 0.1, 5.0))
            except FetchError as exc:
                error = str(exc)
                break
        if error is not None:
            failed[item.name] = error
            continue
        os.replace(part, final)
        record["files"][item.name] = {"url": item.url, "sources": list(item.sources), "bytes": final.stat().st_size,
                                      "sha256": file_sha256(final),
                                      "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic.write_json(record, to / RECORD)  # after each file: a killed run keeps what it finished
        fetched.append(item.name)
    record["manual"] = [{"what": m.what, "sources": list(m.sources), "step": m.step} for m in the_plan.manual]
    atomic.write_json(record, to / RECORD)
    return {"fetched": fetched, "skipped": skipped, "failed": failed, "manual": record["manual"],
            "files": {n: record["files"][n] for n in [*fetched, *skipped]}}


def describe_manual(steps: Iterable[dict]) -> list[str]:
    return [f"manual: {s['what']} [{', '.join(s['sources'])}]: {s['step']}" for s in steps]
