"""Name resolution of the download stage: cached, bounded, and telling a name that does not exist from a resolver
that failed.

img2dataset users lost most of a run to an overloaded resolver (img2dataset #360): 64 threads x N processes each
asking the system resolver for the same few CDN names. Here every process of a build keeps one cache per resolver
setting (`resolver_for`), used by every connection it opens (pmd.http_client) and by the img2dataset backend's
pre-check, so a name is asked once per process every `ttl` seconds; concurrent lookups of one name wait for the one
in flight. Lookups are bounded: at most `concurrency` at once per process, each given up after `timeout` seconds.

Outcomes (the failure reasons of a row, pmd.reasons):
- NXDOMAIN, or a name with no A/AAAA record: `dns_nxdomain`, permanent (the name will not come back; remembered
  for `ttl`);
- a timeout, SERVFAIL, no reachable resolver: `dns_error`, transient (`pmd build --retry-failures` asks again;
  remembered only `negative_ttl` seconds, so one failed burst does not cost a lookup per row).

`nameserver` (`pmd build --resolver ADDR`): ask that resolver directly (a local caching resolver, e.g. unbound or
dnsmasq on each node) with dnspython, instead of the C library's getaddrinfo and whatever /etc/resolv.conf says.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from pmd.netguard import BLOCKED_ADDRESS, AddressGuard, BlockedAddress, literal_address
from pmd.reasons import Reason

log = logging.getLogger(__name__)

DNS_NXDOMAIN = Reason.DNS_NXDOMAIN.value  # permanent
DNS_ERROR = Reason.DNS_ERROR.value  # transient (pmd.http_client.TRANSIENT_REASONS)
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_CONCURRENCY = 8

# getaddrinfo's answers that mean the name has no address (RFC 8020: NXDOMAIN, and NODATA); every other error code
# (EAI_AGAIN, EAI_FAIL = SERVFAIL, EAI_SYSTEM ...) is the resolver's trouble, not the name's.
_ABSENT = frozenset(getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY") if hasattr(socket, n))


class ResolveError(OSError):
    """`host` could not be resolved: `reason` is DNS_NXDOMAIN (permanent) or DNS_ERROR (transient)."""

    def __init__(self, host: str, reason: str, detail: str):
        super().__init__(f"{host}: {detail}")
        self.host, self.reason, self.detail = host, reason, detail


def parse_nameserver(addr: str) -> tuple[str, int]:
    """`ADDR` of --resolver: `127.0.0.53`, `10.0.0.2:5353`, `::1`, `[::1]:5353` -> (address, port)."""
    text = addr.strip()
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"resolver {addr!r} is not ADDR or ADDR:PORT")
            port = _port(rest[1:], addr)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text, addr)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"resolver {addr!r}: give the resolver's IP address (and :PORT), not a name") from None
    return host, port


def _port(text: str, addr: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"resolver {addr!r}: bad port {text!r}")
    return int(text)


class Resolver:
    """host -> its addresses, cached (`ttl` s; a transient failure `negative_ttl` s), at most `max_entries` names,
    at most `concurrency` lookups at once, each bounded by `timeout` s. Thread-safe."""

    def __init__(self, nameserver: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 concurrency: int = DEFAULT_CONCURRENCY, ttl: float = 300.0, negative_ttl: float = 30.0,
                 max_entries: int = 65536):
        self.nameserver = parse_nameserver(nameserver) if nameserver else None
        self.timeout, self.ttl, self.negative_ttl, self.max_entries = timeout, ttl, negative_ttl, max_entries
        self.concurrency = concurrency
        self._entries: OrderedDict[str, tuple[float, list[str] | ResolveError]] = OrderedDict()
        self._start()
        self.lookups = 0  # names looked up (cache misses): a test checks the cache holds
        _ALL.add(self)

    def _start(self) -> None:
        """Locks, slots and threads: new ones in a forked child (the parent's may be held, its threads are gone)."""
        self._lock = threading.Lock()
        self._pending: dict[str, threading.Event] = {}
        self._slots = threading.BoundedSemaphore(self.concurrency)
        # getaddrinfo cannot be given a timeout: it runs on these threads (as many as lookups may run) and is
        # waited for `timeout` seconds; one that hangs longer keeps its thread, so at most `concurrency` can.
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="pmd-dns") \
            if not self.nameserver else None

    def resolve(self, host: str) -> list[str]:
        """The addresses of `host` (an IP literal in any spelling is its address, with no lookup), best first."""
        literal = literal_address(host)
        if literal is not None:
            return [str(literal)]
        name = host.strip().lower().rstrip(".")
        while True:
            with self._lock:
                entry = self._entries.get(name)
                if entry is not None and entry[0] > time.monotonic():
                    self._entries.move_to_end(name)
                    return _result(entry[1])
                pending = self._pending.get(name)
                if pending is None:
                    self._pending[name] = threading.Event()
                    break
            pending.wait(self.timeout + 1.0)  # the lookup in flight answers for this caller too
        result: list[str] | ResolveError | None = None
        try:
            try:
                result = self._lookup(name)
                ttl = self.ttl
            except ResolveError as e:
                result, ttl = e, (self.ttl if e.reason == DNS_NXDOMAIN else self.negative_ttl)
        finally:
            with self._lock:
                if result is not None:
                    self._entries[name] = (time.monotonic() + ttl, result)
                    self._entries.move_to_end(name)
                    while len(self._entries) > self.max_entries:
                        self._entries.popitem(last=False)
                self._pending.pop(name).set()  # also after a bug: the waiters look again, never hang
        return _result(result)

    def _lookup(self, name: str) -> list[str]:
        with self._slots:
            self.lookups += 1
            if self.nameserver is not None:
                return self._ask_nameserver(name)
            assert self._pool is not None
            future = self._pool.submit(socket.getaddrinfo, name, None, 0, socket.SOCK_STREAM)
            try:
                infos = future.result(timeout=self.timeout)
            except FutureTimeout:
                raise ResolveError(name, DNS_ERROR, f"resolver gave no answer in {self.timeout:g}s") from None
            except socket.gaierror as e:
                reason = DNS_NXDOMAIN if e.errno in _ABSENT else DNS_ERROR
                raise ResolveError(name, reason, f"{e.strerror or e}") from None
            except (OSError, UnicodeError) as e:
                raise ResolveError(name, DNS_ERROR, f"{type(e).__name__}: {e}") from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def _ask_nameserver(self, name: str) -> list[str]:
        import dns.exception
        import dns.name
        import dns.rdatatype
        import dns.resolver

        assert self.nameserver is not None
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.nameserver[0]]
        resolver.port = self.nameserver[1]
        resolver.lifetime = resolver.timeout = self.timeout
        addresses: list[str] = []
        deadline = time.monotonic() + self.timeout
        try:
            qname = dns.name.from_text(name)
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                answer = resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False,
                                          lifetime=max(0.1, deadline - time.monotonic()))
                addresses += [r.address for r in answer.rrset or ()]
        except dns.resolver.NXDOMAIN:
            raise ResolveError(name, DNS_NXDOMAIN, "NXDOMAIN: no such name") from None
        except (dns.resolver.LifetimeTimeout, dns.exception.Timeout):
            raise ResolveError(name, DNS_ERROR, f"resolver {self.nameserver[0]}:{self.nameserver[1]} gave no "
                                                f"answer in {self.timeout:g}s") from None
        except dns.resolver.NoNameservers as e:  # SERVFAIL, REFUSED ...: the resolver's trouble
            raise ResolveError(name, DNS_ERROR, f"resolver failed: {e}"[:300]) from None
        except (dns.exception.DNSException, ValueError) as e:
            raise ResolveError(name, DNS_ERROR, f"{type(e).__name__}: {e}"[:300]) from None
        if not addresses:
            raise ResolveError(name, DNS_NXDOMAIN, "no A or AAAA record")
        return list(dict.fromkeys(addresses))


_ALL: weakref.WeakSet[Resolver] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [r._start() for r in list(_ALL)])


def _result(value: list[str] | ResolveError) -> list[str]:
    if isinstance(value, ResolveError):
        raise value
    return value


def check_host(host: str, guard: AddressGuard, resolver: Resolver) -> tuple[str, str] | None:
    """Before any request to `host`: (reason, detail) if it does not resolve, or resolves only to addresses
    `guard` refuses (`blocked_address`); None if a connection may be tried (to the admitted addresses)."""
    try:
        addresses = resolver.resolve(host)
    except ResolveError as e:
        return e.reason, str(e)
    kinds = [guard.refusal(a) for a in addresses]
    if not addresses:
        return DNS_NXDOMAIN, f"{host}: no address"
    if all(k is not None for k in kinds):
        return BLOCKED_ADDRESS, str(BlockedAddress(host, addresses[0], kinds[0] or "refused"))
    return None


_RESOLVERS: dict[tuple, Resolver] = {}
_RESOLVERS_LOCK = threading.Lock()


def resolver_for(nameserver: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 concurrency: int = DEFAULT_CONCURRENCY) -> Resolver:
    """The process's resolver (and cache) for these settings, shared by every client and chunk of the process."""
    key = (nameserver, timeout, concurrency)
    with _RESOLVERS_LOCK:
        r = _RESOLVERS.get(key)
        if r is None:
            r = _RESOLVERS[key] = Resolver(nameserver, timeout, concurrency)
        return r


def clear_caches() -> None:
    """Forget every cached answer of this process (tests; a new build in a long-lived process)."""
    with _RESOLVERS_LOCK:
        for r in _RESOLVERS.values():
            with r._lock:
                r._entries.clear()
