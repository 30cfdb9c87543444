"""Masking for FLAVA pretraining, deterministic under a ``torch.Generator``.

* ``BlockMaskGenerator``: BEiT block-wise masking on the patch grid (transformers' ``FlavaMaskingGenerator``,
  torchmultimodal's ``ImageMaskingGenerator``): target 75 of 14x14 patches, blocks of >= 16 patches, aspect ratio in
  [0.3, 1/0.3]. Pure Python per sample: call it in dataloader workers.
* ``bert_mask_tokens``: BERT masking (``DataCollatorForLanguageModeling``): 15% of the non-special, non-padding
  tokens are selected; of those 80% become ``[MASK]``, 10% a random token, 10% stay unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# bert-base-uncased ids
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
BERT_SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)


def _uniform(g: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _randint(g: torch.Generator | None, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=g).item())


class BlockMaskGenerator:
    """BEiT block masking. ``gen(generator)`` -> bool ``[H, W]``; ``gen.batch(n, generator)`` -> bool ``[n, H*W]``.

    Per block up to 10 tries: area ~ U(min_num_patches, remaining), aspect = exp(U(log min, log max)),
    ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))``; the block must be smaller than the grid
    and add between 1 and ``remaining`` new patches. Stops at ``num_masking_patches`` or when no block fits, so
    the result can be slightly below target (typically 74-75 of 75).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 14,
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        if not 0 <= num_masking_patches <= self.height * self.width:
            raise ValueError(f"num_masking_patches {num_masking_patches} out of range for the grid")
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator({self.height}x{self.width}, target={self.num_masking_patches}, "
            f"block=[{self.min_num_patches}, {self.max_num_patches}], log_aspect={self.log_aspect})"
        )

    def _add_block(self, mask: list[list[bool]], max_patches: int, g) -> int:
        for _ in range(10):
            area = _uniform(g, self.min_num_patches, max_patches)
            aspect = math.exp(_uniform(g, *self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = _randint(g, 0, self.height - h)
                left = _randint(g, 0, self.width - w)
                new = sum(not mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < new <= max_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            mask[i][j] = True
                    return new
        return 0

    def __call__(self, generator: torch.Generator | None = None) -> Tensor:
        mask = [[False] * self.width for _ in range(self.height)]
        count = 0
        while count < self.num_masking_patches:
            delta = self._add_block(
                mask, min(self.num_masking_patches - count, self.max_num_patches), generator
            )
            if delta == 0:
                break
            count += delta
        return torch.tensor(mask, dtype=torch.bool)

    def batch(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.stack([self(generator).flatten() for _ in range(n)])


def bert_mask_tokens(
    input_ids: Tensor,
    *,
    vocab_size: int,
    mask_token_id: int = MASK_ID,
    special_token_ids: tuple[int, ...] = BERT_SPECIAL_IDS,
    attention_mask: Tensor | None = None,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    generator: torch.Generator | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """BERT masking of ``input_ids [B, L]`` -> ``(masked_ids, labels)``; ``labels`` is ``ignore_index`` where not
    selected. Special tokens and padding (``attention_mask == 0``) are never selected. Random replacements are
    drawn from the whole vocabulary (as transformers' collator)."""
    ids = input_ids.long()
    prob = torch.full(ids.shape, mlm_probability, dtype=torch.float32)
    special = torch.zeros(ids.shape, dtype=torch.bool)
    for t in special_token_ids:
        special |= ids.eq(t)
    if attention_mask is not None:
        special |= ~attention_mask.bool().cpu()
    prob.masked_fill_(special, 0.0)
    selected = torch.bernoulli(prob, generator=generator).bool()
    labels = ids.masked_fill(~selected, ignore_index)

    masked = ids.clone()
    to_mask = torch.bernoulli(torch.full(ids.shape, mask_replace_prob), generator=generator).bool() & selected
    masked[to_mask] = mask_token_id
    rest = 1.0 - mask_replace_prob
    p_random = random_replace_prob / rest if rest > 0 else 0.0
    to_random = (
        torch.bernoulli(torch.full(ids.shape, p_random), generator=generator).bool() & selected & ~to_mask
    )
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, dtype=torch.long)
    masked[to_random] = random_ids[to_random]
    return masked, labels


def itm_negatives(
    batch_size: int, probability: float = 0.1, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """In-batch ITM negatives for streaming data (transformers' model expects them made by the caller; torchmultimodal
    replaces a caption by a random dataset caption with probability 0.1 in its ``VLTransform``).

    Returns ``(text_index [B], itm_labels [B])``: row ``i`` keeps its own text (label 1) or, with ``probability``,
    takes the text of another row ``(i + s) % B``, ``s`` uniform in ``[1, B-1]`` (label 0). Apply ``text_index`` to
    every text tensor of the batch (ids, masked ids, attention mask, MLM labels); images stay in place."""
    idx = torch.arange(batch_size)
    labels = torch.ones(batch_size, dtype=torch.long)
    if batch_size < 2 or probability <= 0:
        return idx, labels
    neg = torch.rand(batch_size, generator=generator) < probability
    shift = torch.randint(1, batch_size, (batch_size,), generator=generator)
    idx = torch.where(neg, (idx + shift) % batch_size, idx)
    labels[neg] = 0
    return idx, labels
