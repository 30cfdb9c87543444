"""Parity with transformers' FlavaForPreTraining / FlavaModel (5.23) in fp32, both conversion directions."""

import pytest
import torch

from flava.convert import (
    config_from_transformers,
    from_transformers,
    hf_to_ours_state_dict,
    ours_to_hf_state_dict,
    to_transformers,
)
from flava.model import FlavaForPretraining

from .conftest import hf_kwargs, make_batch, perturb_

ATOL = 1e-5


def close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def transformers_like(model):
    """transformers keeps ITM negatives' (duplicated) captions among the contrastive columns; we drop them."""
    model.config.contrastive_exclude_itm_negatives = False
    return model


def hf_losses(out) -> dict:
    return {k: v for k, v in out.loss_info.items() if v is not None}


def test_config_conversion_round_trip(hf_model):
    from flava.convert import config_to_transformers

    cfg = config_from_transformers(hf_model.config)
    assert cfg.image.num_patches == 16 and cfg.multimodal.num_layers == 2 and cfg.projection_dim == 24
    assert config_from_transformers(config_to_transformers(cfg)) == cfg


def test_state_dict_round_trip(hf_model):
    hf_sd = {k: v for k, v in hf_model.state_dict().items() if not k.startswith("image_codebook.")}
    ours = hf_to_ours_state_dict(hf_sd)
    model = FlavaForPretraining(config_from_transformers(hf_model.config))
    assert set(ours) == set(model.state_dict())  # every parameter mapped, nothing extra
    back = ours_to_hf_state_dict(ours)
    assert set(back) == set(hf_sd)
    for k in hf_sd:
        assert torch.equal(back[k], hf_sd[k]), k


def test_pair_batch_hidden_states_embeddings_and_losses(hf_model):
    ours = transformers_like(from_transformers(hf_model).train())
    batch = make_batch(ours.config)
    out = ours(**batch)
    ref = hf_model(**hf_kwargs(batch))

    # unimodal (unmasked and masked) and multimodal hidden states, including text padding positions
    close(out.image.last_hidden_state, ref.image_output.last_hidden_state)
    close(out.image_masked.last_hidden_state, ref.image_masked_output.last_hidden_state)
    close(out.text.last_hidden_state, ref.text_output.last_hidden_state)
    close(out.text_masked.last_hidden_state, ref.text_masked_output.last_hidden_state)
    close(out.image_masked.hidden, ref.image_masked_output.hidden_states[-1])
    close(out.text_masked.hidden, ref.text_masked_output.hidden_states[-1])
    close(out.multimodal_masked.last_hidden_state, ref.multimodal_masked_output.last_hidden_state)
    close(out.itm_logits, ref.itm_logits)
    pos = batch["itm_labels"].ne(0)  # transformers returns contrastive logits for positive rows only
    close(out.logits_per_image[pos], ref.contrastive_logits_per_image)
    close(out.logits_per_text[pos], ref.contrastive_logits_per_text)

    ref_losses = hf_losses(ref)
    assert set(ref_losses) == {"itm", "global_contrastive", "mmm_image", "mmm_text"}
    assert set(out.losses.as_dict()) == set(ref_losses)
    for name, value in ref_losses.items():
        close(out.losses.as_dict()[name], value)
    close(out.loss, ref.loss)


def test_pair_batch_gradients(hf_model):
    ours = transformers_like(from_transformers(hf_model).train())
    batch = make_batch(ours.config)
    ours(**batch).loss.backward()
    hf_model(**hf_kwargs(batch)).loss.backward()
    ours_grads = ours_to_hf_state_dict({n: p.grad for n, p in ours.named_parameters() if p.grad is not None})
    hf_grads = {n: p.grad for n, p in hf_model.named_parameters() if p.grad is not None}
    assert hf_grads, "transformers produced no gradients"
    for name, g in hf_grads.items():
        assert name in ours_grads, f"no gradient for {name}"
        close(ours_grads[name], g.reshape(ours_grads[name].shape))
    # parameters that get a gradient here and none in transformers would be a semantic difference
    heads = ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head")
    extra = set(ours_grads) - set(hf_grads) - {f"{h}.decoder.bias" for h in heads}
    assert not extra, extra


def test_image_only_batch_mim(hf_model):
    ours = from_transformers(hf_model).train()
    b = make_batch(ours.config)
    batch = dict(pixel_values=b["pixel_values"], patch_mask=b["patch_mask"], image_token_ids=b["image_token_ids"])
    out = ours(**batch)
    ref = hf_model(**hf_kwargs(batch))
    assert set(hf_losses(ref)) == {"mim"} and set(out.losses.as_dict()) == {"mim"}
    close(out.losses.mim, ref.loss_info.mim)
    close(out.image_masked.last_hidden_state, ref.image_masked_output.last_hidden_state)


def test_text_only_batch_mlm(hf_model):
    ours = from_transformers(hf_model).train()
    b = make_batch(ours.config)
    keys = ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels")
    batch = {k: b[k] for k in keys}
    out = ours(**batch)
    ref = hf_model(**hf_kwargs(batch))
    assert set(hf_losses(ref)) == {"mlm"} and set(out.losses.as_dict()) == {"mlm"}
    close(out.losses.mlm, ref.loss_info.mlm)
    close(out.text_masked.last_hidden_state, ref.text_masked_output.last_hidden_state)


def test_projected_embeddings_match_get_features(hf_model):
    ours = from_transformers(hf_model).eval()
    flava = hf_model.flava.eval()
    b = make_batch(ours.config)
    with torch.no_grad():
        img = ours.encode_image(b["pixel_values"])
        ref_img = flava.get_image_features(pixel_values=b["pixel_values"]).pooler_output
        close(img, ref_img[:, 0])
        img_m = ours.encode_image(b["pixel_values"], b["patch_mask"])
        ref_img_m = flava.get_image_features(pixel_values=b["pixel_values"], bool_masked_pos=b["patch_mask"])
        close(img_m, ref_img_m.pooler_output[:, 0])
        txt = ours.encode_text(b["input_ids"], b["attention_mask"])
        ref_txt = flava.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        close(txt, ref_txt.pooler_output[:, 0])
    assert img.shape == (4, ours.config.projection_dim)


def test_to_transformers_gives_the_same_model():
    torch.manual_seed(3)
    from flava.config import tiny

    ours = transformers_like(FlavaForPretraining(tiny()))
    perturb_(ours, seed=3)
    hf = to_transformers(ours).train()
    batch = make_batch(ours.config, seed=5)
    out, ref = ours(**batch), hf(**hf_kwargs(batch))
    for name, value in hf_losses(ref).items():
        close(out.losses.as_dict()[name], value)
    close(out.multimodal_masked.last_hidden_state, ref.multimodal_masked_output.last_hidden_state)
    # and back again: bit-identical weights
    again = from_transformers(hf)
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_from_flava_model_without_heads():
    from transformers import FlavaModel

    from .conftest import make_hf_config

    torch.manual_seed(0)
    base = FlavaModel(make_hf_config())
    perturb_(base)
    ours = from_transformers(base).eval()
    b = make_batch(ours.config)
    with torch.no_grad():
        ref = base.get_image_features(pixel_values=b["pixel_values"]).pooler_output[:, 0]
        close(ours.encode_image(b["pixel_values"]), ref)


def test_all_rows_negative_uses_every_row(hf_model):
    ours = from_transformers(hf_model).train()
    batch = make_batch(ours.config, negatives=(0, 1, 2, 3))
    out, ref = ours(**batch), hf_model(**hf_kwargs(batch))
    for name, value in hf_losses(ref).items():
        close(out.losses.as_dict()[name], value)


# ---- deliberate differences from transformers (documented in docs/flava-model.md) ---------------------------
def test_difference_nothing_masked_gives_zero_not_nan(hf_model):
    ours = from_transformers(hf_model).train()
    batch = make_batch(ours.config)
    batch["mlm_labels"] = torch.full_like(batch["mlm_labels"], -100)
    batch["patch_mask"] = torch.zeros_like(batch["patch_mask"])
    out = ours(**batch)
    ref = hf_model(**hf_kwargs(batch))
    assert torch.isnan(ref.loss_info.mmm_text) and torch.isnan(ref.loss_info.mmm_image)
    assert out.losses.mmm_text.item() == 0.0 and out.losses.mmm_image.item() == 0.0
    assert torch.isfinite(out.loss)
    out.loss.backward()  # still differentiable, no NaN gradients
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    # image-only / text-only batches with nothing masked
    img = ours(pixel_values=batch["pixel_values"], patch_mask=batch["patch_mask"],
               image_token_ids=batch["image_token_ids"])
    assert img.loss.item() == 0.0
    txt = ours(input_ids=batch["input_ids"], mlm_labels=batch["mlm_labels"])
    assert txt.loss.item() == 0.0


def test_difference_labels_not_mutated(hf_model):
    ours = from_transformers(hf_model).train()
    batch = make_batch(ours.config)
    before = batch["image_token_ids"].clone()
    ours(**batch)
    assert torch.equal(batch["image_token_ids"], before)
    ours(pixel_values=batch["pixel_values"], patch_mask=batch["patch_mask"], image_token_ids=batch["image_token_ids"])
    assert torch.equal(batch["image_token_ids"], before)
    mim_labels = batch["image_token_ids"].clone()  # image-only batch: transformers masks the labels in place
    hf_model(pixel_values=batch["pixel_values"], bool_masked_pos=batch["patch_mask"], mim_labels=mim_labels)
    assert not torch.equal(mim_labels, before)
    assert (mim_labels[~batch["patch_mask"]] == -100).all()


def test_difference_logit_scale_clamped_in_eval_and_not_mutated(hf_model):
    with torch.no_grad():
        hf_model.flava.logit_scale.fill_(5.0)  # temperature 148 > 100
    ours = from_transformers(hf_model)
    batch = make_batch(ours.config, negatives=())
    ours.eval()
    hf_model.eval()
    with torch.no_grad():
        out, ref = ours(**batch), hf_model(**hf_kwargs(batch))
    # transformers clamps only in training mode; we always use temperature <= 100
    import math

    ratio = ref.contrastive_logits_per_image / out.logits_per_image
    torch.testing.assert_close(ratio, torch.full_like(ratio, math.exp(5.0) / 100.0), rtol=1e-4, atol=0)
    assert ours.logit_scale.item() == 5.0  # the forward never writes the parameter
    # in training mode transformers clamps (in place) and the losses agree again
    ours.train()
    hf_model.train()
    out, ref = ours(**batch), hf_model(**hf_kwargs(batch))
    close(out.losses.global_contrastive, ref.loss_info.global_contrastive)
    out.losses.global_contrastive.backward()
    assert ours.logit_scale.grad is not None and ours.logit_scale.grad.abs().item() > 0  # gradient not cut
    ours.clamp_logit_scale_()
    assert ours.logit_scale.item() == pytest.approx(4.6052)
