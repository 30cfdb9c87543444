"""Linear probe: logistic regression on frozen image features, CLIP's protocol (Radford et al. 2021, appendix A.3).

Features are the model's L2-normalised image embeddings (``encode_image``, what zero-shot and CLIP_benchmark's
``Featurizer`` use). The L2 regularisation is chosen on a held-out part of the train split: a 97-point log grid of
C = 1/lambda from 1e-6 to 1e6, searched as CLIP_benchmark does (7 evenly spaced points, then around the best one
with spans 8, 4, 2, 1); the classifier is then refit on the whole train split with that C and scored on the test
split. scikit-learn's L-BFGS logistic regression, as CLIP used.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import DataError

log = logging.getLogger(__name__)

C_GRID = np.logspace(-6, 6, num=97)
COARSE = 7
VAL_FRACTION = 0.2
MAX_ITER = 1000
#: Arrays of a --save-embeddings file; reading it back skips the model (the features are the probe's input).
FEATURE_KEYS = ("train_features", "train_labels", "test_features", "test_labels")


@dataclass
class ProbeResult:
    top1: float
    top5: float | None
    best_c: float
    val_top1: float
    n_train: int
    n_val: int
    n_test: int
    classes: int
    searched: int  # how many C values were fitted

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _fit(x, y, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed).fit(x, y)


def _accuracy(clf, x, y, k: int = 1) -> float:
    proba = clf.predict_proba(x)
    top = clf.classes_[np.argsort(-proba, axis=1)[:, :k]]
    return float((top == y[:, None]).any(axis=1).mean())


def split_train(y: np.ndarray, fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(fit, val)`` of a class-stratified random held-out part of the train split (each class keeps at
    least one sample for fitting)."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = min(int(round(len(idx) * fraction)), len(idx) - 1)
        val.extend(idx[:n_val])
        fit.extend(idx[n_val:])
    return np.sort(np.array(fit, dtype=int)), np.sort(np.array(val, dtype=int))


def search_c(fit_x, fit_y, val_x, val_y, seed: int = 0) -> tuple[int, float, int]:
    """``(best grid index, its val top-1, fits)``: coarse grid then halving spans around the peak (ties keep the
    first, smaller C: the stronger regularisation)."""
    scores: dict[int, float] = {}

    def score(i: int) -> float:
        if i not in scores:
            scores[i] = _accuracy(_fit(fit_x, fit_y, float(C_GRID[i]), seed), val_x, val_y)
        return scores[i]

    def best_of(idxs) -> int:
        best = idxs[0]
        for i in idxs:
            if score(i) > score(best):
                best = i
        return best

    last = len(C_GRID) - 1
    peak = best_of([round(j * last / (COARSE - 1)) for j in range(COARSE)])
    span = 8
    while span > 0:
        peak = best_of(sorted({max(peak - span, 0), peak, min(peak + span, last)}))
        span //= 2
    return peak, scores[peak], len(scores)


def linear_probe(train_x, train_y, test_x, test_y, seed: int = 0, val_fraction: float = VAL_FRACTION) -> ProbeResult:
    """CLIP's linear-probe protocol on feature arrays (labels are class indices)."""
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    if len(np.unique(train_y)) < 2:
        raise DataError("a linear probe needs at least two classes in the train split")
    if not len(test_y):
        raise DataError("no labelled test images")
    fit, val = split_train(train_y, val_fraction, seed)
    if not len(val):
        raise DataError("the train split is too small to hold out a validation part (one sample per class)")
    peak, val_top1, fits = search_c(train_x[fit], train_y[fit], train_x[val], train_y[val], seed)
    clf = _fit(train_x, train_y, float(C_GRID[peak]), seed)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    return ProbeResult(
        top1=_accuracy(clf, test_x, test_y), top5=_accuracy(clf, test_x, test_y, 5) if n_classes >= 5 else None,
        best_c=float(C_GRID[peak]), val_top1=val_top1, n_train=len(fit), n_val=len(val), n_test=len(test_y),
        classes=n_classes, searched=fits,
    )


def _features(lm, data: list[str], classes: list[str] | None, fmt, label_column, limit, device, names: dict):
    """Features and class indices of one split; string labels share ``names`` (name -> index) across splits."""
    from .eval_data import iter_labelled
    from .evaluate import image_features

    images, labels, unlabelled = [], [], 0
    for image, raw in iter_labelled(data, fmt, classes, label_column=label_column, limit=limit):
        if raw is None or isinstance(raw, bool):
            unlabelled += 1
            continue
        if isinstance(raw, str):
            raw = names.setdefault(raw, len(names))
        images.append(image)
        labels.append(int(raw))
    feats, bad = image_features(lm, images, device=device)
    drop = set(bad)
    y = np.array([lab for i, lab in enumerate(labels) if i not in drop], dtype=np.int64)
    return feats.numpy(), y, {"unlabelled": unlabelled, "undecodable": len(bad)}


def run(model_path: str | os.PathLike | None, train: list[str], test: list[str], fmt: str | None = None,
        label_column: str = "label", classes: list[str] | None = None, limit: int | None = None, device="cpu",
        save_embeddings: str | os.PathLike | None = None, seed: int = 0, lm=None) -> dict:
    """``flava eval linear-probe``: features of ``train`` and ``test`` (or read back from ``save_embeddings`` when
    that file exists: the cache), then :func:`linear_probe`. Image folders label by directory name (the same
    directories in both splits); string labels share one name -> index map; integers are indices."""
    cache = Path(save_embeddings) if save_embeddings is not None else None
    counts: dict = {}
    if cache is not None and cache.is_file():
        z = np.load(cache)
        missing = [k for k in FEATURE_KEYS if k not in z]
        if missing:
            raise DataError(f"{cache}: not a linear-probe feature file (no {missing})")
        tr_x, tr_y, te_x, te_y = (z[k] for k in FEATURE_KEYS)
        source = json.loads(str(z["source"])) if "source" in z else {}
        log.info("linear probe: features read from %s", cache)
    else:
        from .evaluate import load_for_eval

        lm = lm or load_for_eval(model_path, device)
        names: dict[str, int] = {}
        tr_x, tr_y, c_train = _features(lm, list(train), classes, fmt, label_column, limit, device, names)
        te_x, te_y, c_test = _features(lm, list(test), classes, fmt, label_column, limit, device, names)
        counts = {"train_" + k: v for k, v in c_train.items()} | {"test_" + k: v for k, v in c_test.items()}
        source = {"model": lm.source, "train": list(train), "test": list(test), "labels": names}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "wb") as f:  # np.savez would append .npz to a name without it
                np.savez(f, train_features=tr_x, train_labels=tr_y, test_features=te_x, test_labels=te_y,
                         source=json.dumps(source))
    res = linear_probe(tr_x, tr_y, te_x, te_y, seed=seed).as_dict()
    res.update(counts, features=int(tr_x.shape[1]), model=source.get("model"))
    return res
