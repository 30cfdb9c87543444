"""Retrieval by the standard protocol (images deduplicated, every caption kept), checked against torchmetrics'
RetrievalHitRate on the same embeddings, end to end through `flava eval retrieval --save-embeddings`; zero-shot
prompt ensembling over CLIP's 80 templates."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pmd_cli.flava import main
from flava.data import decode_eval, normalize_images
from flava.evaluate import class_embeddings, load_for_eval, retrieval_metrics
from flava.templates import IMAGENET_TEMPLATES

from .conftest import make_hf_config
from .shards import CLASSES, make_rows, write_build


def _toy(n_images=200, per_image=5, noise=0.35, seed=0, dim=64):
    """Captions near their image: a near-perfect model."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    text_image = torch.arange(n_images).repeat_interleave(per_image)
    txt = F.normalize(img[text_image] + noise * torch.randn(len(text_image), dim, generator=g) / dim**0.5, dim=-1)
    return img, txt, text_image


def _torchmetrics(img, txt, text_image) -> dict:
    """The same figures by an independent implementation: hit rate@k (a query is a hit when any relevant item is
    in its top k; for t2i there is one relevant image, so it equals recall@k)."""
    from torchmetrics.retrieval import RetrievalHitRate

    sim = img @ txt.t()  # [I, T]
    out = {}
    for name, s, target in (
        ("i2t", sim, text_image[None, :] == torch.arange(len(img))[:, None]),
        ("t2i", sim.t(), torch.arange(len(img))[None, :] == text_image[:, None]),
    ):
        q, n = s.shape
        indexes = torch.arange(q)[:, None].expand(q, n).reshape(-1)
        for k in (1, 5, 10):
            m = RetrievalHitRate(top_k=k)
            out[f"{name}_r{k}"] = float(m(s.reshape(-1), target.reshape(-1), indexes=indexes))
    return out


def test_toy_near_perfect_model_scores_high_by_the_protocol():
    img, txt, text_image = _toy()
    res = retrieval_metrics(img, txt, text_image)
    assert res["n_images"] == 200 and res["n_texts"] == 1000
    assert res["i2t_r1"] >= 0.92 and res["t2i_r1"] >= 0.92
    # the per-row protocol this replaces (each row its own item, only the diagonal counts) gives ~1/5 here
    sim = img[text_image] @ txt.t()
    assert float(((sim > sim.diagonal()[:, None]).sum(1) < 1).float().mean()) < 0.3


def test_matches_torchmetrics(noise=2.0):
    g = torch.Generator().manual_seed(1)
    n_images = 120
    per = torch.randint(1, 6, (n_images,), generator=g)  # 1..5 captions per image, uneven
    text_image = torch.arange(n_images).repeat_interleave(per)
    text_image = text_image[torch.randperm(len(text_image), generator=g)]  # captions in any order
    img = F.normalize(torch.randn(n_images, 32, generator=g), dim=-1)
    txt = F.normalize(img[text_image] + noise * torch.randn(len(text_image), 32, generator=g) / 32**0.5, dim=-1)
    ours = retrieval_metrics(img, txt, text_image)
    ref = _torchmetrics(img, txt, text_image)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-6), k
    assert 0.05 < ours["i2t_r1"] < 0.95  # mid-range, so a wrong rank rule would show
    assert ours["n_texts"] == int(per.sum())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random transformers FLAVA saved with a WordPiece tokenizer: a model `load_for_eval` accepts."""
    from transformers import FlavaForPreTraining

    from flava.tokenizer import train_wordpiece

    from .conftest import perturb_

    d = tmp_path_factory.mktemp("hf")
    captions = [f"a photo of a {c}" for c in CLASSES] + [t.format(c) for t in IMAGENET_TEMPLATES for c in CLASSES]
    train_wordpiece(captions, d, vocab_size=400)  # first: it replaces the directory
    torch.manual_seed(0)
    model = FlavaForPreTraining(make_hf_config(init_codebook=False))
    perturb_(model)
    model.save_pretrained(str(d))
    return d


def _multi_caption_build(path):
    """12 distinct images, 1..4 captions each (same bytes and sha256 on every row of an image), plus one undecodable
    image with two captions."""
    rows = []
    for i, r in enumerate(make_rows(12, seed=3, size=32, split="test")):
        for j in range(1 + i % 4):
            rows.append(dict(r, key=f"{r['key']}-{j}", text=f"{r['text']} number {j}"))
    bad = dict(rows[0], image=b"not an image", image_sha256=hashlib.sha256(b"not an image").hexdigest())
    rows += [dict(bad, key="bad-0", text="x"), dict(bad, key="bad-1", text="y")]
    order = np.random.default_rng(0).permutation(len(rows))
    return write_build(path, [rows[i] for i in order], shards=2, row_group_size=5)


def test_eval_retrieval_end_to_end_and_saved_embeddings(hf_dir, tmp_path, capsys):
    build = _multi_caption_build(tmp_path / "build")
    npz = tmp_path / "emb" / "e.npz"
    assert main(["eval", "retrieval", "--checkpoint", str(hf_dir), "--data", str(build), "--split", "test",
                 "--save-embeddings", str(npz), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    n_texts = sum(1 + i % 4 for i in range(12))
    assert (res["n_images"], res["n_texts"], res["undecodable_images"], res["dropped_texts"]) == (12, n_texts, 1, 2)
    assert res["rows"] == n_texts + 2
    z = np.load(npz)
    img, txt, idx = (torch.from_numpy(z[k]) for k in ("image_embeddings", "text_embeddings", "text_image_index"))
    assert img.shape[0] == 12 and txt.shape[0] == n_texts
    assert sorted(np.bincount(idx.numpy()).tolist()) == sorted(1 + i % 4 for i in range(12))
    ref = _torchmetrics(img, txt, idx)
    for k, v in ref.items():
        assert res[k] == pytest.approx(v, abs=1e-6), k
    # --limit counts rows
    assert main(["eval", "retrieval", "--checkpoint", str(hf_dir), "--data", str(build), "--limit", "7",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 7


def test_zeroshot_ensembles_clips_80_templates(hf_dir, tmp_path, capsys):
    lm = load_for_eval(hf_dir)
    classes = CLASSES[:4]
    emb = class_embeddings(lm, classes, IMAGENET_TEMPLATES)
    with torch.no_grad():
        for c, row in zip(classes[:2], emb):
            per = []
            for t in IMAGENET_TEMPLATES:  # one prompt at a time: normalise, average, renormalise
                ids, attn = lm.tokenizer.encode([t.format(c)], lm.text_max_length)
                per.append(F.normalize(lm.model.encode_text(ids, attn).float()[0], dim=-1))
            torch.testing.assert_close(row, F.normalize(torch.stack(per).mean(0), dim=-1), atol=1e-5, rtol=0)
    rows = [r for r in make_rows(96, seed=5, size=32, split="test") if json.loads(r["meta"])["label"] in classes]
    build = write_build(tmp_path / "zs", rows, shards=2, row_group_size=7)
    base = ["eval", "zeroshot", "--checkpoint", str(hf_dir), "--data", str(build), "--classes", ",".join(classes),
            "--json"]
    assert main(base) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["templates"] == 80 and res["n"] == len(rows) == 32
    with torch.no_grad():  # the same figures computed at once, by hand
        px = torch.from_numpy(np.stack([decode_eval(r["image"], 32) for r in rows])).permute(0, 3, 1, 2)
        img = F.normalize(lm.model.encode_image(normalize_images(px)).float(), dim=-1)
    logits = img @ emb.t()
    y = torch.tensor([classes.index(json.loads(r["meta"])["label"]) for r in rows])
    top = logits.argmax(dim=1)
    assert res["top1"] == pytest.approx(float((top == y).float().mean()), abs=1e-6)
    assert res["top5"] == pytest.approx(1.0)  # 4 classes: always within the top 5
    assert main(base + ["--single-template"]) == 0
    assert json.loads(capsys.readouterr().out)["templates"] == 1
