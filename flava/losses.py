"""FLAVA pretraining losses: global contrastive (with an autograd-aware all-gather), ITM and masked prediction.

All losses return a mean over the selected rows/positions. A masked-prediction loss with nothing selected returns an
exact zero that is still attached to the graph (transformers and torchmultimodal return NaN there).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


# --------------------------------------------------------------------------------------------------------------
# distributed gather
# --------------------------------------------------------------------------------------------------------------
def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate ``x`` from every rank along dim 0; backward sums the gradient of each gathered copy and returns
    the owning rank's slice (reduce-scatter). Equivalent to ``torch.distributed.nn.functional.all_gather`` + cat, but
    one collective each way and no dependence on the gradient buffer being contiguous (pytorch#120386)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # type: ignore[override]
        world, rank = _world(group)
        ctx.group, ctx.world, ctx.rank = group, world, rank
        x = x.contiguous()
        if dist.get_backend(group) == "nccl":
            out = x.new_empty((world * x.shape[0], *x.shape[1:]))
            dist.all_gather_into_tensor(out, x, group=group)
            return out
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        n = grad.shape[0] // ctx.world
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty((n, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * n : (ctx.rank + 1) * n].contiguous(), None


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """``[B, ...]`` on each of W ranks -> ``[W*B, ...]`` on every rank, differentiable (global backprop)."""
    world, _ = _world(group)
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


def all_gather_no_grad(x: Tensor, group=None) -> Tensor:
    """``[B, ...]`` on each of W ranks -> ``[W*B, ...]``, no gradient (masks, labels)."""
    world, _ = _world(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def all_gather_local_grad(x: Tensor, group=None) -> Tensor:
    """Gather without cross-rank gradient; the local shard is re-inserted so gradient flows through it (open_clip /
    torchmultimodal ``BackpropType.LOCAL``)."""
    world, rank = _world(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[rank] = x
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------------------
def positive_pair_mask(itm_labels: Tensor | None, batch_size: int, device) -> Tensor | None:
    """Rows that are real (matched) pairs: ``itm_labels != 0``; all rows if the batch has no positive pair
    (transformers' ``pos | ~pos.any()``). ``None`` when there are no ITM labels (every row is a pair)."""
    if itm_labels is None:
        return None
    pos = itm_labels.reshape(batch_size).ne(0)
    return pos | ~pos.any()


def global_contrastive_loss(
    image_embedding: Tensor,
    text_embedding: Tensor,
    logit_scale: Tensor,
    pos_mask: Tensor | None = None,
    *,
    global_backprop: bool = True,
    exclude_negative_texts: bool = False,
    group=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """CLIP-style loss of local rows against the global batch.

    ``image_embedding``/``text_embedding``: projected (not yet normalised) CLS embeddings ``[B, D]``.
    ``logit_scale``: log temperature (already clamped by the caller). ``pos_mask``: ``[B]`` bool rows that count
    (ITM negatives excluded). With ``exclude_negative_texts`` the text columns of non-positive rows are removed
    from every other row's softmax too: an in-batch ITM negative carries another row's caption, so its column
    would be an exact duplicate of that row's positive (an identical "negative" logit). Image columns all stay.
    Returns ``(loss, logits_per_image [B, W*B], logits_per_text [B, W*B])``; excluded entries are ``-inf``.
    """
    # fp32 whatever the caller's autocast: at a scale near 100 a bf16 logit moves in steps of 0.5, which quantises
    # the softmax; under autocast a matmul of fp32 inputs would still run (and return) in bf16
    with torch.autocast(image_embedding.device.type, enabled=False):
        return _contrastive_fp32(image_embedding, text_embedding, logit_scale, pos_mask, global_backprop,
                                 exclude_negative_texts, group)


def _contrastive_fp32(image_embedding, text_embedding, logit_scale, pos_mask, global_backprop,
                      exclude_negative_texts, group) -> tuple[Tensor, Tensor, Tensor]:
    u = F.normalize(image_embedding.float(), dim=-1)
    v = F.normalize(text_embedding.float(), dim=-1)
    batch = u.shape[0]
    _, rank = _world(group)
    gather = all_gather_with_grad if global_backprop else all_gather_local_grad
    all_u, all_v = gather(u, group), gather(v, group)
    scale = logit_scale.float().exp().reshape(())
    logits_per_image = torch.matmul(u, all_v.t()) * scale
    logits_per_text = torch.matmul(v, all_u.t()) * scale
    labels = torch.arange(batch, device=u.device) + rank * batch
    if pos_mask is not None and exclude_negative_texts:
        all_pos = all_gather_no_grad(pos_mask.to(torch.uint8), group).bool()
        columns = torch.arange(all_pos.shape[0], device=u.device)
        # a row's own column is never excluded (a negative row's loss is dropped below; -inf there would be NaN)
        drop = ~all_pos[None, :] & columns[None, :].ne(labels[:, None])
        logits_per_image = logits_per_image.masked_fill(drop, float("-inf"))
    if pos_mask is None:
        loss_i = F.cross_entropy(logits_per_image, labels)
        loss_t = F.cross_entropy(logits_per_text, labels)
    else:
        w = pos_mask.to(u.dtype)
        denom = w.sum().clamp(min=1.0)
        loss_i = (F.cross_entropy(logits_per_image, labels, reduction="none") * w).sum() / denom
        loss_t = (F.cross_entropy(logits_per_text, labels, reduction="none") * w).sum() / denom
    return (loss_i + loss_t) / 2, logits_per_image, logits_per_text


def masked_prediction_loss(
    head: Callable[[Tensor], Tensor],
    hidden: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    row_mask: Tensor | None = None,
    positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``head(hidden)`` at the positions whose label is not ``ignore_index``.

    Only the selected positions go through ``head`` (the vocab projection is the expensive part).
    ``hidden [B, N, D]``, ``labels [B, N]``, ``row_mask [B]`` optionally restricts rows (ITM positives).
    ``positions``: the flat indices (into ``B*N``) of the labelled positions, computed on the host before the batch
    went to the device (``flava.train.prepare_batch``). With them the step has no data-dependent shape on the device:
    boolean indexing (``hidden[selected]``) calls nonzero, which waits for the device to finish every queued kernel
    before the host can go on. Rows outside ``row_mask`` are then weighted 0 instead of removed (same mean).
    Returns ``(loss, logits [n_selected, V])``; with nothing selected the loss is an exact, attached zero.
    """
    if positions is None:
        selected = labels.ne(ignore_index)
        if row_mask is not None:
            selected = selected & row_mask.reshape(-1, 1)
        logits = head(hidden[selected])
        targets = labels[selected]
        if targets.numel() == 0:
            return logits.sum() * 0.0, logits
        with torch.autocast(logits.device.type, enabled=False):
            return F.cross_entropy(logits.float(), targets), logits
    logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions))
    if positions.numel() == 0:  # a host-side shape: no synchronisation
        return logits.sum() * 0.0, logits
    targets = labels.reshape(-1).index_select(0, positions)
    weight = targets.ne(ignore_index).float()
    if row_mask is not None:
        rows = row_mask.reshape(-1, 1).expand(labels.shape).reshape(-1).index_select(0, positions)
        weight = weight * rows.float()
    with torch.autocast(logits.device.type, enabled=False):
        ce = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=ignore_index)
        # the sum over an empty selection is 0 (attached), as above
        return (ce * weight).sum() / weight.sum().clamp(min=1.0), logits


def itm_loss(itm_logits: Tensor, itm_labels: Tensor) -> Tensor:
    with torch.autocast(itm_logits.device.type, enabled=False):
        return F.cross_entropy(itm_logits.float(), itm_labels.reshape(-1).long())
