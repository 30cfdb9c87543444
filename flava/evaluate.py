"""Zero-shot evaluation: image-text retrieval (R@1/5/10 both ways) and image classification from class-name prompts.

Models load from a run directory (latest DCP checkpoint + RUN/tokenizer), a checkpoint directory, or a
transformers FLAVA directory / hub name (e.g. RUN/final or facebook/flava-full, which carries its tokenizer).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt_mod
from .config import FlavaConfig
from .data import DataError, decode_eval, normalize_images
from .model import FlavaForPretraining
from .templates import IMAGENET_TEMPLATES
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
def embed_texts(lm: LoadedModel, texts: list[str], batch_size: int = 256, device="cpu") -> torch.Tensor:
    out = []
    for s in range(0, len(texts), batch_size):
        ids, attn = lm.tokenizer.encode(texts[s : s + batch_size], lm.text_max_length)
        out.append(F.normalize(lm.model.encode_text(ids.to(device), attn.to(device)).float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, lm.model.config.projection_dim)


def retrieval_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard image-text retrieval protocol (COCO / Flickr30k, as CLIP and FLAVA report it).

    ``image_emb [I, D]`` (each image once), ``text_emb [T, D]`` (every caption), ``text_image [T]`` the image index of
    each caption. Returns ``(i2t_rank [I], t2i_rank [T])``: for an image, the rank of its best-ranked caption among
    all T captions; for a caption, the rank of its image among all I images (0 = first; ties count in the query's
    favour). Recall@k is the fraction of ranks < k. Computed in chunks: never an I x T matrix at once."""
    text_image = text_image.long()
    n_img = image_emb.shape[0]
    i2t = torch.empty(n_img, dtype=torch.long)
    for s in range(0, n_img, chunk):
        sim = image_emb[s : s + chunk] @ text_emb.t()
        own = text_image[None, :] == torch.arange(s, s + sim.shape[0])[:, None]
        best = sim.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
        i2t[s : s + sim.shape[0]] = (sim > best).sum(dim=1)
    t2i = torch.empty(text_emb.shape[0], dtype=torch.long)
    for s in range(0, text_emb.shape[0], chunk):
        sim = text_emb[s : s + chunk] @ image_emb.t()
        true = sim.gather(1, text_image[s : s + sim.shape[0], None])
        t2i[s : s + sim.shape[0]] = (sim > true).sum(dim=1)
    return i2t, t2i


def retrieval_metrics(image_emb, text_emb, text_image, ks=(1, 5, 10)) -> dict:
    """``{i2t_r1.., t2i_r1.., n_images, n_texts}`` by :func:`retrieval_ranks`."""
    image_emb, text_emb = torch.as_tensor(image_emb).float(), torch.as_tensor(text_emb).float()
    i2t, t2i = retrieval_ranks(image_emb, text_emb, torch.as_tensor(text_image))
    res = {f"i2t_r{k}": float((i2t < k).float().mean()) if len(i2t) else 0.0 for k in ks}
    res.update({f"t2i_r{k}": float((t2i < k).float().mean()) if len(t2i) else 0.0 for k in ks})
    res.update(n_images=int(image_emb.shape[0]), n_texts=int(text_emb.shape[0]))
    return res


def iter_eval_rows(paths: list[str], split: str | None = None, limit: int | None = None):
    """``(image_key, image bytes, text, meta)`` of every pair row in file order, streamed one row group at a time. The
    key identifies the image across rows: the shard's ``image_sha256`` column, else the sha256 of the bytes; ``meta``
    is the row's meta JSON string (None without that column)."""
    import hashlib

    from pmd.schema import IMAGE, IMAGE_SHA256, META, SPLIT, TEXT

    from .data import parquet_file, resolve_files

    n = 0
    for path in paths:
        for f in resolve_files(path, "pairs")[1]:
            pf = parquet_file(f)
            names = pf.schema_arrow.names
            missing = [c for c in (IMAGE, TEXT) if c not in names]
            if missing:
                raise DataError(f"{f}: wrong schema for pairs: missing column(s) {missing}")
            if split and SPLIT not in names:
                raise DataError(f"{f}: --split {split!r} given but the shard has no {SPLIT!r} column")
            cols = [IMAGE, TEXT] + [c for c in (IMAGE_SHA256, META) if c in names] + ([SPLIT] if split else [])
            for g in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(g, columns=cols).to_pydict()
                for i in range(len(t[TEXT])):
                    if split and t[SPLIT][i] != split:
                        continue
                    img = t[IMAGE][i]
                    key = t[IMAGE_SHA256][i] if IMAGE_SHA256 in t and t[IMAGE_SHA256][i] else None
                    yield key or hashlib.sha256(img).hexdigest(), img, t[TEXT][i], t[META][i] if META in t else None
                    n += 1
                    if limit is not None and n >= limit:
                        return


@torch.no_grad()
def retrieval_embeddings(
    lm: LoadedModel, data: list[str], split: str | None = None, limit: int | None = None, device="cpu",
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Embed each distinct image once and every caption: ``(image_emb [I, D], text_emb [T, D], text_image [T],
    counts)``. Images are embedded as they stream by (only a batch of pixels is held); captions of an image that
    does not decode are dropped and counted."""
    rows = ((key, img, text) for key, img, text, _ in iter_eval_rows(list(data), split=split, limit=limit))
    return pair_embeddings(lm, rows, device=device, batch_size=batch_size)


def karpathy_rows(karpathy: str | os.PathLike, images: list[str], split: str = "test", dataset: str | None = None,
                  limit: int | None = None):
    """``(image ref, bytes or None, caption)`` of a Karpathy split (COCO / Flickr30k test, every caption), the
    images read from their archives or folder by pmd.eval_sets; ``limit`` counts images."""
    from pmd.eval_sets import EvalSetError, iter_karpathy_split

    try:
        for n, (entry, data, error) in enumerate(iter_karpathy_split(karpathy, images, split, dataset)):
            if limit is not None and n >= limit:
                return
            if error:
                log.warning("%s: %s", entry.ref, error)
            for caption in entry.captions:
                yield entry.ref, data, caption
    except EvalSetError as e:
        raise DataError(str(e)) from None


@torch.no_grad()
def pair_embeddings(lm: LoadedModel, rows, device="cpu", batch_size: int = 64,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """:func:`retrieval_embeddings` of any ``(image key, image bytes or None, caption)`` stream."""
    size = lm.model.config.image.image_size
    index: dict[str, int] = {}  # image key -> row in image_emb; -1 = undecodable
    pending: list[np.ndarray] = []
    img_out: list[torch.Tensor] = []
    texts: list[str] = []
    text_keys: list[str] = []
    n_rows = dropped = n_images = 0

    def flush() -> None:
        if pending:
            px = torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).to(device)
            img_out.append(F.normalize(lm.model.encode_image(normalize_images(px)).float(), dim=-1).cpu())
            pending.clear()

    for key, img, text in rows:
        n_rows += 1
        if key not in index:
            try:
                if img is None:
                    raise ValueError("unreadable")
                pending.append(decode_eval(img, size))
            except Exception:  # noqa: BLE001 - an undecodable image is dropped and counted
                index[key] = -1
            else:
                index[key] = n_images
                n_images += 1
            if len(pending) >= batch_size:
                flush()
        if index[key] < 0:
            dropped += 1
            continue
        texts.append(text)
        text_keys.append(key)
    flush()
    dim = lm.model.config.projection_dim
    image_emb = torch.cat(img_out) if img_out else torch.zeros(0, dim)
    text_emb = embed_texts(lm, texts, device=device).cpu()
    text_image = torch.tensor([index[k] for k in text_keys], dtype=torch.long)
    counts = {"rows": n_rows, "undecodable_images": sum(1 for v in index.values() if v < 0), "dropped_texts": dropped}
    return image_emb, text_emb, text_image, counts


@torch.no_grad()
def image_features(lm: LoadedModel, images, device="cpu", batch_size: int = 64) -> tuple[torch.Tensor, list[int]]:
    """L2-normalised image embeddings of a stream of image bytes: ``(features [N, D], undecodable positions)``."""
    size = lm.model.config.image.image_size
    pending: list[np.ndarray] = []
    out: list[torch.Tensor] = []
    bad: list[int] = []

    def flush() -> None:
        if pending:
            px = torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).to(device)
            out.append(F.normalize(lm.model.encode_image(normalize_images(px)).float(), dim=-1).cpu())
            pending.clear()

    for i, img in enumerate(images):
        try:
            if img is None:
                raise ValueError("no image")
            pending.append(decode_eval(img, size))
        except Exception:  # noqa: BLE001 - an undecodable image is skipped and counted by the caller
            bad.append(i)
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    return (torch.cat(out) if out else torch.zeros(0, lm.model.config.projection_dim)), bad


@torch.no_grad()
def class_embeddings(lm: LoadedModel, classes: list[str], templates, device="cpu") -> torch.Tensor:
    """CLIP's prompt ensembling: each class's prompts are embedded and L2-normalised per template, averaged, and
    the mean renormalised. ``[C, D]``."""
    out = []
    for c in classes:
        e = embed_texts(lm, [t.format(c) for t in templates], device=device)  # rows already unit-norm
        out.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(out)


def retrieval(
    model_path: str | os.PathLike, data: list[str], split: str | None = None, limit: int | None = None,
    device: str = "cpu", save_embeddings: str | os.PathLike | None = None, karpathy: str | os.PathLike | None = None,
    images: list[str] | None = None, karpathy_dataset: str | None = None, lm: LoadedModel | None = None,
) -> dict:
    """Zero-shot image-text retrieval on the pairs of ``data`` (the whole split unless ``limit`` rows): images
    deduplicated, every caption kept, R@1/5/10 both ways by :func:`retrieval_ranks`. ``save_embeddings`` writes an
    ``.npz`` with ``image_embeddings``, ``text_embeddings`` and ``text_image_index`` (each text's image row), from
    which :func:`retrieval_metrics` recomputes every figure.

    With ``karpathy`` (Karpathy's split file, or caption_datasets.zip with ``karpathy_dataset``) the pairs are that
    file's ``split`` (default test: COCO 5k / Flickr30k 1k) and the images are read from ``images`` (archives or
    folders); ``data`` is then unused."""
    lm = lm or load_for_eval(model_path, device)
    if karpathy is not None:
        if not images:
            raise DataError("a Karpathy split file needs the images: give the image archive(s) or folder")
        rows = karpathy_rows(karpathy, images, split or "test", karpathy_dataset, limit)
        image_emb, text_emb, text_image, counts = pair_embeddings(lm, rows, device=device)
        where = f"{karpathy} ({split or 'test'} split)"
    else:
        if not data:
            raise DataError("no data: give held-out shards, or a Karpathy split file and its images")
        image_emb, text_emb, text_image, counts = retrieval_embeddings(lm, data, split=split, limit=limit,
                                                                       device=device)
        where = f"{list(data)}" + (f" with split={split!r}" if split else "")
    if not len(text_emb):
        raise DataError(f"no pairs found in {where}")
    if save_embeddings is not None:
        out = Path(save_embeddings)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, image_embeddings=image_emb.numpy(), text_embeddings=text_emb.numpy(),
                 text_image_index=text_image.numpy())
    res = retrieval_metrics(image_emb, text_emb, text_image)
    res.update(counts)
    res.update(chance_i2t_r1=float(np.mean(np.bincount(text_image.numpy()))) / len(text_emb),
               chance_t2i_r1=1.0 / len(image_emb), model=lm.source)
    return res


def zeroshot(
    model_path: str | os.PathLike, data: list[str], classes: list[str], templates: list[str] | None = None,
    label_key: str = "label", split: str | None = None, limit: int | None = None, device: str = "cpu",
    fmt: str | None = None, label_column: str = "label", lm: LoadedModel | None = None,
) -> dict:
    """Classify images against prompts built from ``classes``. ``templates`` default to CLIP's 80 ImageNet prompts
    (``flava.templates.IMAGENET_TEMPLATES``), ensembled as CLIP does (:func:`class_embeddings`). ``data`` is any of
    flava.eval_data's formats (image folders, WebDataset tars, Parquet with ``label_column``, PMD shards whose label
    is ``meta[label_key]`` or the longest class name in the caption)."""
    from .eval_data import LabelMap, folder_names, iter_labelled

    templates = list(templates or IMAGENET_TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise DataError(f"prompt template(s) without a {{}} for the class name: {bad}")
    to_index = LabelMap(classes, folder_names(data, fmt))
    lm = lm or load_for_eval(model_path, device)
    weights = class_embeddings(lm, classes, templates, device=device)
    k5 = min(5, len(classes))
    counts = {"n": 0, "top1": 0, "top5": 0, "rows": 0, "unlabelled": 0, "undecodable": 0}
    images: list[bytes] = []
    labels: list[int] = []

    def flush() -> None:  # images are scored a batch at a time: nothing of the split is held
        if not images:
            return
        img, bad_pos = image_features(lm, images, device=device)
        counts["undecodable"] += len(bad_pos)
        drop = set(bad_pos)
        y = torch.tensor([lab for i, lab in enumerate(labels) if i not in drop], dtype=torch.long)
        if len(y):
            top = (img.to(weights.device) @ weights.t()).topk(k5, dim=1).indices.cpu()
            counts["n"] += len(y)
            counts["top1"] += int((top[:, 0] == y).sum())
            counts["top5"] += int((top == y[:, None]).any(1).sum())
        images.clear()
        labels.clear()

    for image, raw in iter_labelled(list(data), fmt, classes, label_column=label_column, split=split, limit=limit,
                                    label_key=label_key):
        counts["rows"] += 1
        label = to_index(raw)
        if label is None:
            counts["unlabelled"] += 1
            continue
        images.append(image)
        labels.append(label)
        if len(images) >= 64:
            flush()
    flush()
    n = counts["n"]
    return {
        "templates": len(templates),
        "top1": counts["top1"] / n if n else 0.0,
        "top5": counts["top5"] / n if n else 0.0,
        "n": n, "rows": counts["rows"], "unlabelled": counts["unlabelled"], "undecodable": counts["undecodable"],
        "classes": len(classes), "chance_top1": 1.0 / len(classes), "model": lm.source,
    }
