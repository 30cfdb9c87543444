"""robots.txt (RFC 9309) for the download stage: fetched once per origin and build, parsed by protego.

An origin's robots.txt (`scheme://host:port/robots.txt`) is fetched by the first download process that needs it,
stored beside the build's work state (WORK/robots/<digest of the origin>.json, with its fetch time, status and
body) and read from there by every other process and chunk; each process also keeps what it read in memory.
What the answer means (RFC 9309 section 2.3.1):
- 2xx: the rules, for the build's user-agent token (`--user-agent-token`, default pmd), as protego matches them;
- 4xx (404, 403, 410 ...): no rules, every URL allowed;
- 5xx, unreachable (connection error, timeout), or any other failure: every URL disallowed, for now: the rows
  fail, not requested, with a transient reason (`pmd build --retry-failures` asks again): `robots_unavailable`
  when the server answered (5xx...), the fetch's own reason when it could not be reached (`connection_error`,
  `timeout`: what the image request would have met). Such an answer is kept in the process's memory for
  UNAVAILABLE_RETRY_S, never on disk.
A stored answer older than MAX_AGE_S (the RFC's 24 hours) is fetched again. A URL the rules disallow fails
`robots_disallowed` without being requested. `--ignore-robots` turns this off (and the X-Robots-Tag check).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protego import Protego
from urllib3.util import parse_url

from pmd import atomic
from pmd.http_client import Fetched

log = logging.getLogger(__name__)

ROBOTS_DIR = "robots"  # under the build's work directory
ROBOTS_DISALLOWED = "robots_disallowed"
ROBOTS_UNAVAILABLE = "robots_unavailable"  # transient: pmd.http_client.TRANSIENT_REASONS
MAX_ROBOTS_BYTES = 512 * 1024  # the RFC's "at least 500 kibibytes" parsed
MAX_AGE_S = 24 * 3600.0
UNAVAILABLE_RETRY_S = 300.0


def origin(url: str) -> str | None:
    """scheme://host:port of an http(s) URL, None otherwise (the fetch then fails on its own)."""
    try:
        u = parse_url(url)
    except Exception:  # noqa: BLE001 - an unparseable URL fails in fetch with its own reason
        return None
    scheme = (u.scheme or "").lower()
    if scheme not in ("http", "https") or not u.host:
        return None
    return f"{scheme}://{u.host.lower()}:{u.port or (443 if scheme == 'https' else 80)}"


@dataclass(frozen=True)
class RobotsAnswer:
    origin: str
    fetched_at: float  # unix time
    status: int | None  # the HTTP status, None when no answer came
    body: str | None  # the 2xx body
    failure: str | None = None  # why there is no usable answer (5xx, unreachable...)
    failure_reason: str = ROBOTS_UNAVAILABLE  # what the rows of the origin fail with meanwhile

    @property
    def available(self) -> bool:
        return self.failure is None

    def to_dict(self) -> dict:
        return {"origin": self.origin, "url": f"{self.origin}/robots.txt", "fetched_at": self.fetched_at,
                "status": self.status, "body": self.body}


def answer_from(origin_: str, fetched: Fetched, now: float) -> RobotsAnswer:
    """RFC 9309 2.3.1: what a robots.txt fetch means."""
    if fetched.data is not None:
        return RobotsAnswer(origin_, now, fetched.status, fetched.data.decode("utf-8", "replace"))
    if fetched.status is not None and 400 <= fetched.status < 500:
        return RobotsAnswer(origin_, now, fetched.status, None)
    # not reached at all: the rows fail as their own request would have (blocked_address and dns_* included)
    unreachable = fetched.status is None and fetched.reason in ("connection_error", "timeout", "blocked_address",
                                                                 "dns_nxdomain", "dns_error")
    return RobotsAnswer(origin_, now, fetched.status, None, f"{fetched.reason}: {fetched.detail}",
                        fetched.reason if unreachable else ROBOTS_UNAVAILABLE)  # type: ignore[arg-type]


class Robots:
    """robots.txt verdicts of one process, for one user-agent token. Thread-safe; one fetch per origin at once."""

    def __init__(self, token: str | None, directory: Path | None):
        self.token = token or "*"
        self.directory = directory
        self._parsed: dict[str, tuple[RobotsAnswer, Protego | None]] = {}
        self._lock = threading.Lock()
        self._origin_locks: dict[str, threading.Lock] = {}
        self.requests = 0  # robots.txt requests this process made (a test reads it)

    def check(self, url: str, fetch: Callable[[str], Fetched]) -> tuple[str, str] | None:
        """None if `url` may be fetched, else (reason, detail). `fetch`: GET of a robots.txt URL, should this
        process need it (the caller's client, counted in the host's budget)."""
        o = origin(url)
        if o is None:
            return None
        answer, rules = self._rules(o, fetch)
        if not answer.available:
            return answer.failure_reason, f"{o}/robots.txt unavailable ({answer.failure}): disallowed for now"[:500]
        if rules is not None and not rules.can_fetch(url, self.token):
            return ROBOTS_DISALLOWED, f"disallowed by {o}/robots.txt for {self.token}"
        return None

    def _rules(self, o: str, fetch: Callable[[str], Fetched]) -> tuple[RobotsAnswer, Protego | None]:
        with self._lock:
            got = self._parsed.get(o)
            if got is not None and self._fresh(got[0]):
                return got
            lock = self._origin_locks.setdefault(o, threading.Lock())
        with lock:  # the other threads asking for this origin wait for the one fetching it
            with self._lock:
                got = self._parsed.get(o)
            if got is None or not self._fresh(got[0]):
                answer = self._stored(o)
                if answer is None:
                    answer = self._fetch(o, fetch)
                rules = Protego.parse(answer.body) if answer.body else None
                got = (answer, rules)
                with self._lock:
                    self._parsed[o] = got
            return got

    @staticmethod
    def _fresh(answer: RobotsAnswer) -> bool:
        age = time.time() - answer.fetched_at
        return age < (MAX_AGE_S if answer.available else UNAVAILABLE_RETRY_S)

    def _path(self, o: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{hashlib.sha256(o.encode()).hexdigest()[:32]}.json"

    def _stored(self, o: str) -> RobotsAnswer | None:
        path = self._path(o)
        if path is None or not path.exists():
            return None
        try:
            d = json.loads(path.read_text())
            answer = RobotsAnswer(d["origin"], float(d["fetched_at"]), d["status"], d["body"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: unreadable stored robots.txt (%s): fetched again", path, e)
            return None
        return answer if answer.origin == o and self._fresh(answer) else None

    def _fetch(self, o: str, fetch: Callable[[str], Fetched]) -> RobotsAnswer:
        self.requests += 1
        answer = answer_from(o, fetch(f"{o}/robots.txt"), time.time())
        path = self._path(o)
        if answer.available and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(answer.to_dict(), path)
        log.info("%s/robots.txt: %s", o, answer.status if answer.available else answer.failure)
        return answer


_ROBOTS: dict[tuple, Robots] = {}
_ROBOTS_LOCK = threading.Lock()


def robots_for(token: str | None, directory: Path | None) -> Robots:
    """The process's verdicts for this token and work directory, shared by every chunk it downloads."""
    key = (token, str(directory) if directory else None)
    with _ROBOTS_LOCK:
        robots = _ROBOTS.get(key)
        if robots is None:
            robots = _ROBOTS[key] = Robots(token, directory)
        return robots
