"""Config dataclasses and model properties (sizes, FSDP-friendliness, checkpointing, batch kinds)."""

import pytest
import torch

from flava.config import FlavaConfig, flava_full, tiny
from flava.model import FlavaForPretraining, TransformerLayer

from .conftest import make_batch, perturb_


def test_from_dict_round_trip_and_unknown_keys():
    cfg = tiny()
    assert FlavaConfig.from_dict(cfg.to_dict()) == cfg
    assert FlavaConfig.from_dict(None) == flava_full()
    partial = FlavaConfig.from_dict({"multimodal": {"num_layers": 3}, "projection_dim": 512})
    assert partial.multimodal.num_layers == 3 and partial.projection_dim == 512 and partial.text.num_layers == 12
    with pytest.raises(ValueError, match=r"FlavaConfig\.image: unknown key\(s\) \['hiden_size'\]"):
        FlavaConfig.from_dict({"image": {"hiden_size": 3}})
    with pytest.raises(ValueError, match="unknown key"):
        FlavaConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="multiple of num_heads"):
        FlavaConfig.from_dict({"text": {"hidden_size": 30}})
    assert FlavaConfig.preset("tiny") == tiny()


def test_flava_full_sizes():
    with torch.device("meta"):
        model = FlavaForPretraining(flava_full())
    n = model.num_parameters()
    # exactly transformers' FlavaForPreTraining(FlavaConfig()) minus its codebook (357,645,303 - 53,786,240)
    assert n == 303_859_063, n
    from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

    with torch.device("meta"):
        codebook = FlavaImageCodebook(FlavaImageCodebookConfig())
    assert n + sum(p.numel() for p in codebook.parameters()) == 357_645_303  # the paper's "~350M" model
    assert len(model.transformer_layers()) == 12 + 12 + 6
    assert model.logit_scale.shape == (1,)
    assert all(isinstance(m, TransformerLayer) for m in model.transformer_layers())


def test_gradient_checkpointing_same_loss_and_grads():
    torch.manual_seed(0)
    a = FlavaForPretraining(tiny())
    perturb_(a)
    b = FlavaForPretraining(tiny())
    b.load_state_dict(a.state_dict())
    b.set_gradient_checkpointing(True)
    batch = make_batch(a.config)
    la, lb = a(**batch).loss, b(**batch).loss
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_unmasked_inputs_reuse_passes_and_losses_present():
    torch.manual_seed(0)
    model = FlavaForPretraining(tiny())
    batch = make_batch(model.config)
    out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"], itm_labels=batch["itm_labels"])
    assert set(out.losses.as_dict()) == {"itm", "global_contrastive"}
    assert out.image_masked is out.image and out.text_masked is out.text
    # masked text only: no unmasked text, hence no contrastive loss (as transformers)
    only_masked = model(pixel_values=batch["pixel_values"], input_ids_masked=batch["input_ids_masked"],
                        mlm_labels=batch["mlm_labels"], itm_labels=batch["itm_labels"])
    assert set(only_masked.losses.as_dict()) == {"itm", "mmm_text"}
    with pytest.raises(ValueError):
        model()


def test_loss_weights_zero_skip_and_scale():
    torch.manual_seed(0)
    model = FlavaForPretraining(tiny())
    batch = make_batch(model.config)
    base = model(**batch).losses
    model.config.loss_weights.itm = 0.0
    model.config.loss_weights.mmm_text = 2.0
    out = model(**batch)
    assert out.losses.itm is None
    torch.testing.assert_close(out.losses.mmm_text, 2 * base.mmm_text)


def test_fsdp2_fully_shard_single_process():
    """fully_shard per transformer layer, per encoder, then the root: forward equals the unsharded model,
    backward and an optimizer step run; logit_scale (1,) shards."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = FlavaForPretraining(tiny())
        ref = FlavaForPretraining(tiny())
        ref.load_state_dict(model.state_dict())
        for layer in model.transformer_layers():
            fully_shard(layer)
        for encoder in model.encoders():  # per encoder too: every encoder call goes through forward()
            fully_shard(encoder)
        fully_shard(model)
        batch = make_batch(model.config)
        loss = model(**batch).loss
        torch.testing.assert_close(loss, ref(**batch).loss)
        loss.backward()
        ref(**batch).loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        got = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        assert set(got) == set(ref_grads)
        for name, g in ref_grads.items():
            torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt.step()
        model.clamp_logit_scale_()
    finally:
        dist.destroy_process_group()


def test_every_loss_input_is_fp32_under_bf16_autocast(monkeypatch):
    """At a logit scale near 100 a bf16 logit moves in steps of 0.5: every cross-entropy (contrastive, ITM, MIM,
    MLM, MMM) must see fp32 logits on every batch kind, whatever autocast the caller runs under."""
    import torch.nn.functional as F

    seen = []
    real = F.cross_entropy

    def spy(logits, target, *a, **kw):
        seen.append(logits.dtype)
        return real(logits, target, *a, **kw)

    monkeypatch.setattr(F, "cross_entropy", spy)
    cfg = tiny()
    model = FlavaForPretraining(cfg)
    batch = make_batch(cfg)
    image_only = {k: batch[k] for k in ("pixel_values", "patch_mask", "image_token_ids")}
    text_only = {k: batch[k] for k in ("input_ids_masked", "attention_mask", "mlm_labels")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pair = model(**batch)
        model(**image_only)
        model(**text_only)
    assert pair.logits_per_image.dtype == pair.logits_per_text.dtype == torch.float32
    assert len(seen) >= 2 + 1 + 2 + 1 + 1  # contrastive (2), ITM, MMM (2), MIM, MLM
    assert set(seen) == {torch.float32}, seen


def test_encoder_output_is_a_pytree_node():
    """FSDP2 (torch < 2.13) hooks only the tensors pytree finds in a module's output: an encoder's EncoderOutput
    must flatten to its tensors, or the encoder's parameters get no gradient on the lent machines' torch 2.11."""
    import torch.utils._pytree as pytree

    from flava.model import EncoderOutput

    a, b = torch.zeros(1), torch.ones(1)
    leaves, spec = pytree.tree_flatten((EncoderOutput(a, b), EncoderOutput(b, a)))
    assert len(leaves) == 4 and leaves[0] is a and leaves[1] is b
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back[0], EncoderOutput) and back[1].hidden is b
