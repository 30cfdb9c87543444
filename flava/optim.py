"""AdamW with parameter groups and the warmup + cosine schedule.

No weight decay on norms, biases, embeddings (word/position/type, CLS and mask tokens) and the temperature: decay
there only shrinks quantities that have no reason to be small (common practice; torchmultimodal decays everything,
`examples/flava/native`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_NO_DECAY_NAMES = ("embeddings", "cls_token", "mask_token", "logit_scale")


def no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or any(k in name for k in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (keep if no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """``cfg``: a run_config.OptimSection. ``foreach`` (not fused): fused AdamW is not implemented for every
    device/DTensor combination, foreach is and is close in speed."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True
    )


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for the update that follows ``step`` completed updates: linear warmup from
    lr/warmup to lr over ``warmup`` updates, then cosine to ``min_ratio * lr`` at ``total``, flat after."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio)
    )
