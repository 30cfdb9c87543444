"""The `flava` command surface: train, eval retrieval --json, eval zeroshot, tokenizer train, export, and clear
errors (exit code 2, one line) on bad input before anything trains."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pmd_cli.flava import main

from .shards import CLASSES, make_build

COMMON = ["run.progress=false", "run.tensorboard=false", "data.num_workers=0", "run.export_final=false"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train = make_build(root / "train", n=64, seed=0, size=32, shards=2, row_group_size=16)
    held = make_build(root / "eval", n=24, seed=1, size=32, split="test", shards=1)
    run = root / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [sys.executable, "-m", "pmd_cli.flava", "train", "--config", "tiny", "--data", str(train), "--out", str(run),
         "--steps", "3", *COMMON],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 3
    return train, held, run


def test_eval_retrieval_json(built):
    _, held, run = built
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "pmd_cli.flava", "eval", "retrieval", "--checkpoint", str(run), "--data",
                        str(held), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "n_images", "n_texts"} <= set(res)
    assert res["n_images"] == res["n_texts"] == 24  # the figures themselves: tests/flava/test_retrieval.py


def test_eval_zeroshot_and_export(built, capsys, tmp_path):
    _, held, run = built
    assert main(["eval", "zeroshot", "--checkpoint", str(run), "--data", str(held), "--classes", ",".join(CLASSES),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 24 and res["classes"] == 12  # the figures themselves: tests/flava/test_retrieval.py
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "vocab.txt").is_file()
    assert main(["tokenizer", "train", "--data", str(held), "--out", str(tmp_path / "tok"), "--vocab-size", "100"]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


def _train_error(capsys, *args) -> str:
    code = main(["train", "--config", "tiny", *args, *COMMON])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("flava: error:") and "Traceback" not in err
    return err


def test_bad_input_fails_clearly_before_training(built, capsys, tmp_path):
    train, _, run = built
    out = str(tmp_path / "r")
    assert "does not exist" in _train_error(capsys, "--data", str(tmp_path / "missing"), "--out", out)
    broken = make_build(tmp_path / "broken", n=8, shards=2)
    (broken / "shards" / "shard-00000.parquet").unlink()
    assert "missing" in _train_error(capsys, "--data", str(broken), "--out", out)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    pq.write_table(pa.table({"caption": ["a"], "url": ["u"]}), wrong / "x.parquet")
    assert "wrong schema" in _train_error(capsys, "--data", str(wrong), "--out", out)
    assert "unknown key" in _train_error(capsys, "--data", str(train), "--out", out, "optim.learning_rate=1")
    assert "sum to 1" in _train_error(capsys, "--data", str(train), "--out", out, "data.ratios={pairs: 0.9}")
    assert "not divisible" in _train_error(capsys, "--data", str(train), "--out", out, "run.global_batch_size=20")
    # a checkpoint from another config
    assert "another model config" in _train_error(
        capsys, "--data", str(train), "--out", str(run), "--steps", "5", "model.overrides.multimodal.num_layers=1"
    )
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_eval_errors(capsys, tmp_path):
    code = main(["eval", "retrieval", "--checkpoint", str(tmp_path / "none"), "--data", str(tmp_path), "--json"])
    assert code == 2 and "flava: error:" in capsys.readouterr().err
