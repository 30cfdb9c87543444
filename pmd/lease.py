"""One writer per corpus: the lease a writing command (`pmd build`, `pmd takedown`, `pmd export`'s target) holds on
OUT while it runs.

The lease is one small JSON object, OUT/.pmd-lease.json: the owner's host, pid and command, when it took the lease
(`since`) and when it last renewed it (`renewed`), and a random token. It is written only with pmd.storage's
compare-and-swap (`put_if`): created if absent, replaced only in the version last read. So of two writers that
start at once exactly one creates it (local disk: link(2); S3: If-None-Match: *), and of two writers that find a
stale lease exactly one takes it over (local: rename aside; S3: If-Match). Other object stores have no conditional
write in pyarrow or fsspec; there the check and the write are two requests (docs/build.md names the window).

While the command runs a background thread renews the lease every `renew_every_s`. A lease is the owner's until
it is gone: not renewed for `stale_after_s` (a host that died, a process killed with SIGKILL), or, on the same
host, its pid no longer runs. A gone owner's lease is taken over with a warning. A renewal that finds the lease
taken over (its owner stalled past `stale_after_s`: the new owner could not know it was alive), or that cannot
reach the store for `stale_after_s`, stops the command (KeyboardInterrupt in the main thread, reported as
LeaseLost): two writers never keep writing the same corpus.

Readers (`pmd verify`, `pmd stats`, the trainer) take no lease; they refuse a build whose manifest is not written
yet (pmd.manifest.ManifestNotWritten), which a writer deletes first and writes last.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

from pmd import storage

log = logging.getLogger(__name__)

LEASE_FILE = ".pmd-lease.json"


@dataclass(frozen=True)
class LeaseConfig:
    #: An owner that has not renewed for this long is gone. Longer than any pause of a healthy writer (a full
    #: garbage collection, a slow store), shorter than a person's patience with a killed build's rerun.
    stale_after_s: float = 120.0
    #: How often the owner renews: several renewals fit in stale_after_s, so one slow request loses nothing.
    renew_every_s: float = 15.0

    def __post_init__(self) -> None:
        if not 0 < self.renew_every_s < self.stale_after_s:
            raise ValueError(f"lease: renew_every_s ({self.renew_every_s}) must be positive and below "
                             f"stale_after_s ({self.stale_after_s})")


class LeaseHeld(RuntimeError):
    """Another writer holds the lease; the message names it and since when."""


class LeaseLost(RuntimeError):
    """This writer's lease was taken over, or could not be renewed in time: it stopped writing."""


@dataclass(frozen=True)
class Holder:
    """What the lease says about its owner."""

    host: str
    pid: int
    command: str
    since: float  # seconds since the epoch
    renewed: float
    token: str

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """None for a lease that does not parse (written by something else, or damaged)."""
        try:
            raw = json.loads(data)
            return cls(str(raw["host"]), int(raw["pid"]), str(raw["command"]), float(raw["since"]),
                       float(raw["renewed"]), str(raw["token"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"`{self.command}` on {self.host} pid {self.pid} since {_when(self.since)}"


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def lease_path(out: str | os.PathLike) -> str:
    return str(storage.join(out, LEASE_FILE))


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def gone_because(holder: Holder, now: float, config: LeaseConfig) -> str | None:
    """Why the owner of a lease is gone, or None while it holds it."""
    if now - holder.renewed > config.stale_after_s:
        return f"not renewed for {now - holder.renewed:.0f} s (over {config.stale_after_s:.0f} s)"
    if holder.host == socket.gethostname() and not _pid_runs(holder.pid):
        return f"pid {holder.pid} no longer runs on {holder.host}"
    return None


def current_holder(out: str | os.PathLike) -> Holder | None:
    """The owner the lease of `out` names (gone or not), None when there is no readable lease."""
    found = storage.read_versioned(lease_path(out))
    return None if found is None else Holder.from_bytes(found[0])


def warn_if_written(out: str | os.PathLike, config: LeaseConfig | None = None) -> str | None:
    """For readers of a finished build: log (and return) a warning when another process holds the lease of `out`
    now (a `pmd takedown` rewriting shards in place, a rerun of the build about to delete the manifest), as what is
    read may change under the reader. Never blocks and never fails the reader."""
    try:
        holder = current_holder(out)
    except OSError:
        return None
    if holder is None or (holder.host == socket.gethostname() and holder.pid == os.getpid()):
        return None
    if gone_because(holder, time.time(), config or LeaseConfig()) is not None:
        return None
    message = f"{out} is being written by {holder.describe()}: what is read may change while this command runs"
    log.warning("%s", message)
    return message


class Lease:
    """`with Lease(out, "pmd build"):` holds the lease on `out` for the block (see the module docstring)."""

    ATTEMPTS = 5  # create / take over rounds against writers racing for the same lease

    def __init__(self, out: str | os.PathLike, command: str, config: LeaseConfig | None = None):
        self.out = str(out)
        self.path = lease_path(out)
        self.command = command
        self.config = config or LeaseConfig()
        self.holder: Holder | None = None
        self.version: str | None = None
        self.lost: str | None = None  # why, once the lease is lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inside = False

    # ------------------------------------------------------------------------------------------- acquire
    def acquire(self) -> None:
        now = time.time()
        mine = Holder(socket.gethostname(), os.getpid(), self.command, now, now, uuid.uuid4().hex)
        for _ in range(self.ATTEMPTS):
            try:
                self.version = storage.put_if(self.path, mine.to_bytes(), None)
                self.holder = mine
                break
            except storage.PreconditionFailed:
                pass
            found = storage.read_versioned(self.path)
            if found is None:  # released in between: try to create it again
                continue
            data, version = found
            other = Holder.from_bytes(data)
            reason = "the lease file does not parse" if other is None else gone_because(other, time.time(),
                                                                                         self.config)
            if reason is None:
                raise LeaseHeld(f"{self.out} is being written by {other.describe()} (renewed "
                                f"{time.time() - other.renewed:.0f} s ago); one writer per corpus: wait for it "
                                "to finish (docs/build.md, One writer per corpus)")
            try:
                self.version = storage.put_if(self.path, mine.to_bytes(), version)
            except storage.PreconditionFailed:
                continue  # another writer renewed or took it first: look again
            self.holder = mine
            log.warning("%s: took over the lease of %s: %s", self.out,
                        "an unreadable lease" if other is None else other.describe(), reason)
            break
        else:
            raise LeaseHeld(f"{self.out}: other writers keep taking the lease; one writer per corpus")
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="pmd-lease", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------------------------- renew
    def renew(self) -> None:
        """One renewal (the background thread's step). Raises storage.PreconditionFailed when the lease is no
        longer this writer's."""
        assert self.holder is not None and self.version is not None
        renewed = replace(self.holder, renewed=time.time())
        self.version = storage.put_if(self.path, renewed.to_bytes(), self.version)
        self.holder = renewed

    def _renew_loop(self) -> None:
        last = time.time()
        while not self._stop.wait(self.config.renew_every_s):
            try:
                self.renew()
                last = time.time()
            except storage.PreconditionFailed:
                try:
                    holder = current_holder(self.out)
                except OSError:
                    holder = None
                self._lose(f"the lease was taken over by {holder.describe() if holder else 'another writer'}")
                return
            except Exception as e:  # noqa: BLE001 - a store error is retried until the lease would be stale
                if time.time() - last > self.config.stale_after_s:
                    self._lose(f"it could not be renewed for {self.config.stale_after_s:.0f} s ({e})")
                    return
                log.warning("%s: lease renewal failed, retrying: %s", self.out, e)

    def _lose(self, why: str) -> None:
        self.lost = f"{self.out}: {self.command} stopped: {why}; one writer per corpus"
        log.error("%s", self.lost)
        if self._inside:
            _thread.interrupt_main()

    # ------------------------------------------------------------------------------------------- release
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.version is not None and self.lost is None:
            try:
                storage.delete_if(self.path, self.version)
            except OSError as e:  # the next writer takes it over once stale
                log.warning("%s: could not release the lease: %s", self.out, e)
        self.version = None

    def __enter__(self) -> Lease:
        self.acquire()
        self._inside = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._inside = False
        self.release()
        if self.lost is not None:
            raise LeaseLost(self.lost) from None
