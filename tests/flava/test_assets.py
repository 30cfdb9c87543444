"""Offline-ready runs: `flava fetch-assets` against a loopback stand-in for the hub (HF_ENDPOINT), then training
from the fetched copy with the hub gone; a missing asset offline is one exact line for train, eval and export."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flava.assets import select_files, verify_assets

from .hubserver import FakeHub
from .shards import make_build

COMMON = ["run.progress=false", "run.tensorboard=false", "data.num_workers=0", "run.export_final=false"]


def _flava(args, env_extra, timeout=240):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "pmd_cli.flava", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _offline(tmp_path):
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}


def _dir_files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub_repos(tmp_path_factory):
    """A tiny generated dVAE codebook and WordPiece tokenizer as hub repositories, plus files an asset must NOT
    fetch (a second weight format, TF weights, weights in a tokenizer repository)."""
    import torch
    from transformers import FlavaImageCodebook

    from flava.codebook import _hf_config
    from flava.config import tiny
    from flava.tokenizer import train_wordpiece

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    FlavaImageCodebook(_hf_config(tiny().codebook)).save_pretrained(str(root / "cb"))
    words = [f"a {c} {s} on a plain background" for c in ("red", "green", "blue", "yellow")
             for s in ("circle", "square", "triangle")]
    train_wordpiece(words * 4 + ["a photo of a"], root / "tok", vocab_size=200)
    codebook = _dir_files(root / "cb")
    codebook["pytorch_model.bin"] = b"an older copy of the weights"
    tokenizer = _dir_files(root / "tok")
    tokenizer.update({"pytorch_model.bin": b"model weights", "tf_model.h5": b"tf weights"})
    return {"acme/tiny-codebook": codebook, "acme/tiny-bert": tokenizer}


def _config(tmp_path) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "overrides": {"text": {"max_position_embeddings": 64}},
                  "codebook": "acme/tiny-codebook"},
        "data": {"tokenizer": "acme/tiny-bert", "text_max_length": 24, "text_only_max_length": 32},
        "run": {"global_batch_size": 8, "micro_batch_size": 8},
    }))
    return cfg


def test_select_files():
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack",
             "vocab.txt", "onnx/model.onnx", "tokenizer.json"]
    assert select_files(files, "model") == ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt"]
    assert select_files(["config.json", "pytorch_model.bin"], "model") == ["config.json", "pytorch_model.bin"]
    assert select_files(files, "tokenizer") == ["config.json", "tokenizer.json", "vocab.txt"]


def test_missing_asset_is_one_exact_line(tmp_path, capsys):
    # in process: conftest set HF_HUB_OFFLINE=1 before huggingface_hub was imported
    from pmd_cli.flava import main

    cfg = _config(tmp_path)
    build = make_build(tmp_path / "b", n=8, size=32, shards=1)
    assert main(["train", "--config", str(cfg), "--data", str(build), "--out", str(tmp_path / "run"), *COMMON]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"flava: error: missing asset codebook (model.codebook=acme/tiny-codebook): neither a local path nor in the "
        f"Hugging Face cache, and HF_HUB_OFFLINE is set; fetch it on a machine with network: flava fetch-assets "
        f"--config {cfg} --to ASSETS_DIR {' '.join(COMMON)}"
    ]
    assert not (tmp_path / "run").exists()
    assert main(["eval", "retrieval", "--checkpoint", "acme/flava-full", "--data", str(build)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "flava: error: missing asset model (--checkpoint=acme/flava-full): neither a local path nor in the Hugging "
        "Face cache, and HF_HUB_OFFLINE is set; fetch it on a machine with network: flava fetch-assets --config tiny "
        "--to ASSETS_DIR model.pretrained=acme/flava-full (then --checkpoint ASSETS_DIR/pretrained)"
    ]
    assert main(["export", "--checkpoint", "acme/flava-run", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("flava: error: missing asset model (--checkpoint=acme/flava-run): ")


@pytest.mark.slow
def test_asset_absent_from_a_reachable_hub(tmp_path):
    """In a subprocess: HF_ENDPOINT and HF_HUB_OFFLINE are read when huggingface_hub is imported."""
    cfg = _config(tmp_path)
    build = make_build(tmp_path / "b", n=8, size=32, shards=1)
    with FakeHub({}) as hub:
        r = _flava(["train", "--config", str(cfg), "--data", str(build), "--out", str(tmp_path / "run"), *COMMON],
                   {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf2"), "HF_HUB_DISABLE_TELEMETRY": "1"})
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
        assert r.stderr.startswith("flava: error: missing asset codebook (model.codebook=acme/tiny-codebook): neither "
                                   f"a local path nor in the Hugging Face cache, and not downloadable from {hub.url} (")
        r = _flava(["fetch-assets", "--config", str(cfg), "--to", str(tmp_path / "a")],
                   {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf2"), "HF_HUB_DISABLE_TELEMETRY": "1"})
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
        assert r.stderr.startswith(f"flava: error: cannot fetch asset codebook (model.codebook=acme/tiny-codebook) "
                                   f"from {hub.url}: ")


@pytest.mark.slow
def test_fetch_assets_then_train_offline(hub_repos, tmp_path):
    cfg = _config(tmp_path)
    out = tmp_path / "assets"
    with FakeHub(hub_repos) as hub:
        r = _flava(["fetch-assets", "--config", str(cfg), "--to", str(out), "--json"],
                   {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        requested = [p for _, p in hub.requests]
    manifest = json.loads(r.stdout)
    assert manifest == json.loads((out / "assets.json").read_text())
    recs = {a["name"]: a for a in manifest["assets"]}
    assert set(recs) == {"codebook", "tokenizer"}
    for name, repo in (("codebook", "acme/tiny-codebook"), ("tokenizer", "acme/tiny-bert")):
        rec = recs[name]
        assert rec["repo_id"] == repo and rec["revision"] == hashlib.sha1(repo.encode()).hexdigest()
        served = hub_repos[repo]
        for f in rec["files"]:
            assert f["sha256"] == hashlib.sha256(served[f["path"]]).hexdigest()
            assert f["size"] == len(served[f["path"]])
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(f["path"] for f in rec["files"])
    assert [f["path"] for f in recs["codebook"]["files"]] == ["config.json", "model.safetensors"]
    assert "pytorch_model.bin" not in {f["path"] for f in recs["tokenizer"]["files"]}
    assert not any(p.endswith((".bin", ".h5")) for p in requested)
    assert manifest["overrides"] == [f"model.codebook={out / 'codebook'}", f"data.tokenizer={out / 'tokenizer'}"]
    copy = yaml.safe_load((out / "config.yaml").read_text())
    assert copy["model"]["codebook"] == str(out / "codebook") and copy["data"]["tokenizer"] == str(out / "tokenizer")
    assert verify_assets(out) == []

    # the hub is gone and the process offline: the config copy trains
    build = make_build(tmp_path / "b", n=16, size=32, shards=1)
    r = _flava(["train", "--config", str(out / "config.yaml"), "--data", str(build), "--out", str(tmp_path / "run"),
                "--steps", "1", *COMMON], _offline(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 1
    (out / "codebook" / "config.json").write_text("{}")
    assert verify_assets(out) == [str(out / "codebook" / "config.json")]
