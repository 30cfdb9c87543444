"""No device->host synchronisation in the training step: the masked-prediction losses gather the positions found
on the host (``masked_positions``) instead of boolean indexing on the device, and give the same losses and
gradients as the boolean formulation; a whole optimizer step of every kind (gradient-cached or not, with the
codebook, clipping, AdamW and the scheduler) runs on the meta device, where every read of a device value (item,
nonzero, a boolean mask, a copy to the host) raises, as a stand-in for a GPU (CPU)."""

import contextlib

import pytest
import torch

from flava.codebook import random_codebook
from flava.config import tiny
from flava.losses import masked_prediction_loss
from flava.model import FlavaForPretraining, masked_positions
from flava.optim import build_optimizer, build_scheduler
from flava.run_config import OptimSection
from flava.train import check_gradients, forward_backward, prepare_batch

from .conftest import make_batch, perturb_

META = torch.device("meta")


def _model() -> FlavaForPretraining:
    torch.manual_seed(7)
    model = FlavaForPretraining(tiny())
    perturb_(model, seed=7)
    return model.train()


def _inputs(cfg, kind: str, seed: int) -> dict:
    b = make_batch(cfg, batch=4, seed=seed)
    if kind == "images":
        return {k: b[k] for k in ("pixel_values", "patch_mask", "image_token_ids")}
    if kind == "text":
        return {"input_ids_masked": b["input_ids_masked"], "attention_mask": b["attention_mask"],
                "mlm_labels": b["mlm_labels"]}
    return b


def _with_positions(batch: dict) -> dict:
    out = dict(batch)
    if "patch_mask" in batch:
        out["mim_positions"] = masked_positions(batch["patch_mask"].bool())
    if "mlm_labels" in batch:
        out["mlm_positions"] = masked_positions(batch["mlm_labels"].ne(-100))
    return out


@pytest.mark.parametrize("rows", [None, "some", "none"])
def test_gathered_positions_equal_boolean_indexing(rows):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(5, 7, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (5, 7), generator=g).masked_fill(torch.rand(5, 7, generator=g) < 0.6, -100)
    row_mask = {None: None, "some": torch.tensor([1, 0, 1, 1, 0]).bool(), "none": torch.zeros(5).bool()}[rows]
    ref, _ = masked_prediction_loss(head, hidden, labels, -100, row_mask)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    got, _ = masked_prediction_loss(head, hidden, labels, -100, row_mask, masked_positions(labels.ne(-100)))
    (g_got,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-7)
    if rows == "none":
        assert got.item() == 0.0 and got.requires_grad


@pytest.mark.parametrize("kind", ["pairs", "images", "text"])
def test_model_losses_with_positions_equal_the_boolean_formulation(kind):
    model = _model()
    batch = _inputs(model.config, kind, seed=3)
    ref = model(**batch)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = model(**_with_positions(batch))
    got.loss.backward()
    for name, v in ref.losses.as_dict().items():
        torch.testing.assert_close(getattr(got.losses, name), v, rtol=1e-6, atol=1e-6, msg=name)
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def _worker_batch(cfg, kind: str, seed: int) -> dict:
    """A batch as the loader hands it over (uint8 pixels and codebook pixels, host tensors)."""
    b = _inputs(cfg, kind, seed)
    g = torch.Generator().manual_seed(seed)
    out = {k: v for k, v in b.items() if k not in ("pixel_values", "image_token_ids")}
    if "pixel_values" in b:
        n, s = b["pixel_values"].shape[0], cfg.image.image_size
        out["pixels"] = torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)
        c = cfg.codebook.image_size
        out["codebook_pixels"] = torch.randint(0, 256, (n, 3, c, c), generator=g, dtype=torch.uint8)
    return out


def _meta_step(kind: str, cached: bool, positions: bool = True) -> None:
    model = _model().to(META)
    codebook = random_codebook(model.config.codebook, seed=0).to(META)
    optim_cfg = OptimSection(warmup_steps=1, total_steps=10)
    optimizer, batches = build_optimizer(model, optim_cfg), []
    scheduler = build_scheduler(optimizer, optim_cfg)
    for i in range(2):
        b = prepare_batch(_worker_batch(model.config, kind, seed=20 + i), META, codebook)
        if not positions:
            b = {k: v for k, v in b.items() if not k.endswith("_positions")}
        batches.append(b)
    forward_backward(model, iter(batches), 2, contextlib.nullcontext(), sync=False, cached=cached)
    check_gradients(model, kind, 1)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    model.clamp_logit_scale_()


@pytest.fixture
def meta_autocast(monkeypatch):
    """torch.autocast knows no meta device: the losses' fp32 regions become no-ops there (nothing to cast)."""
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)


@pytest.mark.parametrize("kind,cached", [("pairs", True), ("pairs", False), ("images", False), ("text", False)])
def test_a_step_reads_nothing_back_from_the_device_cpu_meta(kind, cached, meta_autocast):
    _meta_step(kind, cached)


@pytest.mark.parametrize("kind", ["images", "text"])
def test_boolean_indexing_would_read_back_cpu_meta(kind, meta_autocast):
    """The control: the old formulation (boolean masks on the device) cannot run on the meta device."""
    with pytest.raises(NotImplementedError, match="nonzero|data-dependent|meta"):
        _meta_step(kind, False, positions=False)
