"""The image tokenizer: the DALL-E dVAE encoder as transformers' ``FlavaImageCodebook``.

It is frozen (``requires_grad=False``), in ``eval()``, in fp32 with autocast off, and it is NOT a submodule of
``FlavaForPretraining``: it stays outside FSDP and the optimizer. ``ImageCodebook`` is a thin non-``nn.Module``
wrapper so that ``model.parameters()``, ``model.train()`` or ``fully_shard(model)`` can never reach it.

Inputs are the codebook crop (the same crop as the encoder image, resized to ``8 x patch grid`` = 112 px for
224/16), scaled to [0, 1] and then ``map_pixels``-ed to [0.1, 0.9], as in DALL-E / torchmultimodal / transformers'
``FlavaImageProcessor(return_codebook_pixels=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from .config import CodebookConfig

HUB_NAME = "facebook/flava-image-codebook"
LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """[0, 1] pixels -> [eps, 1 - eps] (DALL-E ``map_pixels``)."""
    return (1 - 2 * eps) * x + eps


def _hf_config(cfg: CodebookConfig):
    from transformers import FlavaImageCodebookConfig

    return FlavaImageCodebookConfig(
        hidden_size=cfg.hidden_size,
        num_groups=cfg.num_groups,
        num_blocks_per_group=cfg.num_blocks_per_group,
        input_channels=cfg.input_channels,
        vocab_size=cfg.vocab_size,
        freeze=True,
    )


CODEBOOK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # model.codebook_dtype


class ImageCodebook:
    """Frozen dVAE encoder (fp32 unless ``to(dtype=...)``); ``codebook(pixels)`` -> token ids
    ``[B, (H/8)*(W/8)]`` (int64)."""

    def __init__(self, model) -> None:
        self.model = model.float().eval()
        self.dtype = torch.float32
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ImageCodebook":
        """``dtype``: the weights' and the compute's (``model.codebook_dtype``); bf16 halves the codebook's
        ~52 GFLOP per 224 px image at the cost of some token ids (flava.train, docs/pretrain.md)."""
        self.dtype = dtype or self.dtype
        self.model.to(device=device, dtype=self.dtype)
        return self

    @torch.no_grad()
    def __call__(self, pixel_values: Tensor) -> Tensor:
        return self.token_ids(pixel_values)

    @torch.no_grad()
    def token_ids(self, pixel_values: Tensor) -> Tensor:
        """``[B, 3, 8g, 8g]`` map_pixels-ed images -> ``[B, g*g]`` codebook ids, computed in ``self.dtype`` (not
        under the caller's autocast: fp32 by default; bf16 changes some ids, tests/flava/test_codebook.py)."""
        self.model.eval()
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.model(x)
        return logits.argmax(dim=1).flatten(1)


RANDOM_CODEBOOK_WARNING = (
    "!!! model.codebook=random: the MIM and MMM-image targets come from a RANDOMLY initialised dVAE, not DALL-E's. "
    "Fine for tests and demos; for real pretraining set model.codebook=facebook/flava-image-codebook "
    "(or a local copy from `flava fetch-assets`) !!!"
)


def random_codebook(config: CodebookConfig | None = None, seed: int | None = 0) -> ImageCodebook:
    """A randomly initialised codebook (offline tests, benchmarks)."""
    from transformers import FlavaImageCodebook

    cfg = config or CodebookConfig()
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = FlavaImageCodebook(_hf_config(cfg))
    else:
        model = FlavaImageCodebook(_hf_config(cfg))
    return ImageCodebook(model)


def load_codebook(
    path_or_name: str | os.PathLike | None = HUB_NAME,
    *,
    config: CodebookConfig | None = None,
    random_init: bool = False,
    device: str | torch.device | None = None,
) -> ImageCodebook:
    """Load the dVAE encoder.

    * ``random_init=True`` or ``path_or_name=None``: random weights of ``config`` (offline tests);
    * a directory saved by ``FlavaImageCodebook.save_pretrained`` (config.json + weights) or the hub name
      ``facebook/flava-image-codebook`` (uses the local HF cache; set ``HF_HUB_OFFLINE=1`` to forbid downloads);
    * a single ``.safetensors`` / ``.pt`` / ``.bin`` file holding a ``FlavaImageCodebook`` state dict, built with
      ``config`` (default: the DALL-E sizes).
    """
    from transformers import FlavaImageCodebook

    if random_init or path_or_name is None:
        cb = random_codebook(config)
    else:
        p = Path(path_or_name)
        if p.is_file():
            if p.suffix == ".safetensors":
                from safetensors.torch import load_file

                sd = load_file(str(p))
            else:
                sd = torch.load(str(p), map_location="cpu", weights_only=True)
            sd = {k.removeprefix("image_codebook."): v for k, v in sd.items()}
            model = FlavaImageCodebook(_hf_config(config or CodebookConfig()))
            model.load_state_dict(sd, strict=True)
            cb = ImageCodebook(model)
        else:
            cb = ImageCodebook(FlavaImageCodebook.from_pretrained(str(path_or_name)))
    if device is not None:
        cb.to(device)
    return cb
