"""Where processes run, and how many, does not change training.

* Two "nodes" on one machine: two torchrun launches with --nnodes 2 (one process each, c10d rendezvous on
  127.0.0.1, gloo) train exactly like one launch of 2 processes, and after both launches are killed (SIGKILL, every
  process) a new pair of launches resumes to the losses of the uninterrupted run. The run learns its tokenizer from
  the captions, so "built once by rank 0 and read by every node" is exercised too.
* A checkpoint of 2 processes resumes on 1: DCP reshards model and optimizer, the loader finishes both old streams
  in turn (same micro-batches as the 2-process run), and the losses are those of the uninterrupted 2-process run.

MIM and MLM updates only (images and text kinds): the contrastive loss spans micro-batch x processes, so a pairs
update on 1 process with accumulation is not the same computation as on 2 processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flava import checkpoint as ckpt_mod
from flava.metrics import LOSS_NAMES

from tests.ports import free_port

from .shards import make_build

STEPS = 8
COMMON = ["train", "--config", "tiny", "--steps", str(STEPS), "run.progress=false", "run.tensorboard=false",
          "run.export_final=false", "run.checkpoint_every=3", "data.num_workers=0", "data.tokenizer_vocab_size=200",
          "run.global_batch_size=16", "run.micro_batch_size=8", "run.keep_checkpoints=10",
          "data.ratios={images: 0.5, text: 0.5}"]



def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return dict(env, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _launch_nodes(data: Path, out: Path, tmp: Path) -> tuple[list[subprocess.Popen], list[Path]]:
    """Two torchrun launches, as on two machines: --nnodes 2, one process each, a c10d rendezvous."""
    port = free_port()
    procs, logs = [], []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               f"--rdzv_id=flava-test-{port}", "--max-restarts=0", "-m", "pmd_cli.flava", *COMMON, "--data", str(data),
               "--out", str(out)]
        logs.append(tmp / f"node{node}-{port}.log")
        with open(logs[-1], "w") as log:
            procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
            )
    return procs, logs


def _wait(procs, tmp: Path, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        rc = p.wait(timeout=max(1, deadline - time.monotonic()))
        if rc != 0:
            logs = "\n".join(f.read_text()[-2000:] for f in sorted(tmp.glob("node*.log")))
            pytest.fail(f"a launch exited with {rc}:\n{logs}")


def _descendants(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


def _kill_all(procs) -> None:
    """SIGKILL each launch and every process under it (torchrun starts its workers in sessions of their own)."""
    pids = [q for p in procs for q in _descendants(p.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=30)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _compare(got: list[dict], want: list[dict], steps, rel=0.0) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(steps)
    for x, y in zip(got, want):
        assert x["kind"] == y["kind"]
        keys = {k for k in y if k == "loss" or k in LOSS_NAMES}
        assert keys == {k for k in x if k == "loss" or k in LOSS_NAMES}
        for k in keys:
            assert x[k] == pytest.approx(y[k], abs=1e-6, rel=rel), (x["step"], k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Data and an uninterrupted single-launch 2-process run of STEPS steps (checkpoints at 3, 6, 8 kept)."""
    tmp = tmp_path_factory.mktemp("topology")
    data = make_build(tmp / "data", n=96, seed=0, size=32, shards=2, row_group_size=16)
    ref = tmp / "ref"
    r = subprocess.run([sys.executable, "-m", "pmd_cli.flava", *COMMON, "--data", str(data), "--out", str(ref),
                        "--nproc", "2"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    want = _metrics(ref)
    assert len({m["kind"] for m in want}) == 2
    return data, ref


@pytest.mark.slow
def test_two_nodes_train_like_one_launch_and_resume_after_a_kill(reference, tmp_path):
    data, ref = reference
    run = tmp_path / "nodes"
    procs, _ = _launch_nodes(data, run, tmp_path)
    try:
        first = ckpt_mod.checkpoint_dir(run, 3) / "COMPLETE"
        deadline = time.monotonic() + 300
        while not first.is_file():
            assert all(p.poll() is None for p in procs), "a launch ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint at step 3"
            time.sleep(0.05)
    finally:
        _kill_all(procs)
    killed_at = ckpt_mod.list_checkpoints(run)[-1][0]
    assert killed_at < STEPS, "the launches finished before they were killed"
    assert (run / "tokenizer" / "tokenizer.json").is_file()

    procs, logs = _launch_nodes(data, run, tmp_path)  # resume across nodes, a new rendezvous
    _wait(procs, tmp_path)
    for log in logs:  # both nodes resumed (not restarted): identical losses alone would not tell
        assert f"step-{killed_at:08d} at step {killed_at}" in log.read_text()
    _compare(_metrics(run), _metrics(ref), range(1, STEPS + 1))
    assert (run / "tokenizer" / "vocab.txt").read_bytes() == (ref / "tokenizer" / "vocab.txt").read_bytes()
    assert ckpt_mod.read_meta(ckpt_mod.checkpoint_dir(run, STEPS))["world_size"] == 2


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process(reference, tmp_path):
    data, ref = reference
    run = tmp_path / "one"
    shutil.copytree(ref, run)
    for step, path in ckpt_mod.list_checkpoints(run):
        if step > 3:
            shutil.rmtree(path)
    r = subprocess.run([sys.executable, "-m", "pmd_cli.flava", *COMMON, "--data", str(data), "--out", str(run)],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by 2 process(es) x 1 worker(s), this run has 1 x 1" in r.stderr
    # steps 4.. on one process (accumulation 2 instead of 2 ranks) equal the 2-process run's, up to float rounding
    _compare(_metrics(run), _metrics(ref), range(1, STEPS + 1), rel=1e-5)
    meta = ckpt_mod.read_meta(ckpt_mod.checkpoint_dir(run, STEPS))
    assert meta["world_size"] == 1
    state = json.loads((ckpt_mod.checkpoint_dir(run, STEPS) / "rank-0.json").read_text())
    for kind_state in state["loader"].values():  # both inherited streams still being finished, in turn
        (position,) = kind_state["cursors"]
        assert [seg[:2] for seg in position["segments"]] == [[2, 0], [2, 1]]
