"""A fresh run is a pure function of config, data and seed: the WordPiece vocabulary learned from the captions is
deterministic (ties broken by text, not hash order) and equals the Rust trainer's where no tie decides, and two
`flava train` processes under different PYTHONHASHSEED give identical tokenizer files and losses."""

import json
import os
import subprocess
import sys

import pytest

from flava.tokenizer import SPECIAL_TOKENS, count_words, learn_wordpiece_vocab
from flava.metrics import LOSS_NAMES

from .shards import make_build

# every pair count differs at each merge up to a vocabulary of 24, so no tie decides the Rust trainer's result
NO_TIES = {"hug": 10, "pug": 6, "pun": 12, "bun": 4, "hugs": 5, "bug": 1}


def _texts(counts):
    return [w for w, n in counts.items() for _ in range(n)]


@pytest.mark.parametrize("vocab_size", [17, 19, 21, 24, 40])
def test_vocabulary_equals_the_rust_trainer_without_ties(vocab_size):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(_texts(NO_TIES), trainer=trainer)
    ours = learn_wordpiece_vocab(count_words(_texts(NO_TIES)), vocab_size)
    assert len(ours) == len(set(ours))
    assert set(ours) == set(tok.get_vocab())


def test_merges_by_count_then_text():
    vocab = learn_wordpiece_vocab(NO_TIES, 100)
    base = len(SPECIAL_TOKENS) + len(set("hugpnbs")) + len(set("ugns"))
    assert vocab[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    # (##u ##g) 21, (##u ##n) 16, (h ##ug) 15, (p ##un) 12, then a tie at 6: (p ##ug) before (hug ##s) 5 ...
    assert vocab[base : base + 5] == ["##ug", "##un", "hug", "pun", "pug"]
    # a tie: "ab" and "cd" both occur 3 times; the smaller text is merged first, whatever the input order
    for counts in ({"ab": 3, "cd": 3}, {"cd": 3, "ab": 3}):
        assert learn_wordpiece_vocab(counts, 100)[-2:] == ["ab", "cd"]
    assert learn_wordpiece_vocab({"ab": 1, "cd": 1}, 100, min_frequency=2)[-1] == "##d"  # no merge below 2


@pytest.mark.slow
def test_two_fresh_cpu_runs_under_different_hash_seeds_are_identical(tmp_path):
    """No data.tokenizer: each run learns its vocabulary from the captions, then trains 2 steps."""
    data = make_build(tmp_path / "data", n=48, seed=5, size=32, shards=1, row_group_size=16)
    runs = []
    for seed in ("0", "12345"):
        out = tmp_path / f"run{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        r = subprocess.run(
            [sys.executable, "-m", "pmd_cli.flava", "train", "--config", "tiny", "--data", str(data), "--out", str(out),
             "--steps", "2", "run.progress=false", "run.tensorboard=false", "run.export_final=false",
             "data.num_workers=0", "data.tokenizer_vocab_size=200", "data.ratios={pairs: 1.0}"],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(out)
    a, b = runs
    for f in ("tokenizer.json", "vocab.txt"):
        assert (a / "tokenizer" / f).read_bytes() == (b / "tokenizer" / f).read_bytes(), f
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert len(ma) == len(mb) == 2
    for x, y in zip(ma, mb):
        losses = {k for k in x if k == "loss" or k in LOSS_NAMES}
        assert {"loss", "global_contrastive", "itm"} <= losses
        assert losses == {k for k in y if k == "loss" or k in LOSS_NAMES}
        for key in losses:
            assert x[key] == y[key], (x["step"], key)
