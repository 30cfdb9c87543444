"""Our checkpoint as CLIP_benchmark (LAION's evaluator, ``clip-benchmark`` on PyPI) expects a model: an object with
``encode_image(images)`` / ``encode_text(tokens)``, a tokenizer ``list[str] -> Tensor`` and torch datasets whose
images are already transformed. CLIP_benchmark's metric functions
(``clip_benchmark.metrics.zeroshot_classification.evaluate``, ``zeroshot_retrieval.evaluate``,
``linear_probe.evaluate``) then score our model by their own code: the independent check of flava.evaluate.

The images go through the same evaluation transform as ours (``flava.data.decode_eval``: shorter side resized,
centre crop; CLIP normalisation in ``encode_image``), so both evaluators see the same pixels. The tokenizer returns
ids and attention mask stacked as ``[B, 2, L]``, which ``encode_text`` unstacks: CLIP_benchmark passes the tensor
through untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import decode_eval, normalize_images
from .evaluate import LoadedModel


class ClipBenchmarkModel(torch.nn.Module):
    def __init__(self, lm: LoadedModel) -> None:
        super().__init__()
        self.lm = lm
        self.model = lm.model

    def encode_image(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(normalize_images(images_u8)).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens[:, 0], tokens[:, 1]).float()

    def tokenizer(self, texts: Sequence[str]) -> torch.Tensor:
        ids, attn = self.lm.tokenizer.encode(list(texts), self.lm.text_max_length)
        return torch.stack([ids, attn.to(ids.dtype)], dim=1)


def _pixels(data: bytes, size: int) -> torch.Tensor:
    return torch.from_numpy(np.array(decode_eval(data, size))).permute(2, 0, 1)


class LabelledImages(Dataset):
    """``(uint8 [3, H, W], class index)`` per image; ``classes`` as CLIP_benchmark's classification reads it."""

    def __init__(self, images: Sequence[bytes], labels: Sequence[int], classes: Sequence[str], size: int) -> None:
        self.images, self.labels, self.classes, self.size = list(images), list(labels), list(classes), size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return _pixels(self.images[i], self.size), self.labels[i]


class CaptionedImages(Dataset):
    """``(uint8 [3, H, W], [captions])`` per image: CLIP_benchmark's retrieval layout (use :func:`collate_captions`)."""

    def __init__(self, images: Sequence[bytes], captions: Sequence[Sequence[str]], size: int) -> None:
        self.images, self.captions, self.size = list(images), [list(c) for c in captions], size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return _pixels(self.images[i], self.size), self.captions[i]


def collate_captions(batch):
    images, captions = zip(*batch)
    return torch.stack(images), list(captions)


def clip_benchmark_templates(templates: Sequence[str]) -> list[str]:
    """Our ``{}`` templates in CLIP_benchmark's ``{c}`` spelling."""
    return [t.replace("{}", "{c}") for t in templates]
