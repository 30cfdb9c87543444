"""Zero-shot evaluation: image-text retrieval (R@1/5/10 both ways) and image classification from class-name prompts.

Models load from a run directory (latest DCP checkpoint + RUN/tokenizer), a checkpoint directory, or a
transformers FLAVA directory / hub name (e.g. RUN/final or facebook/flava-full, which carries its tokenizer).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt_mod
from .config import FlavaConfig
from .data import DataError, decode_eval, normalize_images, read_pairs
from .model import FlavaForPretraining
from .tokenizer import TextTokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: FlavaForPretraining
    tokenizer: TextTokenizer
    text_max_length: int
    source: str


def load_for_eval(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    p = Path(path)
    text_len = 77
    if (p / "checkpoints").is_dir() or (p / "meta.json").is_file():
        ckpt = p if (p / "meta.json").is_file() else ckpt_mod.latest_checkpoint(p)
        if ckpt is None:
            raise ckpt_mod.CheckpointError(f"{p}: no complete checkpoint under {p / 'checkpoints'}")
        run_dir = ckpt.parent.parent
        meta = ckpt_mod.read_meta(ckpt)
        model = FlavaForPretraining(FlavaConfig.from_dict(meta["model_config"]))
        ckpt_mod.load_model_weights(ckpt, model)
        tokenizer = load_tokenizer(run_dir / "tokenizer")
        text_len = int(meta.get("run_config", {}).get("data", {}).get("text_max_length", 77))
        source = str(ckpt)
    else:
        from .convert import from_pretrained

        try:
            model = from_pretrained(str(path))
            tokenizer = load_tokenizer(path)
        except Exception as e:  # noqa: BLE001 - one clear error type for the CLI
            raise ckpt_mod.CheckpointError(
                f"{path}: not a run directory, a checkpoint or a transformers FLAVA model ({e})"
            ) from None
        text_len = min(77, model.config.text.max_position_embeddings)
        source = str(path)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, text_len, source)


@torch.no_grad()
def embed_images(lm: LoadedModel, images: list[bytes], batch_size: int = 64, device="cpu") -> tuple[torch.Tensor, list[int]]:
    """L2-normalised image embeddings and the indices of the images that decoded (the others are skipped)."""
    size = lm.model.config.image.image_size
    arrays, ok = [], []
    for i, data in enumerate(images):
        try:
            arrays.append(decode_eval(data, size))
            ok.append(i)
        except Exception:  # noqa: BLE001 - an undecodable image is skipped and counted by the caller
            continue
    out = []
    for s in range(0, len(arrays), batch_size):
        px = torch.from_numpy(np.stack(arrays[s : s + batch_size])).permute(0, 3, 1, 2)
        out.append(F.normalize(lm.model.encode_image(normalize_images(px.to(device))).float(), dim=-1))
    dim = lm.model.config.projection_dim
    return (torch.cat(out) if out else torch.zeros(0, dim)), ok


@torch.no_grad()
def embed_texts(lm: LoadedModel, texts: list[str], batch_size: int = 256, device="cpu") -> torch.Tensor:
    out = []
    for s in range(0, len(texts), batch_size):
        ids, attn = lm.tokenizer.encode(texts[s : s + batch_size], lm.text_max_length)
        out.append(F.normalize(lm.model.encode_text(ids.to(device), attn.to(device)).float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, lm.model.config.projection_dim)


def recall_at_k(sim: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """``sim [Q, N]`` with the true match of query i at column i -> fraction of queries whose match ranks < k."""
    target = sim.diagonal().unsqueeze(1)
    rank = (sim > target).sum(dim=1)  # ties count in the query's favour
    return {k: float((rank < k).float().mean()) for k in ks}


def retrieval(
    model_path: str | os.PathLike, data: list[str], split: str | None = None, limit: int | None = 1000,
    device: str = "cpu",
) -> dict:  # fmt: skip
    """Zero-shot retrieval on the pairs of ``data``: each image against all captions (i2t) and back (t2i)."""
    lm = load_for_eval(model_path, device)
    images, texts = read_pairs(list(data), split=split, limit=limit)
    if not texts:
        raise DataError(f"no pairs found in {list(data)}" + (f" with split={split!r}" if split else ""))
    img, ok = embed_images(lm, images, device=device)
    texts = [texts[i] for i in ok]
    txt = embed_texts(lm, texts, device=device)
    sim = img @ txt.t()
    i2t, t2i = recall_at_k(sim), recall_at_k(sim.t())
    res = {f"i2t_r{k}": v for k, v in i2t.items()}
    res.update({f"t2i_r{k}": v for k, v in t2i.items()})
    res.update(n=len(texts), skipped=len(images) - len(ok), chance_r1=1.0 / max(1, len(texts)), model=lm.source)
    return res


def zeroshot(
    model_path: str | os.PathLike, data: list[str], classes: list[str], templates: list[str] | None = None,
    label_key: str = "label", split: str | None = None, limit: int | None = 1000, device: str = "cpu",
) -> dict:  # fmt: skip
    """Classify images against prompts built from ``classes`` (templates averaged, as CLIP). The true label of a
    row is ``meta[label_key]`` when the shard's meta JSON has it, else the longest class name in its caption."""
    import pyarrow.parquet as pq

    from pmd.schema import META

    from .data import resolve_files

    templates = templates or ["a photo of a {}."]
    lm = load_for_eval(model_path, device)
    images, texts = read_pairs(list(data), split=split, limit=limit)
    metas: list[str | None] = []
    for path in data:  # meta aligned with read_pairs' order
        for f in resolve_files(path, "pairs")[1]:
            pf = pq.ParquetFile(f)
            if META in pf.schema_arrow.names:
                rows = pf.read(columns=[META] + (["split"] if split else [])).to_pydict()
                metas += [m for i, m in enumerate(rows[META]) if not split or rows["split"][i] == split]
            else:
                metas += [None] * pf.metadata.num_rows
    labels = []
    by_len = sorted(range(len(classes)), key=lambda i: -len(classes[i]))
    for i, text in enumerate(texts):
        label = None
        m = metas[i] if i < len(metas) else None
        if m:
            try:
                value = json.loads(m).get(label_key)
                label = classes.index(value) if value in classes else None
            except (ValueError, AttributeError):
                label = None
        if label is None:
            low = text.lower()
            label = next((c for c in by_len if classes[c].lower() in low), None)
        labels.append(label)
    keep = [i for i, lab in enumerate(labels) if lab is not None]
    img, ok = embed_images(lm, [images[i] for i in keep], device=device)
    y = torch.tensor([labels[keep[i]] for i in ok])
    weights = []
    for c in classes:
        e = embed_texts(lm, [t.format(c) for t in templates], device=device).mean(0)
        weights.append(F.normalize(e, dim=-1))
    logits = img @ torch.stack(weights).t()
    k5 = min(5, len(classes))
    top = logits.topk(k5, dim=1).indices
    return {
        "top1": float((top[:, 0] == y).float().mean()) if len(y) else 0.0,
        "top5": float((top == y[:, None]).any(1).float().mean()) if len(y) else 0.0,
        "n": int(len(y)), "unlabelled": len(texts) - len(keep), "classes": len(classes),
        "chance_top1": 1.0 / len(classes), "model": lm.source,
    }  # fmt: skip
