"""Our zero-shot classification, retrieval and linear-probe figures against CLIP_benchmark's own metric code (the
evaluator LAION publishes) on the same generated data and the same model, through flava.clip_benchmark_adapter."""

import builtins
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pmd_cli.flava import main
from flava.clip_benchmark_adapter import (
    CaptionedImages,
    ClipBenchmarkModel,
    LabelledImages,
    clip_benchmark_templates,
    collate_captions,
)
from flava.eval_data import imagenet_classes
from flava.evaluate import load_for_eval
from flava.templates import IMAGENET_TEMPLATES

from .eval_sets import imagefolder_order, labelled, write_imagefolder, write_karpathy
from .shards import CLASSES
from .test_retrieval import hf_dir  # noqa: F401 - the tiny random FLAVA, a module fixture

cb_zs = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
cb_ret = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
cb_lp = pytest.importorskip("clip_benchmark.metrics.linear_probe")

TEMPLATES = list(IMAGENET_TEMPLATES[:4])


def _scalar(x):
    """float() of a one-element array, which numpy 2 refuses: CLIP_benchmark's accuracy() does it."""
    return builtins.float(np.asarray(x).reshape(-1)[0]) if isinstance(x, np.ndarray) else builtins.float(x)


@pytest.fixture(autouse=True)
def _numpy2_float(monkeypatch):
    # only the conversion is patched (the module's own `float`), never CLIP_benchmark's arithmetic
    monkeypatch.setattr(cb_zs, "float", _scalar, raising=False)


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bundled_imagenet_names_and_templates_are_clip_benchmarks():
    import importlib.resources

    ref = json.loads(importlib.resources.files("clip_benchmark.datasets").joinpath("en_classnames.json").read_text())
    assert imagenet_classes() == ref["imagenet1k"] and len(ref["imagenet1k"]) == 1000
    ref_t = json.loads(importlib.resources.files("clip_benchmark.datasets")
                       .joinpath("en_zeroshot_classification_templates.json").read_text())["imagenet1k"]
    assert clip_benchmark_templates(IMAGENET_TEMPLATES) == ref_t


def test_zeroshot_equals_clip_benchmark(hf_dir, tmp_path, capsys):  # noqa: F811
    samples = labelled(60, seed=4)
    folder = write_imagefolder(tmp_path / "folder", samples)
    assert main(["eval", "zeroshot", "--checkpoint", str(hf_dir), "--data", str(folder), "--classes",
                 ",".join(CLASSES), "--templates", "|".join(TEMPLATES), "--json"]) == 0
    ours = _json(capsys)
    lm = load_for_eval(hf_dir)
    model = ClipBenchmarkModel(lm)
    ordered = imagefolder_order(samples)
    ds = LabelledImages([s[0] for s in ordered], [CLASSES.index(s[1]) for s in ordered], CLASSES,
                        lm.model.config.image.image_size)
    theirs = cb_zs.evaluate(model, DataLoader(ds, batch_size=64), model.tokenizer, CLASSES,
                            clip_benchmark_templates(TEMPLATES), device="cpu", amp=False)
    assert ours["n"] == 60
    assert ours["top1"] == theirs["acc1"] and ours["top5"] == theirs["acc5"], (ours, theirs)
    assert ours["top5"] < 1.0  # 12 classes: a top-5 that is not trivially right


@pytest.mark.parametrize("flickr", [False, True], ids=["coco-zip", "flickr30k-folder"])
def test_karpathy_retrieval_equals_clip_benchmark(hf_dir, tmp_path, capsys, flickr):  # noqa: F811
    js, images, present = write_karpathy(tmp_path, n_test=30, n_train=5, flickr=flickr, missing=2)
    assert main(["eval", "retrieval", "--checkpoint", str(hf_dir), "--karpathy", str(js), "--images", str(images),
                 "--json"]) == 0
    ours = _json(capsys)
    n_texts = sum(len(c) for _, c in present)
    assert (ours["n_images"], ours["n_texts"], ours["undecodable_images"]) == (28, n_texts, 2)
    lm = load_for_eval(hf_dir)
    model = ClipBenchmarkModel(lm)
    ds = CaptionedImages([p[0] for p in present], [p[1] for p in present], lm.model.config.image.image_size)
    theirs = cb_ret.evaluate(model, DataLoader(ds, batch_size=64, collate_fn=collate_captions), model.tokenizer,
                             device="cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        assert ours[f"i2t_r{k}"] == theirs[f"text_retrieval_recall@{k}"], (k, ours, theirs)
        assert ours[f"t2i_r{k}"] == theirs[f"image_retrieval_recall@{k}"], (k, ours, theirs)
    assert 0 < ours["t2i_r5"] < 1


def _clip_benchmark_probe(tmp_path, monkeypatch, fit_x, fit_y, val_x, val_y, test_x, test_y) -> dict:
    """CLIP_benchmark's linear_probe.evaluate on our features (its cache layout), on CPU: it hard-codes .cuda(),
    which is made a no-op, and its train/infer run with device='cpu'."""
    root = tmp_path / "features"
    d = root / "flava"
    d.mkdir(parents=True)
    for split, x, y in (("train", fit_x, fit_y), ("val", val_x, val_y), ("test", test_x, test_y)):
        torch.save(torch.as_tensor(x, dtype=torch.float32), d / f"features_{split}.pt")
        torch.save(torch.as_tensor(y, dtype=torch.long), d / f"targets_{split}.pt")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    train, infer = cb_lp.train, cb_lp.infer
    monkeypatch.setattr(cb_lp, "train", lambda loader, i, o, wd, lr, ep, amp, device, seed:
                        train(loader, i, o, wd, lr, ep, amp, "cpu", seed))
    monkeypatch.setattr(cb_lp, "infer", lambda model, loader, amp, device: infer(model, loader, amp, "cpu"))
    monkeypatch.setattr(cb_lp, "print", lambda *a, **k: None, raising=False)
    return cb_lp.evaluate(None, None, None, fewshot_k=-1, batch_size=64, num_workers=0, lr=0.1, epochs=10,
                          model_id="flava", seed=0, feature_root=str(root), device="cuda", val_dataloader=[],
                          normalize=True, amp=False)


def test_linear_probe_features_are_clip_benchmarks_and_cached(hf_dir, tmp_path, capsys):  # noqa: F811
    from flava.linear_probe import linear_probe

    train = write_imagefolder(tmp_path / "train", labelled(48, seed=1))
    test = write_imagefolder(tmp_path / "test", labelled(24, seed=2))
    npz = tmp_path / "probe.npz"
    args = ["eval", "linear-probe", "--checkpoint", str(hf_dir), "--train", str(train), "--test", str(test),
            "--save-embeddings", str(npz), "--json"]
    assert main(args) == 0
    ours = _json(capsys)
    assert (ours["n_train"] + ours["n_val"], ours["n_test"], ours["classes"]) == (48, 24, 12)
    z = np.load(npz)
    # the cached features are CLIP_benchmark's Featurizer output on the same images, labels by sorted directory
    lm = load_for_eval(hf_dir)
    ordered = imagefolder_order(labelled(24, seed=2))
    ds = LabelledImages([s[0] for s in ordered], [sorted(CLASSES).index(s[1]) for s in ordered], sorted(CLASSES),
                        lm.model.config.image.image_size)
    with torch.no_grad():
        feats = torch.cat([cb_lp.Featurizer(ClipBenchmarkModel(lm))(x) for x, _ in DataLoader(ds, batch_size=64)])
    torch.testing.assert_close(torch.from_numpy(z["test_features"]), feats, atol=1e-5, rtol=0)
    assert z["test_labels"].tolist() == [y for _, y in ds]
    assert ours == dict(ours, **linear_probe(*(z[k] for k in ("train_features", "train_labels", "test_features",
                                                              "test_labels"))).as_dict())
    # a second run reads the cache: the images are gone
    for d in (train, test):
        for f in d.rglob("*.jpg"):
            f.unlink()
    assert main(args) == 0
    again = _json(capsys)
    assert {k: again[k] for k in ("top1", "best_c", "n_test")} == {k: ours[k] for k in ("top1", "best_c", "n_test")}


def _clusters(n_per: int, classes: int = 6, dim: int = 16, spread: float = 0.55, seed: int = 0):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(n, s):
        rng = np.random.default_rng(s)
        y = np.repeat(np.arange(classes), n)
        x = centres[y] + spread * rng.normal(size=(len(y), dim)) / np.sqrt(dim) * 4
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    return draw(n_per, seed + 1), draw(n_per // 2, seed + 2)


def test_linear_probe_agrees_with_clip_benchmark(tmp_path, monkeypatch):
    """The same protocol (regularisation chosen on a held-out fifth of train, refit on all of train) by our L-BFGS
    sweep and CLIP_benchmark's AdamW weight-decay sweep, on the same embeddings."""
    from flava.linear_probe import linear_probe, split_train

    (tr_x, tr_y), (te_x, te_y) = _clusters(40)
    ours = linear_probe(tr_x, tr_y, te_x, te_y).as_dict()
    fit, val = split_train(tr_y)
    theirs = _clip_benchmark_probe(tmp_path, monkeypatch, tr_x[fit], tr_y[fit], tr_x[val], tr_y[val], te_x, te_y)
    assert 0.6 < ours["top1"] < 0.97  # a separable-but-not-trivial set, where the regularisation matters
    assert abs(ours["top1"] - theirs["lp_acc1"]) <= 3 / len(te_y) + 1e-9, (ours, theirs)
