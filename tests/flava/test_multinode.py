"""`flava train` across nodes, as two "nodes" on one machine: two torchrun launches with --nnodes 2 (one process
each, c10d rendezvous on 127.0.0.1, gloo) train exactly like one launch of 2 processes, and after both launches are
killed (SIGKILL, every process) a new pair of launches resumes to the losses of the uninterrupted run. The run
learns its tokenizer from the captions, so "built once by rank 0 and read by every node" is exercised too."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flava import checkpoint as ckpt_mod
from flava.train import LOSS_NAMES

from .shards import make_build

STEPS = 8
COMMON = ["train", "--config", "tiny", "--steps", str(STEPS), "run.progress=false", "run.tensorboard=false",
          "run.export_final=false", "run.checkpoint_every=3", "data.num_workers=0", "data.tokenizer_vocab_size=200",
          "run.global_batch_size=16", "run.micro_batch_size=8"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}  # fmt: skip
    return dict(env, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _launch_nodes(data: Path, out: Path, tmp: Path) -> tuple[list[subprocess.Popen], list[Path]]:
    """Two torchrun launches, as on two machines: --nnodes 2, one process each, a c10d rendezvous."""
    port = _free_port()
    procs, logs = [], []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               f"--rdzv_id=flava-test-{port}", "--max-restarts=0", "-m", "flava.cli", *COMMON, "--data", str(data),
               "--out", str(out)]  # fmt: skip
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
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


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


@pytest.mark.slow
def test_two_nodes_train_like_one_launch_and_resume_after_a_kill(tmp_path):
    data = make_build(tmp_path / "data", n=96, seed=0, size=32, shards=2, row_group_size=16)
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "flava.cli", *COMMON, "--data", str(data), "--out", str(ref),
                        "--nproc", "2"], capture_output=True, text=True, env=_env(), timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]

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
    got, want = _metrics(run), _metrics(ref)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    assert len({m["kind"] for m in want}) >= 2
    for x, y in zip(got, want):
        assert x["kind"] == y["kind"]
        keys = {k for k in y if k == "loss" or k in LOSS_NAMES}
        assert keys == {k for k in x if k == "loss" or k in LOSS_NAMES}
        for k in keys:
            assert x[k] == pytest.approx(y[k], abs=1e-6, rel=0), (x["step"], k)
    assert (run / "tokenizer" / "vocab.txt").read_bytes() == (ref / "tokenizer" / "vocab.txt").read_bytes()
    assert ckpt_mod.read_meta(ckpt_mod.checkpoint_dir(run, STEPS))["world_size"] == 2
