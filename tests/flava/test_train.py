"""The trainer: run config validation, outputs of a run, export, exact resume with 2 processes (gloo), config
mismatch on resume, pickle-free checkpoint metadata, and that training learns (retrieval well above chance)."""

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flava import checkpoint as ckpt_mod
from flava.run_config import ConfigError, RunConfig, load_run_config
from flava.train import train

from .shards import make_build

TINY = ["run.progress=false", "run.tensorboard=false", "data.num_workers=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train_dir = make_build(root / "train", n=96, seed=0, size=32, bad=2, shards=2, row_group_size=16)
    return train_dir


@pytest.fixture(scope="module")
def tokenizer_dir(data, tmp_path_factory):
    from flava.data import iter_texts
    from flava.tokenizer import train_wordpiece

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_wordpiece(iter_texts([str(data)]), out, vocab_size=300)
    return out


def _cfg(data, *extra) -> RunConfig:
    return load_run_config("tiny", [*TINY, f"data.pairs=[{data}]", *extra])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------- config
def test_run_config_validation():
    cfg = load_run_config("tiny", ["optim.lr=2e-4", "model.overrides.image.image_size=64"])
    assert cfg.optim.lr == 2e-4 and cfg.model.build().codebook.image_size == 64  # follows the 8x8 grid
    assert load_run_config("flava_full").accumulation(8) == 8192 // (64 * 8)
    with pytest.raises(ConfigError, match="unknown key.*lrr"):
        load_run_config("tiny", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown key"):
        RunConfig.from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match="sum to 1"):
        load_run_config("tiny", ["data.ratios={pairs: 0.5, images: 0.2, text: 0.2}"])
    with pytest.raises(ConfigError, match="not divisible"):
        load_run_config("tiny", ["run.global_batch_size=30", "run.micro_batch_size=16"])
    with pytest.raises(ConfigError, match="world size"):
        load_run_config("tiny", ["run.global_batch_size=16", "run.micro_batch_size=16"]).validate(world_size=2)
    with pytest.raises(ConfigError, match="model: .*unknown key"):
        load_run_config("tiny", ["model.overrides.image.depth=3"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_run_config("tiny", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="text_max_length"):
        load_run_config("tiny", ["data.text_max_length=77"])  # tiny text has 64 positions


# ------------------------------------------------------------------------------------------------------- a run
def test_single_process_run_checkpoints_resumes_and_exports(data, tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    base = [f"data.tokenizer={tokenizer_dir}", "run.checkpoint_every=2", "run.tensorboard=true"]
    summary = train(_cfg(data, *base, "run.steps=3"), run)
    assert summary["step"] == 3
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("loss" in r and "lr" in r and "samples_per_s" in r for r in rows)
    assert [s for s, _ in ckpt_mod.list_checkpoints(run)] == [2, 3]
    assert (run / "tb").is_dir() and (run / "tokenizer" / "vocab.txt").is_file()
    meta = ckpt_mod.read_meta(run / "checkpoints" / "step-00000003")
    assert meta["step"] == 3 and set(meta) >= {"model_config", "scheduler", "world_size"}
    state = json.loads((run / "checkpoints" / "step-00000003" / "rank-0.json").read_text())
    assert set(state) == {"rng", "loader"} and state["loader"]  # loader cursors are in the checkpoint

    train(_cfg(data, *base, "run.steps=5"), run)  # larger --steps resumes
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4, 5]

    from transformers import FlavaForPreTraining

    from flava.convert import from_transformers
    from flava.evaluate import load_for_eval

    hf = FlavaForPreTraining.from_pretrained(str(run / "final"))  # the export, in transformers format
    ours = load_for_eval(run).model
    back = from_transformers(hf)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name

    with pytest.raises(ckpt_mod.CheckpointError, match="another model config"):
        train(_cfg(data, *base, "run.steps=6", "model.overrides.text.num_layers=3"), run)


def test_checkpoint_metadata_unpickler_refuses_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        ckpt_mod._SafeUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


# ------------------------------------------------------------------------------------------------------- resume
def _cli(*args, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "pmd_cli.flava", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.slow
def test_stop_and_resume_two_cpu_gloo_processes_matches_uninterrupted(data, tokenizer_dir, tmp_path):
    """`--steps 5` then `--steps 9` on 2 processes (gloo, FSDP2, 2 dataloader workers each: the resume lands
    mid-round-robin) gives exactly the losses of a fresh `--steps 9`. Mixed kinds (pairs/images/text)."""
    common = ["train", "--config", "tiny", "--data", str(data), "--nproc", "2", "run.progress=false",
              "run.tensorboard=false", "run.export_final=false", "run.checkpoint_every=100", "data.num_workers=2",
              f"data.tokenizer={tokenizer_dir}", "run.global_batch_size=16", "run.micro_batch_size=8"]
    a, b = tmp_path / "a", tmp_path / "b"
    for out, steps in ((a, 5), (a, 9), (b, 9)):
        r = _cli(*common, "--out", str(out), "--steps", str(steps))
        assert r.returncode == 0, r.stderr[-3000:]
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, 10))
    assert len({m["kind"] for m in mb}) >= 2
    for x, y in zip(ma, mb):
        assert x["kind"] == y["kind"]
        for key in ("loss", "mim", "mlm", "itm", "global_contrastive", "mmm_image", "mmm_text", "lr"):
            assert (key in x) == (key in y)
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=1e-6, rel=0), (x["step"], key)
    meta = ckpt_mod.read_meta(a / "checkpoints" / "step-00000009")
    assert meta["world_size"] == 2


# ------------------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_training_learns_retrieval_above_chance(tmp_path):
    from flava.evaluate import retrieval

    train_dir = make_build(tmp_path / "train", n=480, seed=3, size=32, shards=2, row_group_size=60)
    held_out = make_build(tmp_path / "eval", n=60, seed=4, size=32, split="test", shards=1)
    run = tmp_path / "run"
    cfg = load_run_config("tiny", [*TINY, f"data.pairs=[{train_dir}]", "data.ratios={pairs: 1.0}", "run.steps=200",
                                   "run.micro_batch_size=32", "run.global_batch_size=32", "optim.total_steps=200",
                                   "optim.warmup_steps=10", "run.checkpoint_every=1000", "run.export_final=false"])
    train(cfg, run)
    m = _metrics(run)
    assert m[-1]["global_contrastive"] < m[0]["global_contrastive"] - 1.0
    res = retrieval(run, [str(held_out)])
    assert res["n_images"] == res["n_texts"] == 60
    chance = 1 / 60
    assert res["i2t_r1"] > 3 * chance and res["t2i_r1"] > 3 * chance, res
    assert res["i2t_r10"] > 10 / 60 * 2


def test_throughput_samples_per_second_and_mfu_since_the_last_log():
    from flava.metrics import Throughput

    clock = iter([10.0, 12.0, 20.0, 24.0])
    t = Throughput(torch.device("cpu"), world_size=2, clock=lambda: next(clock))  # starts at 10 s
    assert t.peak is None and t.record() == {"samples_per_s": 0.0}  # CPU: no peak, no MFU (read at 12 s)
    t.peak = 1e12
    t.restart()  # 20 s
    t.add(64, 1e12)
    t.add(64, 3e12)
    # at 24 s: 128 samples in 4 s; 4e12 FLOPs in 4 s over 2 devices of 1e12 FLOP/s peak each
    assert t.record() == {"samples_per_s": 32.0, "mfu": 0.5}


def test_run_deterministic_switches_on_deterministic_algorithms(monkeypatch):
    """run.deterministic=true: torch.use_deterministic_algorithms and cuBLAS's fixed workspace (what makes a GPU
    resume bit-exact; see docs/pretrain.md); false leaves torch's defaults alone."""
    import torch

    from flava.train import apply_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        apply_determinism(False)
        assert torch.are_deterministic_algorithms_enabled() == before
        apply_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)
