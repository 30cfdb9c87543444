"""The pooled HTTP client of the download stage: keep-alive per host, a DNS cache, the address guard, bounded
reads of one image.

PMD's URL images sit on few hosts (Flickr's CDN, Wikimedia, one Open Images bucket, a handful of RedCaps hosts), so
reusing connections saves a TCP (and TLS) handshake per image. urllib3 does the protocol work: one connection pool
per (scheme, host, port), each holding at most `max_per_host` connections (`block=True`: a request waits for a free
one rather than opening more).

Redirects are followed here, not inside urllib3, one request per hop: at most _MAX_REDIRECTS (10, as urllib does
for img2dataset; one more redirect fails `redirect_error`), 301/302/303/307/308 with a Location, resolved against
the hop's URL (a relative Location works), http and https only. Before a redirect target is requested: the
caller's `redirect_check` on the Location (pmd.placeholders: a known placeholder is never requested), the
address guard's pre-check of the target (`refusal`), then the caller's `Hops.check` (pmd.download_http: the
target origin's robots.txt); each hop's request holds its own host's lease (`Hops.acquire`/`release`: the build's
host budget, a 429/503 pausing the host that answered it) and none is held between hops. A redirect's short body
is read (or its connection closed) before the next hop, so a kept-alive connection goes back to its pool clean.

What one `fetch` bounds, whatever the server does:
- time: one deadline per attempt (`timeout` seconds from the first byte sent, connect + headers + body, every
  redirect hop included; time spent waiting for a hop's lease or its robots.txt is not counted), not only a
  per-read socket timeout: before every read the socket timeout is set to the time left, so a body that trickles a
  byte a second ends as `timeout` at the deadline;
- memory: a declared Content-Length above `max_bytes` is `too_large` before any body byte is read; the body is read
  in pieces and given up past `max_bytes` on the wire AND past `max_bytes` decoded: a `Content-Encoding: gzip`
  body is inflated here with zlib's `max_length`, so a gzip bomb costs at most `max_bytes` + one read's inflation.
  The request asks for `Accept-Encoding: identity` (images are compressed already); gzip/deflate are decoded when a
  server sends them anyway, any other coding is a `download_error`.
- a Content-Length larger than the body: the read waits for the missing bytes until the deadline (`timeout`), or
  the server closes (`truncated_body`).

Every new connection resolves its host once (pmd.resolver: cached, bounded; `dns_nxdomain` / `dns_error`),
keeps the addresses the address guard admits (pmd.netguard: no loopback, private, link-local ... unless
allowed) and connects to exactly those, never to a second answer of the name; a host whose every address is
refused fails `blocked_address` before any packet is sent to it. Redirects open their connections the same way,
so each hop is checked again at connection time; only http and https URLs are fetched or followed.

Failure reasons are the download reasons of docs/build-format.md. The User-Agent and the X-Robots-Tag opt-out rules
are img2dataset's (same string, same directive parsing), so both download backends identify and opt out alike.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from urllib.parse import urljoin

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    EmptyPoolError,
    HTTPError,
    LocationValueError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ResponseError,
    SSLError,
    URLSchemeUnknown,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import parse_url

from pmd.netguard import AddressGuard, BlockedAddress, scheme_allowed
from pmd.resolver import (DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_S, DNS_NXDOMAIN, ResolveError, Resolver, check_host,
                          resolver_for)

log = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024
_MAX_REDIRECTS = 10  # urllib's HTTPRedirectHandler.max_redirections, what img2dataset gets
_ERROR_BODY_DRAIN = 64 * 1024  # an error body up to this size is read so the connection can be reused
BACKOFF_STATUSES = frozenset({429, 503})

# Failure reasons worth a second attempt: the server or the network may answer differently later. Everything else
# (404/410, opted out, decode errors, checks, archive reads, duplicates) is a property of the image or the URL.
TRANSIENT_REASONS: frozenset[str] = frozenset({
    "timeout", "connection_error", "truncated_body", "download_error", "http_408", "http_425", "http_429",
    "http_500", "http_502", "http_503", "http_504", "http_520", "http_521", "http_522", "http_523", "http_524",
    "robots_unavailable",  # pmd.robots.ROBOTS_UNAVAILABLE: the host's robots.txt answered 5xx or not at all
    "dns_error",  # pmd.resolver.DNS_ERROR: the resolver failed or timed out (NXDOMAIN is permanent)
})


def is_transient(reason: str | None) -> bool:
    """Whether a failure reason may go away on a later attempt (any 5xx counts, not only the common ones)."""
    if reason is None:
        return False
    return reason in TRANSIENT_REASONS or (reason.startswith("http_5") and len(reason) == 8)



def user_agent(token: str | None) -> str:
    """img2dataset's User-Agent, with its `compatible; TOKEN` part when a token is given."""
    agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if token:
        agent += f" (compatible; {token}; +https://github.com/rom1504/img2dataset)"
    return agent


def is_disallowed(values: list[str], token: str | None, directives: list[str]) -> bool:
    """Whether X-Robots-Tag header `values` opt out: img2dataset's rule (`[ua:] d1, d2`; ua = ours or absent)."""
    for value in values:
        ua_directives = value.split(":", 1)
        found = [x.strip().lower() for x in ua_directives[-1].split(",")]
        ua = ua_directives[0].lower() if len(ua_directives) == 2 else None
        if (ua is None or ua == token) and any(x in directives for x in found):
            return True
    return False


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class GuardRefused(NewConnectionError):
    """A connection not opened: its host did not resolve (`cause` a ResolveError) or resolved only to addresses
    the guard refuses (`cause` a BlockedAddress). A NewConnectionError, so urllib3 gives up at once (connect=0)."""

    def __init__(self, conn, cause: BlockedAddress | ResolveError):  # type: ignore[no-untyped-def]
        super().__init__(conn, str(cause))
        self.cause = cause

    @property
    def reason_and_detail(self) -> tuple[str, str]:
        if isinstance(self.cause, BlockedAddress):
            return "blocked_address", str(self.cause)
        return self.cause.reason, str(self.cause)


class _BufferedResponse(http.client.HTTPResponse):
    """http.client's response, reading its socket through a _READ_SIZE buffer instead of io's 8 KiB one: the
    status line, headers and a small image's body come in one recv instead of two or three. Each recv (and the poll
    before it, the socket having a timeout) releases the GIL, and every download thread of the process contends
    for it: at 16 threads this cut the client's CPU per request by 12-18% (docs/benchmarks.md). Without pipelining
    the buffer can hold nothing of the next response: that is only sent for after this one is read."""

    def __init__(self, sock, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(sock, *args, **kwargs)
        small, self.fp = self.fp, sock.makefile("rb", buffering=_READ_SIZE)
        small.close()  # nothing read through it yet: only the socket's reference count of its file objects


class _GuardedConnection:
    """Resolve the host once, keep the addresses `guard` admits, connect to exactly those; `host` (Host header,
    TLS SNI and certificate) stays the name. The client sets `guard` and `resolver` on a subclass of its own."""

    guard: AddressGuard = AddressGuard()
    resolver: Resolver | None = None
    response_class = _BufferedResponse

    def _new_conn(self):  # type: ignore[no-untyped-def]
        original = self._dns_host  # type: ignore[attr-defined]
        name = original.strip("[]").rstrip(".")
        try:
            addresses = (self.resolver or resolver_for()).resolve(name)
        except ResolveError as e:
            raise GuardRefused(self, e) from None
        if not addresses:
            raise GuardRefused(self, ResolveError(name, DNS_NXDOMAIN, "no address"))
        admitted = [a for a in addresses if self.guard.refusal(a) is None]
        if not admitted:
            first = addresses[0]
            raise GuardRefused(self, BlockedAddress(name, first, self.guard.refusal(first) or "refused"))
        last: Exception | None = None
        for address in admitted:
            self._dns_host = address  # an IP literal: create_connection's getaddrinfo only parses it
            try:
                return super()._new_conn()  # type: ignore[misc]
            except NewConnectionError as e:  # refused/unreachable: the next address (a timeout is not retried)
                last = e
            finally:
                self._dns_host = original
        raise last or NewConnectionError(self, f"no address for {name}")  # type: ignore[arg-type]


def guarded_pool_manager(guard: AddressGuard, resolver: Resolver | None = None, **kwargs) -> urllib3.PoolManager:
    """A urllib3 PoolManager whose every connection (redirect hops included) goes through `guard` and `resolver`
    (`pmd fetch-metadata`'s; the download client builds its own the same way)."""
    manager = urllib3.PoolManager(**kwargs)
    manager.pool_classes_by_scheme = _pool_classes(guard, resolver)
    return manager


def _pool_classes(guard: AddressGuard, resolver: Resolver | None) -> dict[str, type]:
    """urllib3 pool classes whose connections check with `guard` and resolve with `resolver`."""
    attrs = {"guard": guard, "resolver": resolver}
    http_conn = type("_HTTPConnection", (_GuardedConnection, HTTPConnection), attrs)
    https_conn = type("_HTTPSConnection", (_GuardedConnection, HTTPSConnection), attrs)
    return {"http": type("_HTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("_HTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})}


class Hops:
    """What a fetch's caller decides about each of its requests, redirect targets included (pmd.download_http's:
    robots.txt and the build's host budgets). This base decides nothing and holds nothing."""

    def check(self, url: str) -> tuple[str, str] | None:
        """Before the redirect target `url` is requested (after the placeholder and address-guard checks):
        (reason, detail) to fail the fetch with, `url` never requested; None to go on."""
        return None

    def acquire(self, url: str) -> object:
        """What the request of `url` holds while it runs (a lease of its host's budget); handed to `release`."""
        return None

    def release(self, lease: object, status: int | None, retry_after: float | None) -> None:
        """The request `lease` was acquired for is over: `status` its answer (None: none came), `retry_after`
        the Retry-After seconds of a 429/503."""


NO_HOPS = Hops()


@dataclass(frozen=True, slots=True)
class Fetched:
    data: bytes | None  # the decoded body; None on failure
    reason: str | None  # None on success
    detail: str | None
    status: int | None = None  # the final HTTP status, when one was received
    retry_after: float | None = None  # seconds, from a 429/503 answer's Retry-After
    # The URL that gave the final answer when redirects led there (None: the URL asked): a 429 there is that
    # host's, not the first one's (pmd.download_http's per-process backoff).
    answered_by: str | None = None

    @property
    def transient(self) -> bool:
        """Worth another attempt: the same request may well succeed later."""
        return self.data is None and is_transient(self.reason)


class _Failure(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Decoder:
    """Content-Encoding gzip/deflate inflated with a cap on the output (zlib max_length, never a whole chunk)."""

    def __init__(self, encoding: str, max_bytes: int):
        self.encoding = encoding
        self.max_bytes = max_bytes
        self.size = 0
        self._parts: list[bytes] = []
        self._z = zlib.decompressobj(self._wbits(encoding))
        self._first = True

    @staticmethod
    def _wbits(encoding: str) -> int:
        return 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS

    def feed(self, data: bytes) -> None:
        while data:
            room = self.max_bytes + 1 - self.size
            try:
                out = self._z.decompress(data, room)
            except zlib.error as e:
                if self._first and self.encoding == "deflate":
                    # "deflate" is meant as zlib-wrapped, but some servers send raw deflate.
                    self._z = zlib.decompressobj(-zlib.MAX_WBITS)
                    self._first = False
                    continue
                raise _Failure("download_error", f"bad {self.encoding} body: {e}") from None
            self._first = False
            self._take(out)
            data = self._z.unconsumed_tail
            if self._z.eof:
                if self._z.unused_data and self.encoding in ("gzip", "x-gzip"):  # concatenated gzip members
                    data = self._z.unused_data
                    self._z = zlib.decompressobj(self._wbits(self.encoding))
                else:
                    return

    def finish(self) -> bytes:
        if not self._z.eof:
            raise _Failure("truncated_body", f"{self.encoding} body ends before its end marker")
        return b"".join(self._parts)

    def _take(self, out: bytes) -> None:
        self.size += len(out)
        if self.size > self.max_bytes:
            raise _Failure("too_large", f"{self.encoding} body inflates past {self.max_bytes} bytes")
        if out:
            self._parts.append(out)


class HttpClient:
    """Keep-alive pools for every host this process downloads from; thread-safe, meant to be shared.

    `max_per_host` bounds the connections of each pool (urllib3 blocks for a free one instead of opening more);
    `num_pools` bounds how many hosts keep open pools (least recently used closed first).
    """

    def __init__(self, user_agent_token: str | None = "pmd", max_per_host: int = 16, num_pools: int = 512,
                 guard: AddressGuard | None = None, resolver: Resolver | None = None):
        self.user_agent_token = user_agent_token
        self.max_per_host = max_per_host
        self.guard = guard if guard is not None else AddressGuard()  # on by default: nothing but global addresses
        self.resolver = resolver
        self._manager = urllib3.PoolManager(num_pools=num_pools, maxsize=max_per_host, block=True,
                                            headers={"User-Agent": user_agent(user_agent_token),
                                                     "Accept-Encoding": "identity"})
        self._manager.pool_classes_by_scheme = _pool_classes(self.guard, resolver)
        # No retry at all: the caller requeues (honouring the host's backoff), and `_fetch` follows redirects itself
        # so that each target is checked (placeholder, address guard, robots.txt) and leased before it is asked.
        self._retries = urllib3.Retry(total=None, connect=0, read=0, redirect=0, status=0, other=0,
                                      raise_on_redirect=False, raise_on_status=False)

    def refusal(self, url: str) -> tuple[str, str] | None:
        """(reason, detail) if `url` is refused before any request: its host resolves only to addresses the guard
        refuses, or not at all; None otherwise (the connection checks again, and every redirect hop)."""
        try:
            u = parse_url(url)
        except LocationValueError:
            return None  # fetch fails it with its own reason
        if not scheme_allowed(u.scheme or "http"):  # urllib3 reads a URL without a scheme as http
            return "download_error", f"URL scheme {u.scheme!r} is not fetched (http and https only)"
        host = u.host
        if not host:
            return None
        return check_host(host.strip("[]").rstrip("."), self.guard, self.resolver or resolver_for())

    def fetch(self, url: str, timeout: float, max_bytes: int, disallowed_directives: list[str],
              redirect_check: Callable[[str], tuple[str, str] | None] | None = None,
              hops: Hops | None = None) -> Fetched:
        """GET `url` within `timeout` seconds, at most `max_bytes` (on the wire and decoded) held.

        `redirect_check(location)`: (reason, detail) to fail a redirect with before its target is requested
        (pmd.placeholders), or None. `hops`: the caller's check of each redirect target and the lease each
        request holds (module docstring); the first URL is the caller's to check before calling."""
        deadline = time.monotonic() + timeout
        try:
            return self._fetch(url, deadline, max_bytes, disallowed_directives, redirect_check, hops or NO_HOPS)
        except _Failure as e:
            return Fetched(None, e.reason, e.detail[:500])

    def _open(self, url: str, deadline: float):  # type: ignore[no-untyped-def]
        for attempt in (0, 1):
            left = _time_left(deadline)
            try:
                return self._manager.urlopen("GET", url, redirect=False, preload_content=False,
                                             decode_content=False, retries=self._retries, pool_timeout=left,
                                             timeout=urllib3.Timeout(connect=left, read=left))
            except (MaxRetryError, ProtocolError) as e:
                reason = (e.reason or e) if isinstance(e, MaxRetryError) else e
                # A kept-alive connection the server closed as we sent (idle timeout): once more, on a fresh one.
                if attempt == 0 and isinstance(reason, ProtocolError) and not _is_timeout(reason):
                    continue
                raise _Failure(*_classify(reason, body=False)) from None
            except (HTTPError, OSError, ValueError) as e:
                raise _Failure(*_classify(e, body=False)) from None
        raise AssertionError("unreachable")

    def _fetch(self, url: str, deadline: float, max_bytes: int, directives: list[str],
               redirect_check: Callable[[str], tuple[str, str] | None] | None, hops: Hops) -> Fetched:
        for hop in range(_MAX_REDIRECTS + 1):
            asked = time.monotonic()
            lease = hops.acquire(url)
            # The deadline bounds the time on the wire: a wait for the host's budget (or, below, for a target's
            # robots.txt) is the build's politeness, not the server's slowness, and must not end as `timeout`.
            deadline += time.monotonic() - asked
            status: int | None = None
            retry_after: float | None = None
            try:
                resp = self._open(url, deadline)
                status = resp.status
                location = resp.get_redirect_location()  # a str only for 301/302/303/307/308 with a Location
                if not location:
                    result = self._answer(resp, deadline, max_bytes, directives)
                    retry_after = result.retry_after
                    return dataclasses.replace(result, answered_by=url) if hop else result
                self._discard(resp, deadline)
            finally:
                hops.release(lease, status, retry_after)  # no lease is held between hops (nor while checking)
            if hop == _MAX_REDIRECTS:
                raise _Failure("redirect_error", f"too many redirects (more than {_MAX_REDIRECTS}): the last to "
                                                 f"{location}")
            target = urljoin(url, location)
            refused = redirect_check(location) if redirect_check is not None else None
            if refused is not None:
                return Fetched(None, *refused, status)
            asked = time.monotonic()
            refused = self.refusal(target) or hops.check(target)
            deadline += time.monotonic() - asked
            if refused is not None:
                return Fetched(None, refused[0], refused[1][:500])
            url = target
        raise AssertionError("unreachable")

    @staticmethod
    def _discard(resp, deadline: float) -> None:  # type: ignore[no-untyped-def]
        """A redirect answer's body read (a short one) so that its connection serves the next request, or the
        connection closed; either way given back to its pool."""
        try:
            if not _drain_small(resp, deadline):
                resp.close()  # unread bytes must not reach the next request on this connection
        finally:
            resp.release_conn()  # always: a pool with block=True loses the slot of a connection never returned

    def _answer(self, resp, deadline: float, max_bytes: int, directives: list[str]) -> Fetched:  # type: ignore[no-untyped-def]
        """The Fetched of a final (not redirected) answer; its connection given back, reusable when read whole."""
        reusable = False
        try:
            status = resp.status
            if not 200 <= status < 300:
                retry_after = parse_retry_after(resp.headers.get("Retry-After")) if status in BACKOFF_STATUSES \
                    else None
                reusable = _drain_small(resp, deadline)
                return Fetched(None, f"http_{status}", f"HTTP Error {status}: {resp.reason or ''}".strip(),
                               status, retry_after)
            if directives and is_disallowed(resp.headers.getlist("X-Robots-Tag"), self.user_agent_token,
                                            directives):
                return Fetched(None, "opted_out", "Use of image disallowed by X-Robots-Tag directive", status)
            encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
                return Fetched(None, "download_error", f"unsupported Content-Encoding {encoding!r}", status)
            declared = _content_length(resp)
            if declared is not None and declared > max_bytes:
                return Fetched(None, "too_large", f"Content-Length {declared} > {max_bytes} bytes", status)
            data = _read_body(resp, deadline, max_bytes, declared,
                              None if encoding == "identity" else _Decoder(encoding, max_bytes))
            reusable = True
            return Fetched(data, None, None, status)
        finally:
            if not reusable:
                resp.close()  # closes the connection: unread bytes must not reach the next request
            resp.release_conn()  # always: a pool with block=True loses the slot of a connection never returned


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Failure("timeout", "deadline passed")
    return left


def _content_length(resp) -> int | None:  # type: ignore[no-untyped-def]
    value = resp.headers.get("Content-Length")
    if value is None or resp.headers.get("Transfer-Encoding"):
        return None
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 0 else None


def _set_read_timeout(resp, seconds: float) -> None:  # type: ignore[no-untyped-def]
    conn = resp.connection
    sock = getattr(conn, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _read_body(resp, deadline: float, max_bytes: int, declared: int | None, decoder: _Decoder | None) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        _set_read_timeout(resp, _time_left(deadline))
        try:
            piece = resp.read1(_READ_SIZE, decode_content=False)
        except (HTTPError, OSError) as e:
            raise _Failure(*_classify(e, body=True)) from None
        if not piece:
            break
        size += len(piece)
        if size > max_bytes:
            raise _Failure("too_large", f"body larger than {max_bytes} bytes")
        if decoder is not None:
            decoder.feed(piece)
        else:
            parts.append(piece)
    if declared is not None and size < declared:
        raise _Failure("truncated_body", f"IncompleteRead({size} bytes read, {declared - size} more expected)")
    return decoder.finish() if decoder is not None else b"".join(parts)


def _drain_small(resp, deadline: float) -> bool:  # type: ignore[no-untyped-def]
    """Read a short error or redirect body so its connection can serve the next request; False if it was not read
    whole. A chunked body is read up to _ERROR_BODY_DRAIN; one with neither length nor chunks ends only when the
    server closes: not read."""
    declared = _content_length(resp)
    chunked = "chunked" in (resp.headers.get("Transfer-Encoding") or "").lower()
    if (declared is None and not chunked) or (declared is not None and declared > _ERROR_BODY_DRAIN):
        return False
    try:
        _read_body(resp, min(deadline, time.monotonic() + 1.0), _ERROR_BODY_DRAIN, declared, None)
    except _Failure:
        return False
    return True


def _is_timeout(error: ProtocolError) -> bool:
    inner = error.args[1] if len(error.args) > 1 else None
    return isinstance(inner, (socket.timeout, TimeoutError))


# urllib3 names the socket timeout of the failed read, here the time left before the deadline (a different float in
# every run): dropped, so that a failures file is the same bytes in every run (the deadline is the configured one).
_TIMEOUT_VALUE = re.compile(r" ?\((?:read |connect |total )?timeout=[^)]*\)")


def _classify(error: BaseException, body: bool) -> tuple[str, str]:
    """An exception of urllib3 or the socket layer -> (reason, detail)."""
    if isinstance(error, GuardRefused):
        reason, detail = error.reason_and_detail
        return reason, detail[:500]
    if isinstance(error, URLSchemeUnknown):
        return "download_error", f"URL scheme {error.scheme!r} is not fetched (http and https only)"
    detail = _TIMEOUT_VALUE.sub("", f"{type(error).__name__}: {error}")[:500]
    if isinstance(error, ResponseError) and "redirect" in str(error):
        return "redirect_error", detail
    if isinstance(error, (NewConnectionError, NameResolutionError, SSLError)):
        return "connection_error", detail
    if isinstance(error, (Urllib3Timeout, socket.timeout, TimeoutError, EmptyPoolError)):
        return "timeout", detail
    if isinstance(error, ProtocolError):
        if _is_timeout(error):
            return "timeout", detail
        return ("truncated_body" if body else "connection_error"), detail
    if isinstance(error, (LocationValueError, ValueError)):
        return "download_error", detail
    if isinstance(error, (ConnectionError, OSError)):
        return ("truncated_body" if body else "connection_error"), detail
    return "download_error", detail


_CLIENTS: dict[tuple, HttpClient] = {}
_CLIENTS_LOCK = threading.Lock()


def client_for(user_agent_token: str | None, max_per_host: int, allow_networks: tuple[str, ...] | list[str] = (),
               nameserver: str | None = None, dns_timeout: float = DEFAULT_TIMEOUT_S,
               dns_concurrency: int = DEFAULT_CONCURRENCY) -> HttpClient:
    """The process's client for these settings: connections kept alive across the chunks a worker runs.
    `allow_networks` admits those networks beside the global addresses (pmd.netguard); the rest picks the
    process's resolver (pmd.resolver.resolver_for)."""
    key = (user_agent_token, max_per_host, tuple(allow_networks), nameserver, dns_timeout, dns_concurrency)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = HttpClient(user_agent_token, max_per_host,
                                                guard=AddressGuard.from_strings(allow_networks),
                                                resolver=resolver_for(nameserver, dns_timeout, dns_concurrency))
        return client


def close_clients() -> None:
    """Close every kept-alive connection of this process (the next download opens new ones)."""
    with _CLIENTS_LOCK:
        for client in _CLIENTS.values():
            client._manager.clear()
        _CLIENTS.clear()
