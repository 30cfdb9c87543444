"""The dVAE image tokenizer: transformers' FlavaImageCodebook, frozen, fp32, outside the model."""

import pytest
import torch

from flava.codebook import ImageCodebook, load_codebook, map_pixels, random_codebook
from flava.config import tiny
from flava.model import FlavaForPretraining


def test_random_codebook_token_ids_frozen_fp32():
    cfg = tiny()
    cb = load_codebook(None, config=cfg.codebook)
    assert isinstance(cb, ImageCodebook) and not isinstance(cb, torch.nn.Module)
    assert not cb.model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in cb.model.parameters())
    x = map_pixels(torch.rand(2, 3, cfg.codebook.image_size, cfg.codebook.image_size))
    ids = cb(x)
    assert ids.shape == (2, cfg.image.num_patches) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < cfg.codebook.vocab_size
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cb(x), ids)  # autocast is switched off inside
    # usable as MIM targets, and never part of the trained model
    model = FlavaForPretraining(cfg)
    assert not any(p is q for p in model.parameters() for q in cb.model.parameters())
    out = model(pixel_values=torch.randn(2, 3, 32, 32), patch_mask=torch.ones(2, 16, dtype=torch.bool),
                image_token_ids=ids)
    assert torch.isfinite(out.loss)


def test_codebook_deterministic_and_loads_from_files(tmp_path):
    cfg = tiny().codebook
    a, b = random_codebook(cfg, seed=0), random_codebook(cfg, seed=0)
    x = map_pixels(torch.rand(1, 3, 32, 32))
    assert torch.equal(a(x), b(x))
    # a save_pretrained directory and a bare state-dict file
    a.model.save_pretrained(tmp_path / "cb")
    c = load_codebook(tmp_path / "cb")
    torch.save(a.model.state_dict(), tmp_path / "cb.pt")
    d = load_codebook(tmp_path / "cb.pt", config=cfg)
    for other in (c, d):
        assert torch.equal(other(x), a(x))
        assert not other.model.training and not any(p.requires_grad for p in other.model.parameters())


def test_codebook_dtype_bf16_agrees_with_fp32_on_most_token_ids():
    """model.codebook_dtype=bf16: the weights and compute are bf16 and most ids equal fp32's on a fixed batch of
    smooth images (random dVAE weights: 98.4% here at 32 px, 97.6% at DALL-E's 112 px, CPU; docs/pretrain.md)."""
    import torch.nn.functional as F

    from flava.codebook import CODEBOOK_DTYPES, map_pixels, random_codebook
    from flava.config import tiny
    from flava.run_config import ConfigError, RunConfig, load_run_config

    cfg = tiny().codebook
    g = torch.Generator().manual_seed(0)
    low = torch.rand(16, 3, cfg.image_size // 8, cfg.image_size // 8, generator=g)
    x = F.interpolate(low, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False)
    x = map_pixels((x + 0.05 * torch.rand(x.shape, generator=g)).clamp(0, 1))
    cb = random_codebook(cfg, seed=0)
    ref = cb(x)
    cb.to(dtype=CODEBOOK_DTYPES["bf16"])
    assert all(p.dtype == torch.bfloat16 for p in cb.model.parameters())
    got = cb(x)
    agreement = (got == ref).float().mean().item()
    assert 0.9 <= agreement < 1.0, agreement  # < 1: the bf16 path really ran
    assert RunConfig().model.codebook_dtype == "fp32"
    with pytest.raises(ConfigError, match="codebook_dtype"):
        load_run_config("tiny", ["model.codebook_dtype=fp16"])
