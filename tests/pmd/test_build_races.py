"""Issue 23 item 4: concurrency on object storage. Ray re-runs a task whose node it thinks dead while the first
attempt may still be writing; both attempts then finish the same unit (an image chunk, a URL pass bucket, a
scatter group, a dedup or write bucket, a shard merge, a failures file) at once. The build must leave one correct
object per name, the bytes a single run writes, and write the manifest once, after every other object.

Every task of a whole build on the loopback S3 server (tests/s3server.py) runs as two simultaneous attempts
(threads released together by a barrier); the corpus is compared with a single-attempt build of the same
configuration, and the order of the object writes is recorded."""

from __future__ import annotations

import json
import threading
import uuid

import pyarrow.parquet as pq
import pytest

from pmd import build_plan, storage
from pmd.build_config import BuildConfig, SourceSpec
from pmd.executor import InProcessExecutor
from pmd.images import ImageOptions
from pmd.shards import verify
from tests.httpserver import LoopbackServer
from tests.loopback import loopback_options
from tests.pipelines.build_fixtures import make_coco, make_mixed_tsv
from tests.s3server import s3_environment


@pytest.fixture(scope="module")
def s3():
    with s3_environment() as env:
        yield env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("races")
    server = LoopbackServer(image_size=(64, 48), sleep_s=2.0).start()
    tsv = make_mixed_tsv(root / "cc12m.tsv", server, first_image=600, word="race")
    yield tsv, make_coco(root / "coco", n_images=12)
    server.stop()


def config(inputs, out: str, retry: bool = False) -> BuildConfig:
    tsv, coco = inputs
    return BuildConfig(sources=[SourceSpec("conceptual_12m", [tsv]), SourceSpec("coco", [coco.karpathy], coco.zips)],
                       out=out, shard_rows=8, row_group_rows=4, chunk_rows=10, seed=1,
                       image=ImageOptions(image_size=32), download=loopback_options(timeout=2.0, thread_count=4),
                       executor="local", progress=False, retry_failures=retry)


def _without_timings(value):
    """A task's result without its own timings (two attempts take different times, and say so)."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


class TwoAttempts(InProcessExecutor):
    """Every task runs twice, as Ray's re-run of a task beside its first attempt; both results must agree.

    "together": both attempts start at once (a barrier), their writes interleave as they come;
    "late": the second attempt starts first, makes its first existence check (its marker or output: absent), and
    stops there until the first attempt has finished; it then goes on from what it saw, and finds the inputs the
    first attempt consumed deleted (a task Ray re-ran because it thought the first attempt's node lost)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.names: list[str] = []
        self.paused: dict[int, tuple[threading.Event, threading.Event]] = {}  # thread -> (checked, resume)

    def submit(self, fn, *args, on_done=lambda _: None, limit=None, name=None) -> None:
        results: list = [None, None]
        errors: list = []
        barrier = threading.Barrier(2) if self.mode == "together" else None
        checked, resume = threading.Event(), threading.Event()

        def attempt(i: int) -> None:
            if barrier is not None:
                barrier.wait()
            elif i == 1:
                self.paused[threading.get_ident()] = (checked, resume)
            try:
                results[i] = fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported below, with the task's name
                errors.append(e)
            finally:
                self.paused.pop(threading.get_ident(), None)

        first, second = (threading.Thread(target=attempt, args=(i,)) for i in range(2))
        if barrier is not None:
            first.start()
            second.start()
            first.join()
        else:
            second.start()
            while not checked.wait(0.01) and second.is_alive():
                pass
            first.start()
            first.join()
            resume.set()
        second.join()
        if errors:
            raise AssertionError(f"{name}: an attempt failed beside another one") from errors[0]
        assert _without_timings(results[0]) == _without_timings(results[1]), name
        self.names.append(name)
        on_done(results[0])

    def patch(self, monkeypatch) -> None:
        real = storage.exists  # RemotePath.exists asks it too

        def exists(location) -> bool:
            pause = self.paused.pop(threading.get_ident(), None)
            answer = real(location)
            if pause is not None:
                checked, resume = pause
                checked.set()
                resume.wait()
            return answer

        monkeypatch.setattr(storage, "exists", exists)


def objects(prefix: str, under: str) -> dict[str, bytes]:
    root = storage.join(prefix, under)
    return {p[len(prefix):]: storage.read_bytes(p) for p in sorted(storage.list_files(root, recursive=True))}


@pytest.mark.parametrize("mode", ["together", "late"])
def test_two_attempts_of_every_task_leave_the_bytes_of_one(s3, inputs, monkeypatch, mode):
    run = uuid.uuid4().hex[:8]  # moto's state lives as long as the server: a prefix of this test's own
    single, raced = f"s3://pmd/races-{run}/single", f"s3://pmd/races-{run}/raced"
    build_plan.run(config(inputs, single), InProcessExecutor())

    writes: list[str] = []
    lock = threading.Lock()
    real_upload = storage.upload

    def recorded(local, location) -> None:
        real_upload(local, location)
        with lock:
            writes.append(str(location))

    monkeypatch.setattr(storage, "upload", recorded)
    executor = TwoAttempts(mode)
    executor.patch(monkeypatch)
    manifest = build_plan.run(config(inputs, raced), executor)
    # Every unit of every phase was raced (names: tests/pmd/test_build_plan.py).
    assert {n.split("/")[0] for n in executor.names} == {"ingest", "urls", "images", "scatter", "dedup", "write",
                                                         "merge", "failures"}
    for under in ("shards", "failures"):
        assert objects(raced, under) == objects(single, under) != {}
    reference = json.loads(storage.read_text(storage.join(single, "manifest.json")))
    assert manifest["shards"] == reference["shards"] and manifest["accounting"] == reference["accounting"]
    assert verify(raced) == []
    assert sum(pq.read_metadata(storage.open_input(storage.join(raced, s["file"]))).num_rows
               for s in manifest["shards"]) == manifest["totals"]["pairs"]
    # The manifest: one write, the last of the build (its presence means everything else is in place).
    manifest_url = storage.join(raced, "manifest.json")
    assert writes.count(manifest_url) == 1 and writes[-1] == manifest_url

    # A retry round: the shards taken back to pieces, every group retried, the final passes again, all raced.
    build_plan.run(config(inputs, single, retry=True), InProcessExecutor())
    writes.clear()
    executor.names.clear()
    manifest = build_plan.run(config(inputs, raced, retry=True), executor)
    assert {"unbuild", "retry"} <= {n.split("/")[0] for n in executor.names}
    for under in ("shards", "failures"):
        assert objects(raced, under) == objects(single, under) != {}
    reference = json.loads(storage.read_text(storage.join(single, "manifest.json")))
    assert manifest["shards"] == reference["shards"] and manifest["accounting"] == reference["accounting"]
    assert verify(raced) == []
    assert writes.count(manifest_url) == 1 and writes[-1] == manifest_url
