"""Masking statistics: BEiT block masking on the patch grid and BERT 15% (80/10/10) text masking."""

import torch

from flava.masking import MASK_ID, BlockMaskGenerator, bert_mask_tokens


def _components(mask: torch.Tensor) -> list[int]:
    """Sizes of the 4-connected masked regions."""
    h, w = mask.shape
    seen = torch.zeros_like(mask)
    sizes = []
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                stack, n = [(i, j)], 0
                seen[i, j] = True
                while stack:
                    a, b = stack.pop()
                    n += 1
                    for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        x, y = a + da, b + db
                        if 0 <= x < h and 0 <= y < w and mask[x, y] and not seen[x, y]:
                            seen[x, y] = True
                            stack.append((x, y))
                sizes.append(n)
    return sizes


def test_block_mask_paper_defaults_fraction_and_blocks():
    gen = BlockMaskGenerator()  # 14x14, 75 patches, blocks >= 16, aspect [0.3, 1/0.3]
    g = torch.Generator().manual_seed(0)
    masks = [gen(g) for _ in range(200)]
    counts = torch.tensor([int(m.sum()) for m in masks], dtype=torch.float32)
    assert all(m.shape == (14, 14) and m.dtype == torch.bool for m in masks)
    assert counts.max() <= 75
    assert counts.mean() >= 72, counts.mean()  # BEiT typically lands at 74-75
    assert abs(counts.mean() / 196 - 0.38) < 0.02
    # blocks, not scattered patches: few connected regions, nearly all masked patches in regions of >= 12
    # (a block of area >= 16 rounds to >= 12 cells; only the last block may add a small remainder)
    sizes = [_components(m) for m in masks[:50]]
    assert sum(len(s) for s in sizes) / len(sizes) <= 4
    big = sum(sum(x for x in s if x >= 12) for s in sizes)
    assert big / sum(sum(s) for s in sizes) > 0.95


def test_block_mask_shapes_respect_aspect_ratio():
    gen = BlockMaskGenerator(input_size=14, num_masking_patches=20, min_num_patches=16, max_num_patches=20)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        m = gen(g)
        rows = m.any(1).nonzero().flatten()
        cols = m.any(0).nonzero().flatten()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        if m.sum() == h * w:  # a single rectangle
            assert 12 <= h * w <= 20  # area ~ U(16, 20), h and w rounded
            assert 0.3 / 1.5 <= h / w <= 1.5 / 0.3  # rounding of sqrt(area*aspect) widens the bound slightly


def test_block_mask_deterministic_and_configurable():
    gen = BlockMaskGenerator(input_size=(4, 4), num_masking_patches=6, min_num_patches=2)
    a = gen.batch(8, torch.Generator().manual_seed(3))
    b = gen.batch(8, torch.Generator().manual_seed(3))
    c = gen.batch(8, torch.Generator().manual_seed(4))
    assert a.shape == (8, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(1) <= 6).all() and (a.sum(1) >= 2).all()


def test_bert_masking_80_10_10():
    g = torch.Generator().manual_seed(0)
    vocab = 30522
    ids = torch.randint(1000, vocab, (512, 77), generator=g)
    ids[:, 0] = 101
    ids[:, -1] = 102
    attn = torch.ones_like(ids)
    attn[:, 60:] = 0
    ids[:, 60:] = 0
    masked, labels = bert_mask_tokens(ids, vocab_size=vocab, attention_mask=attn, generator=g)
    sel = labels.ne(-100)
    eligible = attn.bool().clone()
    eligible[:, 0] = False
    assert not sel[~eligible].any()  # never CLS/SEP/padding
    assert torch.equal(labels[sel], ids[sel])
    frac = sel.sum() / eligible.sum()
    assert abs(frac.item() - 0.15) < 0.01
    n = sel.sum().item()
    to_mask = (masked.eq(MASK_ID) & sel).sum().item() / n
    kept = (masked.eq(ids) & sel).sum().item() / n
    rand = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(rand - 0.1) < 0.015
    assert torch.equal(masked[~sel], ids[~sel])


def test_bert_masking_deterministic():
    ids = torch.randint(1000, 2000, (4, 32))
    a = bert_mask_tokens(ids, vocab_size=30522, generator=torch.Generator().manual_seed(5))
    b = bert_mask_tokens(ids, vocab_size=30522, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_itm_negatives_in_batch():
    from flava.masking import itm_negatives

    g = torch.Generator().manual_seed(0)
    idx, labels = itm_negatives(10_000, 0.1, g)
    neg = labels.eq(0)
    assert abs(neg.float().mean().item() - 0.1) < 0.01
    assert (idx[neg] != torch.arange(10_000)[neg]).all()  # a negative never keeps its own text
    assert torch.equal(idx[~neg], torch.arange(10_000)[~neg])
    idx1, labels1 = itm_negatives(1, 0.5, g)
    assert idx1.tolist() == [0] and labels1.tolist() == [1]
