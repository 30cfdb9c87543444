"""The `http` download backend: one chunk's URLs over the process's pooled client, polite per host.

Scheduling: the chunk's URLs are queued per host (scheme, host, port); `thread_count` threads each take the next URL
from the next host, round robin, that has a free slot: fewer than `max_per_host` requests of this process in flight
to it and no backoff running. So one slow or rate-limiting host holds at most `max_per_host` threads, and the others
keep fetching from the other hosts. The slots and backoffs are the process's (`HostGate`, shared by every chunk a
worker runs at the same time), so a host never sees more than `max_per_host` connections from one process.
Across processes, each request also holds a lease of the build's budget (pmd.politeness: `max_per_host` and
`max_rate_per_host` for the whole build, 429/503 pauses shared), after robots.txt allowed it (pmd.robots); a
known placeholder fails `placeholder` (pmd.placeholders). Redirects are followed hop by hop (pmd.http_client), and
each target goes through the same checks before it is requested: a known placeholder Location fails
`placeholder`, the address guard's pre-check, the target origin's robots.txt (`robots_disallowed`), and its
request holds a lease of the target host's budget (a 429/503 there pauses that host). The per-process slot
below stays with the URL's own host; a 429/503 from a redirect's target backs off the target there too.

Before anything is asked of a host, its name is resolved and checked by the address guard (pmd.netguard,
`HttpClient.refusal`): a refused host's rows fail `blocked_address` (or `dns_nxdomain` / `dns_error`) without
a robots.txt request or a budget lease.

Retries (`retries` more attempts) only for what may pass later: timeouts, connection errors, truncated bodies, 429
and 5xx. A retried URL goes to the back of its host's queue. A 429 or 503 also pauses its host for Retry-After
seconds (bounded by `max_retry_after`), or without one for 1, 2, 4 ... seconds while the host keeps answering so.
After GIVE_UP_STRIKES refused rounds in a row (a round: the answers that arrive before the pause they caused ends;
1 + 2 + 4 + 8 s of pauses without Retry-After), the chunk's remaining URLs of that host fail at once with its
last answer (a transient reason: `pmd build --retry-failures` takes them again later), so a host that refuses
everything costs a chunk seconds, not an hour of ever longer pauses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from urllib3.util import parse_url

from pmd import placeholders, politeness, robots
from pmd.http_client import BACKOFF_STATUSES, Fetched, Hops, client_for

log = logging.getLogger(__name__)

_FIRST_BACKOFF_S = 1.0
GIVE_UP_STRIKES = 5  # rounds of 429/503 answers in a row after which a chunk stops asking a host


def host_key(url: str) -> str:
    """The politeness unit of a URL: scheme://host:port (what urllib3 keeps one pool for)."""
    try:
        u = parse_url(url)
    except Exception:  # noqa: BLE001 - an unparseable URL fails in fetch with its own reason; any bucket will do
        return ""
    scheme = (u.scheme or "http").lower()
    return f"{scheme}://{(u.host or '').lower()}:{u.port or (443 if scheme == 'https' else 80)}"


@dataclass
class _HostState:
    active: int = 0
    paused_until: float = 0.0
    strikes: int = 0  # consecutive 429/503 answers
    last_refusal: tuple[str | None, str | None] = (None, None)  # (reason, detail) of the latest one


@dataclass
class HostGate:
    """Per-process slots and backoff of every host; one Condition guards it and wakes waiting workers."""

    max_per_host: int
    cond: threading.Condition = field(default_factory=threading.Condition)
    hosts: dict[str, _HostState] = field(default_factory=dict)

    def state(self, host: str) -> _HostState:
        s = self.hosts.get(host)
        if s is None:
            s = self.hosts[host] = _HostState()
        return s

    def release(self, host: str, result: Fetched, max_retry_after: float) -> None:
        """Give back `host`'s slot; the answer's backoff goes to the host that gave it: after a redirect to
        another host, `host` answered a redirect (not a refusal) and a 429/503 is the target's."""
        answered = host_key(result.answered_by) if result.answered_by else host
        with self.cond:
            self.state(host).active -= 1
            if answered != host:
                self.state(host).strikes = 0
            self._answered(answered, result, max_retry_after)
            for h in {host, answered}:
                s = self.hosts.get(h)
                if s is not None and s.active == 0 and s.strikes == 0 and s.paused_until <= time.monotonic():
                    del self.hosts[h]  # keep the table to the hosts in use
            self.cond.notify_all()

    def _answered(self, host: str, result: Fetched, max_retry_after: float) -> None:
        s = self.state(host)
        if result.status in BACKOFF_STATUSES:
            now = time.monotonic()
            s.last_refusal = (result.reason, result.detail)
            # One strike per refused round: answers landing while the host is already paused are the same
            # burst (requests sent together), they only extend the pause to their Retry-After.
            if s.paused_until <= now:
                s.strikes += 1
            wait = result.retry_after if result.retry_after is not None \
                else _FIRST_BACKOFF_S * 2 ** (s.strikes - 1)
            wait = min(wait, max_retry_after)
            if now + wait > s.paused_until:
                s.paused_until = now + wait
                log.info("host %s answered %s: paused %.1fs", host, result.status, wait)
        elif result.status is not None:
            s.strikes = 0


_GATES: dict[int, HostGate] = {}
_GATES_LOCK = threading.Lock()


def gate_for(max_per_host: int) -> HostGate:
    with _GATES_LOCK:
        gate = _GATES.get(max_per_host)
        if gate is None:
            gate = _GATES[max_per_host] = HostGate(max_per_host)
        return gate


@dataclass
class _Item:
    key: str
    url: str
    attempts: int = 0


class _BuildHops(Hops):
    """The build's rules for every request of a fetch, redirect hops included: a redirect target's robots.txt
    (`rules`, None when robots are not respected, or for a robots.txt fetch itself), and a lease of the build's
    budget of the host each request goes to, its 429/503 pausing that host for every process."""

    def __init__(self, budget, rules: robots.Robots | None, get_robots: Callable[[str], Fetched] | None):  # type: ignore[no-untyped-def]
        self.budget, self.rules, self.get_robots = budget, rules, get_robots

    def check(self, url: str) -> tuple[str, str] | None:
        if self.rules is None or self.get_robots is None:
            return None
        return self.rules.check(url, self.get_robots)

    def acquire(self, url: str) -> object:
        return self.budget.acquire(politeness.budget_key(url))

    def release(self, lease: object, status: int | None, retry_after: float | None) -> None:
        pause = 0.0
        if status in BACKOFF_STATUSES:
            pause = retry_after if retry_after is not None else politeness.DEFAULT_PAUSE_S
        self.budget.release(lease, pause)


def _fetcher(options, max_bytes: int, source: str | None, state_dir: Path | None) -> Callable[[str], Fetched]:
    """GET of one URL as the build allows it, the URL and every redirect target alike: the address guard's
    pre-check, robots.txt (no request when it disallows), then a lease of the request's host budget for the whole
    build (pmd.politeness) held for that request; a 429/503 pauses its host for every process; a redirect to a known
    placeholder fails `placeholder` before the placeholder is requested, its bytes after."""
    client = client_for(options.user_agent_token, options.max_per_host, options.allow_networks, options.resolver,
                        options.dns_timeout, options.dns_concurrency)
    budget = politeness.budget_for(options)
    known = placeholders.for_source(source)
    rules = robots.robots_for(options.user_agent_token, state_dir / robots.ROBOTS_DIR if state_dir else None) \
        if options.respect_robots_txt else None
    # A robots.txt request (and its redirects) is leased like any other, but not checked against robots.txt.
    robots_hops = _BuildHops(budget, None, None)

    def get_robots(url: str) -> Fetched:
        return client.fetch(url, options.timeout, robots.MAX_ROBOTS_BYTES, [], None, robots_hops)

    hops = _BuildHops(budget, rules, get_robots)

    def redirect_check(location: str) -> tuple[str, str] | None:
        detail = known.redirect(location)
        return (placeholders.PLACEHOLDER, detail) if detail else None

    def fetch(url: str) -> Fetched:
        # The address guard first: a host that is refused (or does not resolve) costs no robots.txt request, and
        # its rows fail with the guard's own reason and detail. The connection checks again (and each redirect).
        refused = client.refusal(url)
        if refused is not None:
            return Fetched(None, *refused)
        if rules is not None:
            refused = rules.check(url, get_robots)
            if refused is not None:
                return Fetched(None, *refused)
        result = client.fetch(url, options.timeout, max_bytes, options.disallowed_header_directives,
                              redirect_check if known.redirect_paths else None, hops)
        if result.data is not None:
            detail = known.body(result.data)
            if detail:
                return Fetched(None, placeholders.PLACEHOLDER, detail, result.status)
        return result

    return fetch


def download(keys: list[str], urls: list[str], options, max_bytes: int,
             transform: Callable[[bytes], Any] | None, source: str | None = None,
             state_dir: Path | None = None) -> dict[str, tuple[Any, str | None, str | None]]:
    """key -> (data or transform(data), reason, detail) for every key. `options` is a pmd.download.DownloadOptions."""
    fetch = _fetcher(options, max_bytes, source, state_dir)
    gate = gate_for(options.max_per_host)
    queues: dict[str, deque[_Item]] = {}
    for key, url in zip(keys, urls):
        queues.setdefault(host_key(url), deque()).append(_Item(key, url))
    order = list(queues)
    results: dict[str, tuple[Any, str | None, str | None]] = {}
    progress = {"queued": len(keys), "in_flight": 0, "next": 0}
    errors: list[BaseException] = []

    def take() -> tuple[str, _Item] | None:
        """The next URL of the next host with a free slot; waits while every queued host is full or paused."""
        with gate.cond:
            while True:
                if progress["queued"] == 0 and progress["in_flight"] == 0 or errors:
                    return None
                now = time.monotonic()
                wake = now + 1.0
                n = len(order)
                for i in range(n):
                    host = order[(progress["next"] + i) % n]
                    queue = queues[host]
                    if not queue:
                        continue
                    s = gate.state(host)
                    if s.strikes >= GIVE_UP_STRIKES:
                        reason, detail = s.last_refusal
                        while queue:
                            item = queue.popleft()
                            results[item.key] = (None, reason, f"{detail} (host refused {s.strikes} in a row: "
                                                               "not asked again in this chunk)")
                            progress["queued"] -= 1
                        continue
                    if s.paused_until > now:
                        wake = min(wake, s.paused_until)
                        continue
                    if s.active >= gate.max_per_host:
                        continue
                    s.active += 1
                    progress["next"] = (progress["next"] + i + 1) % n
                    progress["queued"] -= 1
                    progress["in_flight"] += 1
                    return host, queue.popleft()
                gate.cond.wait(max(0.0, wake - now))

    def work() -> None:
        try:
            while (job := take()) is not None:
                host, item = job
                result = Fetched(None, "download_error", "not fetched")
                try:
                    item.attempts += 1
                    result = fetch(item.url)
                    retry = result.data is None and result.transient and item.attempts <= options.retries
                    if not retry:
                        data = result.data
                        if data is not None and transform is not None:
                            data = transform(data)
                        results[item.key] = (data, result.reason, result.detail)
                finally:
                    gate.release(host, result, options.max_retry_after)
                    with gate.cond:
                        progress["in_flight"] -= 1
                        if item.key not in results:
                            queues[host].append(item)
                            progress["queued"] += 1
                        gate.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - a bug in a worker must fail the chunk, not lose its rows
            with gate.cond:
                errors.append(e)
                gate.cond.notify_all()

    threads = [threading.Thread(target=work, name=f"pmd-download-{i}", daemon=True)
               for i in range(max(1, min(options.thread_count, len(keys))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
