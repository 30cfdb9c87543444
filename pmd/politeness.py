"""Host budgets for the whole build: connection slots, a request rate and 429/503 pauses shared by every process.

`pmd.download_http` bounds a host per process; a build runs many download processes (pool workers, Ray workers on
several nodes), so the bound that a host sees is the build's, kept here:
- `HostBudgets`: the budget logic, thread-safe, in one process. Per budget key (below) at most `max_per_host`
  leases out at once; with `max_rate_per_host` > 0, lease grants spaced at least 1/rate seconds apart (a
  request rate measured where the budget is, the spacing of grants); a pause (a 429/503, with or without
  Retry-After) stops grants for the key until it ends. Leases expire after `lease_ttl` seconds (a process that
  hangs with a lease), and every lease of a client goes when the client is gone (`drop_client`).
- `BudgetServer`: the same budgets served over TCP to every download process of a build (a thread per
  connection, a text protocol of one line per message, below). `pipelines.build` starts it as a subprocess
  (`start_service`) on loopback, or on the driver's address for a Ray cluster, and hands its address to the
  download tasks in their options (`DownloadOptions.budget_address`). A client's connections carry its id: when
  the last one closes (its process died or finished), its leases are released.
- `budget_for(options)`: what a download process uses: the build's server when `options.budget_address` names
  one, else a budget of this process (library use): the same rules, without a server.

Budget keys (`budget_key`): the registrable domain for the hosts of a site that a CDN spreads over many names,
from the catalog's `[[host_group]]` table (manifests/sources.toml: Flickr's farm hosts are one budget), else the
host name (the scheme aside: one server; a port other than the scheme's default counts as another server).

Protocol (ASCII lines): `H <client id>` opens a connection (no answer); `A <key>` asks for a lease, answered
`L <lease id>` or, after `ACQUIRE_WAIT_S` without one, `W` (the client asks again: a server that is gone is
noticed); `R <lease id> <pause seconds>` gives a lease back (no answer), pausing its key when the pause is > 0.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

log = logging.getLogger(__name__)

ACQUIRE_WAIT_S = 2.0  # the longest a server holds an `A` before answering `W`
DEFAULT_MAX_RATE_PER_HOST = 0.0  # requests/s per budget key; 0: no rate cap (connections still bound a host)
# 429/503 without Retry-After pause the key this long for every process (each process then backs off on its own:
# pmd.download_http's 1, 2, 4 ... s).
DEFAULT_PAUSE_S = 1.0


def lease_ttl(timeout: float) -> float:
    """How long a lease lives without being given back: well past one attempt's deadline (`timeout`)."""
    return 2 * timeout + 30.0


# ------------------------------------------------------------------------------------------------- budget keys
@lru_cache(maxsize=1)
def _groups() -> tuple[tuple[str, str], ...]:
    """(domain suffix, group name) from the catalog, longest suffix first."""
    from pmd.catalog import host_groups

    pairs = [(d.lower().strip("."), g.name) for g in host_groups() for d in g.domains]
    return tuple(sorted(pairs, key=lambda p: -len(p[0])))


def budget_key_of_host(host: str) -> str:
    host = host.lower().rstrip(".")
    for suffix, name in _groups():
        if host == suffix or host.endswith("." + suffix):
            return name
    return host or "-"


def budget_key(url: str) -> str:
    """The budget a URL's request is counted in: its host's catalog group, else its host name (with the port when
    it is not the scheme's default: another server)."""
    from urllib3.util import parse_url

    try:
        u = parse_url(url)
    except Exception:  # noqa: BLE001 - an unparseable URL fails in fetch with its own reason; any budget will do
        return "-"
    key = budget_key_of_host("".join((u.host or "").split()))  # no whitespace on the wire
    default = {"http": 80, "https": 443}.get((u.scheme or "").lower())
    return key if u.port is None or u.port == default else f"{key}:{u.port}"


# ------------------------------------------------------------------------------------------------------ budgets
@dataclass
class _Key:
    cond: threading.Condition
    leases: dict[int, tuple[str, float]] = field(default_factory=dict)  # lease -> (client, expiry)
    next_grant: float = 0.0  # rate: the earliest next grant
    paused_until: float = 0.0
    waiting: int = 0  # threads waiting on `cond`: the key stays in the table while any does


class HostBudgets:
    """Leases per budget key: at most `max_per_host` out, grants at most `max_rate_per_host` per second."""

    def __init__(self, max_per_host: int, max_rate_per_host: float = 0.0, max_pause: float = 30.0,
                 ttl: float = 60.0):
        if max_per_host < 1:
            raise ValueError(f"max_per_host must be >= 1, got {max_per_host}")
        if not max_rate_per_host >= 0:
            raise ValueError(f"max_rate_per_host must be >= 0, got {max_rate_per_host}")
        self.max_per_host, self.max_rate_per_host = max_per_host, max_rate_per_host
        self.max_pause, self.ttl = max_pause, ttl
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._lease_key: dict[int, str] = {}
        self._ids = itertools.count(1)
        self.granted = 0  # leases granted so far (a test reads it)

    def _key(self, key: str) -> _Key:
        k = self._keys.get(key)
        if k is None:
            k = self._keys[key] = _Key(threading.Condition(self._lock))
        return k

    def acquire(self, key: str, client: str, wait: float) -> int | None:
        """A lease on `key`, waiting at most `wait` seconds for one; None if none came."""
        with self._lock:
            k = self._key(key)
            deadline = time.monotonic() + wait
            while True:
                now = time.monotonic()
                self._expire(k, now)
                start = max(k.paused_until, k.next_grant if self.max_rate_per_host else 0.0)
                if len(k.leases) < self.max_per_host and start <= now:
                    lease = next(self._ids)
                    k.leases[lease] = (client, now + self.ttl)
                    self._lease_key[lease] = key
                    if self.max_rate_per_host:
                        k.next_grant = max(now, k.next_grant) + 1.0 / self.max_rate_per_host
                    self.granted += 1
                    return lease
                if now >= deadline:
                    self._forget(key, k)
                    return None
                # A full key wakes on a release; a paused or rate-spaced one when its time comes.
                # (or when its oldest lease expires).
                until = min(deadline, min(e for _, e in k.leases.values())) if len(k.leases) >= self.max_per_host \
                    else min(deadline, start)
                k.waiting += 1
                try:
                    k.cond.wait(max(0.0, until - now))
                finally:
                    k.waiting -= 1

    def release(self, lease: int, pause: float = 0.0) -> None:
        """Give `lease` back; `pause` > 0 stops grants of its key for that long (capped at `max_pause`)."""
        with self._lock:
            key = self._lease_key.pop(lease, None)
            if key is None:
                return  # expired, or its client was dropped
            k = self._keys[key]
            k.leases.pop(lease, None)
            if pause > 0:
                until = time.monotonic() + min(pause, self.max_pause)
                if until > k.paused_until:
                    k.paused_until = until
                    log.info("budget %s paused %.1fs for the whole build", key, min(pause, self.max_pause))
            k.cond.notify()
            self._forget(key, k)

    def drop_client(self, client: str) -> int:
        """Release every lease of `client` (its process is gone); returns how many."""
        with self._lock:
            dropped = 0
            for key, k in list(self._keys.items()):
                for lease in [lease for lease, (c, _) in k.leases.items() if c == client]:
                    k.leases.pop(lease)
                    self._lease_key.pop(lease, None)
                    dropped += 1
                k.cond.notify_all()
                self._forget(key, k)
            return dropped

    def in_use(self, key: str) -> int:
        with self._lock:
            k = self._keys.get(key)
            return len(k.leases) if k else 0

    def _expire(self, k: _Key, now: float) -> None:
        for lease in [lease for lease, (_, expiry) in k.leases.items() if expiry <= now]:
            log.warning("a download lease expired after %.0fs without being given back", self.ttl)
            k.leases.pop(lease)
            self._lease_key.pop(lease, None)

    def _forget(self, key: str, k: _Key) -> None:
        # Keep the table to the keys in use; a key with a pause or a rate spacing still running stays.
        now = time.monotonic()
        if not k.leases and not k.waiting and k.paused_until <= now and k.next_grant <= now:
            self._keys.pop(key, None)


# ------------------------------------------------------------------------------------------------------ clients
class LocalBudget:
    """A process's own budgets (no server): what `budget_for` gives without a build's service."""

    def __init__(self, budgets: HostBudgets):
        self.budgets = budgets
        self.client = f"local-{os.getpid()}"

    def acquire(self, key: str) -> int:
        while True:
            lease = self.budgets.acquire(key, self.client, ACQUIRE_WAIT_S)
            if lease is not None:
                return lease

    def release(self, lease: int, pause: float = 0.0) -> None:
        self.budgets.release(lease, pause)


class BudgetUnavailable(RuntimeError):
    """The build's budget server cannot be reached: downloads stop rather than exceed the build's bounds."""


class RemoteBudget:
    """A process's client of the build's server: a pool of connections, one per thread asking at a time."""

    def __init__(self, address: str):
        host, _, port = address.rpartition(":")
        self.address = (host.strip("[]"), int(port))
        self.client = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._idle: deque[tuple[socket.socket, object]] = deque()
        self._lock = threading.Lock()

    def _connection(self) -> tuple[socket.socket, object]:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            sock = socket.create_connection(self.address, timeout=ACQUIRE_WAIT_S + 30)
        except OSError as e:
            raise BudgetUnavailable(f"budget server {self.address} unreachable: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"H {self.client}\n".encode())
        return sock, sock.makefile("rb")

    def _give_back(self, conn: tuple[socket.socket, object]) -> None:
        with self._lock:
            self._idle.append(conn)

    def acquire(self, key: str) -> int:
        conn = self._connection()
        sock, reader = conn
        try:
            while True:
                sock.sendall(f"A {key}\n".encode())
                line = reader.readline().decode().split()  # type: ignore[attr-defined]
                if not line:
                    raise BudgetUnavailable(f"budget server {self.address} closed the connection")
                if line[0] == "L":
                    self._give_back(conn)
                    return int(line[1])
        except OSError as e:
            sock.close()
            raise BudgetUnavailable(f"budget server {self.address}: {e}") from e
        except BaseException:
            sock.close()  # the lease may have been granted on it: closing lets the server count it back
            raise

    def release(self, lease: int, pause: float = 0.0) -> None:
        conn = self._connection()
        try:
            conn[0].sendall(f"R {lease} {pause:.3f}\n".encode())
        except OSError as e:
            conn[0].close()
            raise BudgetUnavailable(f"budget server {self.address}: {e}") from e
        self._give_back(conn)

    def close(self) -> None:
        with self._lock:
            while self._idle:
                self._idle.pop()[0].close()


_BUDGETS: dict[tuple, object] = {}
_BUDGETS_LOCK = threading.Lock()


def budget_for(options) -> LocalBudget | RemoteBudget:  # type: ignore[no-untyped-def]
    """The budget a download process counts its requests in (`options`: a pmd.download.DownloadOptions)."""
    address = options.budget_address
    key: tuple = ("remote", address) if address else \
        ("local", options.max_per_host, options.max_rate_per_host, options.max_retry_after, options.timeout)
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(key)
        if budget is None and address:
            # A worker process outlives builds (Ray reuses it): the client of an earlier build's server goes.
            for old in [k for k in _BUDGETS if k[0] == "remote"]:
                _BUDGETS.pop(old).close()  # type: ignore[attr-defined]
        if budget is None:
            budget = RemoteBudget(address) if address else LocalBudget(HostBudgets(
                options.max_per_host, options.max_rate_per_host, options.max_retry_after,
                lease_ttl(options.timeout)))
            _BUDGETS[key] = budget
        return budget  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------- server
class _Handler(socketserver.StreamRequestHandler):
    server: BudgetServer

    def handle(self) -> None:
        budgets, client = self.server.budgets, None
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for raw in self.rfile:
                parts = raw.decode("ascii", "replace").split()
                if not parts:
                    continue
                if parts[0] == "H" and len(parts) == 2:
                    client = parts[1]
                    self.server.opened(client)
                elif parts[0] == "A" and len(parts) == 2 and client:
                    lease = budgets.acquire(parts[1], client, ACQUIRE_WAIT_S)
                    self.wfile.write(b"W\n" if lease is None else f"L {lease}\n".encode())
                elif parts[0] == "R" and len(parts) == 3:
                    budgets.release(int(parts[1]), float(parts[2]))
                else:
                    log.warning("budget server: bad message %r", raw[:100])
                    return
        except (OSError, ValueError) as e:
            log.debug("budget connection ended: %s", e)
        finally:
            if client:
                self.server.closed(client)


class BudgetServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # every download thread of a node may connect at once (the default 5 resets them)

    def __init__(self, address: tuple[str, int], budgets: HostBudgets):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.budgets = budgets
        self._connections: dict[str, int] = {}
        self._conn_lock = threading.Lock()

    def opened(self, client: str) -> None:
        with self._conn_lock:
            self._connections[client] = self._connections.get(client, 0) + 1

    def closed(self, client: str) -> None:
        with self._conn_lock:
            left = self._connections[client] = self._connections.get(client, 1) - 1
            if left <= 0:
                del self._connections[client]
        if left <= 0:
            n = self.budgets.drop_client(client)
            if n:
                log.warning("budget client %s left with %d leases: released", client, n)


@dataclass
class BudgetService:
    """A running budget server subprocess of a build: its address, and how to stop it."""

    address: str
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_service(max_per_host: int, max_rate_per_host: float, max_pause: float, timeout: float,
                  bind: str = "127.0.0.1") -> BudgetService:
    """Start a budget server subprocess on `bind` (an ephemeral port); returns once it listens."""
    # The server reads its stdin to the end: the pipe closes when this process exits, however it ends, and the
    # server with it (no server outlives its build).
    cmd = [sys.executable, "-m", "pmd.politeness", bind, str(max_per_host), repr(float(max_rate_per_host)),
           repr(float(max_pause)), repr(float(lease_ttl(timeout)))]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    line = process.stdout.readline().strip() if process.stdout else ""  # the server's "host:port" once it listens
    if not line:
        process.kill()
        process.wait()
        raise RuntimeError(f"the budget server did not start (exit {process.returncode})")
    log.info("budget server at %s: %d connections%s per host for the whole build", line, max_per_host,
             f", {max_rate_per_host:g} requests/s" if max_rate_per_host else "")
    return BudgetService(line, process)


def _serve(argv: list[str]) -> None:
    bind, max_per_host, rate, max_pause, ttl = argv
    server = BudgetServer((bind, 0), HostBudgets(int(max_per_host), float(rate), float(max_pause), float(ttl)))
    host, port = server.server_address[:2]
    print(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", flush=True)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    server.serve_forever(poll_interval=0.5)


def _exit_with_parent() -> None:
    sys.stdin.read()
    os._exit(0)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s budget %(levelname)s %(message)s")
    _serve(sys.argv[1:])
