"""The paper's unimodal initialisation: encoder-only weights from transformers ViT (DINO layout), BERT and RoBERTa
checkpoints saved to disk (random weights, offline) give the same encoder outputs; a text-only MLM stage with
`flava train` hands its text encoder to the next stage."""

import pytest
import torch

from flava.config import FlavaConfig
from flava.init_weights import apply_init_configs, load_encoder_init
from flava.model import FlavaForPretraining
from flava.run_config import ConfigError, load_run_config

from .conftest import perturb_

ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _model(overrides):
    cfg = load_run_config("tiny", ["run.export_final=false", *overrides])
    mcfg = apply_init_configs(cfg, cfg.model.build())
    model = FlavaForPretraining(mcfg).eval()
    return cfg, model


def test_image_encoder_from_vit(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(**ENC, image_size=32, patch_size=8, layer_norm_eps=1e-6, qkv_bias=True))
    perturb_(vit, 0.1)
    vit.save_pretrained(str(tmp_path / "vit"))
    cfg, model = _model([f"model.image_encoder_init={tmp_path / 'vit'}"])
    assert model.config.image.layer_norm_eps == 1e-6  # the encoder follows its checkpoint
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("image_encoder.")}
    assert load_encoder_init(model, cfg) == ["image"]
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = vit.eval()(pixel_values=px, output_hidden_states=True)
        ours = model.image_encoder(px)
    torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.hidden, ref.hidden_states[-1], atol=1e-5, rtol=0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing else touched


def test_image_size_mismatch_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(**ENC, image_size=64, patch_size=8)).save_pretrained(str(tmp_path / "vit"))
    with pytest.raises(ConfigError, match="image_size 64"):
        _model([f"model.image_encoder_init={tmp_path / 'vit'}"])


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_text_encoder_from_bert_and_roberta(tmp_path, kind):
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(1)
    if kind == "bert":
        hf = BertForMaskedLM(BertConfig(**ENC, vocab_size=300, max_position_embeddings=40, layer_norm_eps=1e-12))
        enc, pad = hf.bert, 0
    else:  # positions from pad_token_id + 1 = 2
        hf = RobertaForMaskedLM(RobertaConfig(**ENC, vocab_size=300, max_position_embeddings=42, pad_token_id=1,
                                              type_vocab_size=1, layer_norm_eps=1e-5))
        enc, pad = hf.roberta, 1
    perturb_(hf, 0.1)
    hf.save_pretrained(str(tmp_path / kind))  # a *ForMaskedLM: the prefix and the MLM head are dropped
    cfg, model = _model([f"model.text_encoder_init={tmp_path / kind}"])
    t = model.config.text
    assert (t.vocab_size, t.max_position_embeddings, t.norm_first, t.pad_token_id) == (300, 40, False, pad)
    assert load_encoder_init(model, cfg) == ["text"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (3, 40), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 25:] = 0
    attn[2, 7:] = 0
    ids[attn == 0] = pad
    with torch.no_grad():
        ref = enc.eval()(input_ids=ids, attention_mask=attn).last_hidden_state
        ours = model.text_encoder(ids, attn).last_hidden_state
    keep = attn.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)


def test_post_ln_text_encoder_cannot_export_final(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(**ENC, vocab_size=300, max_position_embeddings=40)).save_pretrained(str(tmp_path / "b"))
    cfg = load_run_config("tiny", [f"model.text_encoder_init={tmp_path / 'b'}"])
    with pytest.raises(ConfigError, match="run.export_final=false"):
        apply_init_configs(cfg, cfg.model.build())
    with pytest.raises(ConfigError, match="exclude each other"):
        load_run_config("tiny", [f"model.text_encoder_init={tmp_path / 'b'}", "model.pretrained=x"])


@pytest.mark.slow
def test_two_stage_recipe_text_only_mlm_then_full(tmp_path):
    """Stage 1: text-only MLM with `flava train` (data.ratios={text: 1.0}); stage 2 starts its text encoder from
    stage 1's run (and its tokenizer). With run.steps=0, stage 2's export holds exactly the initial weights."""
    import json

    from flava import checkpoint as ckpt_mod
    from flava.train import train

    from .shards import make_build, make_rows

    common = ["run.progress=false", "run.tensorboard=false", "data.num_workers=0", "run.global_batch_size=8",
              "run.micro_batch_size=8"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in make_rows(64, seed=0, size=8)) + "\n")
    stage1 = tmp_path / "stage1"
    cfg1 = load_run_config("tiny", [*common, "data.ratios={text: 1.0}", f"data.text=[{corpus}]", "run.steps=2",
                                    "run.export_final=false"])
    train(cfg1, stage1)
    kinds = {json.loads(line)["kind"] for line in (stage1 / "metrics.jsonl").read_text().splitlines()}
    assert kinds == {"text"}

    build = make_build(tmp_path / "pairs", n=16, size=32, shards=1)
    stage2 = tmp_path / "stage2"
    cfg2 = load_run_config("tiny", [*common, f"model.text_encoder_init={stage1}", f"data.tokenizer={stage1}/tokenizer",
                                    f"data.pairs=[{build}]", "run.steps=0"])
    train(cfg2, stage2)
    ckpt = ckpt_mod.latest_checkpoint(stage1)
    m1 = FlavaForPretraining(FlavaConfig.from_dict(ckpt_mod.read_meta(ckpt)["model_config"]))
    ckpt_mod.load_model_weights(ckpt, m1)
    from flava.convert import from_pretrained

    m2 = from_pretrained(str(stage2 / "final"))
    s1, s2 = m1.state_dict(), m2.state_dict()
    text_keys = [k for k in s1 if k.startswith("text_encoder.")]
    assert text_keys and all(torch.equal(s1[k], s2[k]) for k in text_keys)
    torch.manual_seed(cfg2.run.seed)  # what stage 2 would have started from without the text init
    fresh = FlavaForPretraining(m1.config).state_dict()
    assert not torch.equal(fresh["text_encoder.layers.0.qkv.weight"], s2["text_encoder.layers.0.qkv.weight"])


def test_random_codebook_warns_and_flava_full_refuses_it(caplog):
    from flava.codebook import RANDOM_CODEBOOK_WARNING
    from flava.train import build_codebook

    cfg = load_run_config("tiny")
    with caplog.at_level("WARNING"):
        build_codebook(cfg, cfg.model.build(), "cpu")
    assert RANDOM_CODEBOOK_WARNING in caplog.text
    caplog.clear()
    text_only = load_run_config("tiny", ["data.ratios={text: 1.0}"])  # no image targets: nothing to warn about
    with caplog.at_level("WARNING"):
        build_codebook(text_only, text_only.model.build(), "cpu")
    assert RANDOM_CODEBOOK_WARNING not in caplog.text
    with pytest.raises(ConfigError, match="flava_full with model.codebook=random"):
        load_run_config("flava_full", ["model.codebook=random"])
    assert load_run_config("flava_full", ["model.codebook=random", "model.allow_random_codebook=true"])
    assert load_run_config("flava_full").model.codebook == "facebook/flava-image-codebook"
