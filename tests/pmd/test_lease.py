"""pmd.lease: one writer per corpus, on local disk and on S3 (moto on loopback): racing writers, a second writer's
one line and exit code 2, stale and dead owners taken over, renewal, a lost lease stopping its writer; readers
refusing a build whose manifest is not written yet."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pmd import storage
from pmd_cli.pmd import main
from pmd.lease import LEASE_FILE, Holder, Lease, LeaseConfig, LeaseHeld, LeaseLost, current_holder, lease_path
from pmd.manifest import ManifestMissing
from tests.pmd.build_fixture import known_build
from tests.s3server import s3_server

FAST = LeaseConfig(stale_after_s=0.8, renew_every_s=0.1)


@pytest.fixture(scope="module")
def s3_env():
    with s3_server() as env:
        yield env


@pytest.fixture
def s3(s3_env, monkeypatch):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(storage.OPTIONS_ENV, raising=False)
    yield "s3://pmd/lease-" + os.urandom(4).hex()


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    return str(tmp_path / "corpus") if request.param == "local" else request.getfixturevalue("s3")


def _racers(out: str, n: int) -> tuple[list[Lease], list[Exception]]:
    leases = [Lease(out, f"writer {i}") for i in range(n)]
    start, won, lost = threading.Barrier(n), [], []

    def run(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld as e:
            lost.append(e)

    threads = [threading.Thread(target=run, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, lost


def test_of_writers_starting_at_once_exactly_one_holds_the_lease(out):
    won, lost = _racers(out, 6)
    try:
        assert len(won) == 1 and len(lost) == 5
        holder = current_holder(out)
        assert holder.token == won[0].holder.token and holder.command == won[0].command
        assert all(f"`{holder.command}` on {socket.gethostname()} pid {os.getpid()} since" in str(e) for e in lost)
    finally:
        for lease in won:
            lease.release()
    assert storage.read_versioned(lease_path(out)) is None  # released: the next writer creates it
    with Lease(out, "next"):
        assert current_holder(out).command == "next"


def _plant(out: str, **fields) -> Holder:
    now = time.time()
    holder = Holder(**{"host": "elsewhere", "pid": 1, "command": "pmd build", "since": now - 5000,
                       "renewed": now, "token": "theirs", **fields})
    storage.put_if(lease_path(out), holder.to_bytes(), None)
    return holder


def test_a_gone_owner_is_taken_over_with_a_warning(out, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for planted, why in ((dict(renewed=time.time() - 1000), "not renewed for 10"),
                         (dict(host=socket.gethostname(), pid=dead.pid), f"pid {dead.pid} no longer runs")):
        _plant(out, **planted)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pmd.lease"), Lease(out, "pmd takedown") as lease:
            assert current_holder(out).token == lease.holder.token
        assert any("took over the lease" in r.message and why in r.message and "`pmd build` on" in r.message
                   for r in caplog.records), caplog.text
    # A live owner elsewhere, renewed just now, is not gone.
    _plant(out)
    with pytest.raises(LeaseHeld, match="being written by `pmd build` on elsewhere pid 1 since"):
        Lease(out, "pmd export").acquire()


def test_renewal_keeps_the_lease_and_a_lost_lease_stops_the_writer(out):
    with Lease(out, "first", FAST) as lease:
        first = current_holder(out)
        time.sleep(3 * FAST.stale_after_s)  # without renewals the lease would be stale three times over
        now = current_holder(out)
        assert now.token == first.token and now.since == first.since and now.renewed > first.renewed + 1.5
        with pytest.raises(LeaseHeld):
            Lease(out, "second", FAST).acquire()
    with pytest.raises(LeaseLost, match="taken over by `usurper` on elsewhere"):
        with Lease(out, "victim", FAST) as lease:
            usurper = Holder("elsewhere", 1, "usurper", time.time(), time.time(), "u")
            while True:  # the owner's renewals may come between the read and the write
                try:
                    storage.put_if(lease_path(out), usurper.to_bytes(), storage.read_versioned(lease_path(out))[1])
                    break
                except storage.PreconditionFailed:
                    pass
            deadline = time.time() + 10
            while time.time() < deadline:  # the renewal thread interrupts this loop
                time.sleep(0.05)
    assert lease.lost and current_holder(out).token == "u"  # the new owner's lease is left alone


def test_a_second_writer_exits_2_with_one_line(tmp_path, capsys):
    build = known_build(tmp_path / "build")
    target = tmp_path / "wds"
    (tmp_path / "urls.txt").write_text("http://example.invalid/a.jpg\n")
    commands = {"pmd export": ["export", str(build), "--format", "webdataset", "--out", str(target), "-q"],
                "pmd takedown": ["takedown", str(build), "--urls", str(tmp_path / "urls.txt")],
                "pmd build": ["build", "coco", str(tmp_path / "urls.txt"), "--out", str(build), "-q"]}
    for command, argv in commands.items():
        where = target if command == "pmd export" else build
        with Lease(where, "pmd build") as holder:
            capsys.readouterr()
            assert main(argv) == 2, command
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"pmd {command.split()[1]}: error: {where} is being "
                                                           f"written by `pmd build` on {socket.gethostname()} "
                                                           f"pid {os.getpid()} since "), err
            assert current_holder(where).token == holder.holder.token
    assert main(commands["pmd export"]) == 0 and not (target / LEASE_FILE).exists()
    assert json.loads((target / "shards.json").read_text())["samples"] == 8


def test_readers_refuse_a_build_whose_manifest_is_not_written(tmp_path, capsys):
    from flava.data import DataError, resolve_files
    from pmd.stats import locate_build

    build = known_build(tmp_path / "build")
    (build / "manifest.json").unlink()
    with Lease(build, "pmd build"):
        for read in (lambda: locate_build(build), lambda: main(["verify", str(build)])):
            with pytest.raises(ManifestMissing, match="not written yet: `pmd build` on .* is writing this build"):
                if read() != 0:
                    raise ManifestMissing(capsys.readouterr().err)
        with pytest.raises(DataError, match="not written yet: `pmd build`"):
            resolve_files(build, "pairs")
    # No writer left, the shards there: a build that stopped before its end.
    with pytest.raises(DataError, match="not written yet: the build stopped before its end"):
        resolve_files(build, "pairs")
    assert main(["stats", str(build)]) == 2
    assert "not written yet: the build stopped" in capsys.readouterr().err


def test_stores_without_conditional_writes_fall_back_to_read_compare_write(s3, monkeypatch, caplog):
    """An S3 store answering 501 to If-None-Match/If-Match (and a memory:// store, which has none): the lease
    still works for writers that do not start at once, with one warning naming the window."""
    import botocore.exceptions

    client = storage.s3_client()
    real_put, real_delete = client.put_object, client.delete_object

    def refuse_conditions(call):
        def wrapped(**kw):
            if "IfNoneMatch" in kw or "IfMatch" in kw:
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "NotImplemented"}, "ResponseMetadata": {"HTTPStatusCode": 501}}, "PutObject")
            return call(**kw)
        return wrapped

    monkeypatch.setattr(client, "put_object", refuse_conditions(real_put))
    monkeypatch.setattr(client, "delete_object", refuse_conditions(real_delete))
    monkeypatch.setattr(storage, "_S3_UNCONDITIONAL", set())
    for out in (s3, "memory://pmd-lease-test/corpus"):
        with caplog.at_level(logging.WARNING, logger="pmd.storage"), Lease(out, "first", FAST) as lease:
            time.sleep(4 * FAST.renew_every_s)  # renewals go through the fallback too
            assert current_holder(out).token == lease.holder.token and current_holder(out).renewed > lease.holder.since
            with pytest.raises(LeaseHeld, match="being written by `first`"):
                Lease(out, "second").acquire()
        assert storage.read_versioned(lease_path(out)) is None
    assert sum("no conditional writes" in r.message for r in caplog.records) == 1


def test_readers_of_a_finished_build_warn_while_a_writer_holds_it(tmp_path, caplog):
    """A takedown rewrites shards in place under the old manifest: readers go on, with one warning."""
    from flava.data import resolve_files
    from pmd.lease import warn_if_written

    build = known_build(tmp_path / "build")
    with caplog.at_level(logging.WARNING):
        assert warn_if_written(build) is None  # no writer
        with Lease(build, "pmd takedown"):
            assert warn_if_written(build) is None  # this process is the writer
            _ = resolve_files(build, "pairs")
        assert not caplog.records
        _plant(str(build), command="pmd takedown")
        main(["verify", str(build)])  # its verdict on the fixture is not the point: the warning is
        assert len(resolve_files(build, "pairs")[1]) == 2
    warned = [r.message for r in caplog.records if "what is read may change" in r.message]
    assert len(warned) == 2 and all("`pmd takedown` on elsewhere pid 1" in m for m in warned)
