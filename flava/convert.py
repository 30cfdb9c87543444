"""Weights to and from transformers' ``FlavaForPreTraining`` / ``FlavaModel``.

Start from ``facebook/flava-full``::

    hf = transformers.FlavaForPreTraining.from_pretrained("facebook/flava-full")   # or a local directory
    model = flava.convert.from_transformers(hf)

and hand results back::

    hf = flava.convert.to_transformers(model)          # FlavaForPreTraining, codebook not attached by default
    hf.save_pretrained("out/")

A run's weights go out the same way: ``export_final`` (the end of ``flava train``: RUN/final) and
``export_checkpoint`` (``flava export``).

State-dict level functions (``hf_to_ours_state_dict`` / ``ours_to_hf_state_dict``) work without model objects, e.g.
on a consolidated FSDP / DCP checkpoint. Our fused ``qkv`` weight is the row-wise concatenation of transformers'
``query``, ``key``, ``value``; ``logit_scale`` is shape (1,) here and 0-dim there; the masked-prediction heads' tied
``bias`` is written under both transformers names.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pmd.atomic import atomic_directory

from . import checkpoint as ckpt_mod
from .config import (
    CodebookConfig,
    FlavaConfig,
    ImageEncoderConfig,
    LossWeights,
    MultimodalEncoderConfig,
    TextEncoderConfig,
)
from .distributed import DistInfo, barrier
from .model import FlavaForPretraining

log = logging.getLogger(__name__)

_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}

# (ours, transformers) for the per-layer tensors other than the fused qkv
_LAYER_MAP = [
    ("norm1", "layernorm_before"),
    ("proj", "attention.output.dense"),
    ("norm2", "layernorm_after"),
    ("fc1", "intermediate.dense"),
    ("fc2", "output.dense"),
]
# (ours, transformers) module prefixes for everything outside the layers; weight/bias (or the tensor) appended
_PARAM_MAP = [
    ("image_encoder.cls_token", "flava.image_model.embeddings.cls_token"),
    ("image_encoder.mask_token", "flava.image_model.embeddings.mask_token"),
    ("image_encoder.position_embeddings", "flava.image_model.embeddings.position_embeddings"),
    ("image_encoder.patch_embed.", "flava.image_model.embeddings.patch_embeddings.projection."),
    ("image_encoder.norm.", "flava.image_model.layernorm."),
    ("image_encoder.pooler.dense.", "flava.image_model.pooler.dense."),
    ("text_encoder.word_embeddings.", "flava.text_model.embeddings.word_embeddings."),
    ("text_encoder.position_embeddings.", "flava.text_model.embeddings.position_embeddings."),
    ("text_encoder.token_type_embeddings.", "flava.text_model.embeddings.token_type_embeddings."),
    ("text_encoder.embed_norm.", "flava.text_model.embeddings.LayerNorm."),
    ("text_encoder.norm.", "flava.text_model.layernorm."),
    ("text_encoder.pooler.dense.", "flava.text_model.pooler.dense."),
    ("multimodal_encoder.cls_token", "flava.multimodal_model.cls_token"),
    ("multimodal_encoder.norm.", "flava.multimodal_model.layernorm."),
    ("multimodal_encoder.pooler.dense.", "flava.multimodal_model.pooler.dense."),
    ("image_projection.", "flava.image_projection."),
    ("text_projection.", "flava.text_projection."),
    ("image_to_mm.", "flava.image_to_mm_projection."),
    ("text_to_mm.", "flava.text_to_mm_projection."),
    ("itm_head.pooler.dense.", "itm_head.pooler.dense."),
    ("itm_head.classifier.", "itm_head.seq_relationship."),
]
for _head in ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head"):
    _PARAM_MAP += [
        (f"{_head}.dense.", f"{_head}.transform.dense."),
        (f"{_head}.norm.", f"{_head}.transform.LayerNorm."),
        (f"{_head}.decoder.", f"{_head}.decoder."),
    ]
_ENCODERS = [
    ("image_encoder", "flava.image_model.encoder"),
    ("text_encoder", "flava.text_model.encoder"),
    ("multimodal_encoder", "flava.multimodal_model.encoder"),
]


# --------------------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------------------
def _enc_from_hf(c) -> dict[str, Any]:
    act = c.hidden_act
    if act not in _ACT_FROM_HF:
        raise ValueError(f"unsupported hidden_act {act!r}")
    return dict(
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_dim=c.intermediate_size,
        layer_norm_eps=c.layer_norm_eps,
        hidden_dropout=float(c.hidden_dropout_prob),
        attention_dropout=float(c.attention_probs_dropout_prob),
        qkv_bias=c.qkv_bias,
        hidden_act=_ACT_FROM_HF[act],
    )


def _square(v, name: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"non-square {name} {v} is not supported")
        v = v[0]
    return int(v)


def config_from_transformers(hf_config) -> FlavaConfig:
    """transformers ``FlavaConfig`` -> our ``FlavaConfig`` (raises on features we do not implement)."""
    ic, tc, mc, cc = (
        hf_config.image_config,
        hf_config.text_config,
        hf_config.multimodal_config,
        hf_config.image_codebook_config,
    )
    if not mc.use_cls_token:
        raise ValueError("multimodal_config.use_cls_token=False is not supported")
    if hf_config.hidden_size != mc.hidden_size:
        raise ValueError("FlavaConfig.hidden_size (ITM head width) must equal multimodal_config.hidden_size")
    for name, hidden in (("image", ic.hidden_size), ("text", tc.hidden_size)):
        if hidden != mc.hidden_size:
            raise ValueError(f"{name} hidden_size must equal the multimodal hidden_size (MMM heads)")
    image_size, patch = _square(ic.image_size, "image_size"), _square(ic.patch_size, "patch_size")
    return FlavaConfig(
        image=ImageEncoderConfig(
            **_enc_from_hf(ic),
            image_size=image_size,
            patch_size=patch,
            num_channels=ic.num_channels,
            vocab_size=ic.vocab_size,
        ),
        text=TextEncoderConfig(
            **_enc_from_hf(tc),
            vocab_size=tc.vocab_size,
            type_vocab_size=tc.type_vocab_size,
            max_position_embeddings=tc.max_position_embeddings,
            pad_token_id=tc.pad_token_id if tc.pad_token_id is not None else 0,
        ),
        multimodal=MultimodalEncoderConfig(**_enc_from_hf(mc)),
        codebook=CodebookConfig(
            hidden_size=cc.hidden_size,
            num_groups=cc.num_groups,
            num_blocks_per_group=cc.num_blocks_per_group,
            input_channels=cc.input_channels,
            vocab_size=cc.vocab_size,
            image_size=8 * (image_size // patch),
        ),
        loss_weights=LossWeights(
            mim=hf_config.mim_weight,
            mlm=hf_config.mlm_weight,
            global_contrastive=hf_config.global_contrastive_weight,
            itm=hf_config.itm_weight,
            mmm_image=hf_config.mmm_image_weight,
            mmm_text=hf_config.mmm_text_weight,
        ),
        projection_dim=hf_config.projection_dim,
        logit_scale_init=hf_config.logit_scale_init_value,
        ce_ignore_index=hf_config.ce_ignore_index,
        initializer_range=hf_config.initializer_range,
        global_backprop_contrastive=hf_config.global_backprop_contrastive,
    )


def _enc_to_hf(c) -> dict[str, Any]:
    return dict(
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim,
        layer_norm_eps=c.layer_norm_eps,
        hidden_dropout_prob=c.hidden_dropout,
        attention_probs_dropout_prob=c.attention_dropout,
        qkv_bias=c.qkv_bias,
        hidden_act=_ACT_TO_HF[c.hidden_act],
        initializer_range=0.02,
    )


def config_to_transformers(config: FlavaConfig, init_codebook: bool = False):
    """Our ``FlavaConfig`` -> transformers ``FlavaConfig``."""
    from transformers import FlavaConfig as HFFlavaConfig

    ic, tc, mc, cc, w = config.image, config.text, config.multimodal, config.codebook, config.loss_weights
    post_ln = [name for name, c in (("image", ic), ("text", tc), ("multimodal", mc)) if not c.norm_first]
    if post_ln:
        raise ValueError(f"post-LN {post_ln} encoder(s) (BERT-initialised) have no transformers FLAVA equivalent")
    return HFFlavaConfig(
        image_config=dict(
            **_enc_to_hf(ic),
            image_size=ic.image_size,
            patch_size=ic.patch_size,
            num_channels=ic.num_channels,
            vocab_size=ic.vocab_size,
            mask_token=True,
        ),
        text_config=dict(
            **_enc_to_hf(tc),
            vocab_size=tc.vocab_size,
            type_vocab_size=tc.type_vocab_size,
            max_position_embeddings=tc.max_position_embeddings,
            pad_token_id=tc.pad_token_id,
        ),
        multimodal_config=dict(**_enc_to_hf(mc), use_cls_token=True),
        image_codebook_config=dict(
            hidden_size=cc.hidden_size,
            num_groups=cc.num_groups,
            num_blocks_per_group=cc.num_blocks_per_group,
            input_channels=cc.input_channels,
            vocab_size=cc.vocab_size,
        ),
        hidden_size=mc.hidden_size,
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init,
        ce_ignore_index=config.ce_ignore_index,
        initializer_range=config.initializer_range,
        mim_weight=w.mim,
        mlm_weight=w.mlm,
        global_contrastive_weight=w.global_contrastive,
        itm_weight=w.itm,
        mmm_image_weight=w.mmm_image,
        mmm_text_weight=w.mmm_text,
        global_backprop_contrastive=config.global_backprop_contrastive,
        init_codebook=init_codebook,
    )


# --------------------------------------------------------------------------------------------------------------
# state dicts
# --------------------------------------------------------------------------------------------------------------
def _num_layers(sd: dict[str, Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def hf_to_ours_state_dict(hf_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``FlavaForPreTraining`` (or ``FlavaModel``, keys without ``flava.``) -> ours.
    Codebook weights (``image_codebook.*``) and non-persistent buffers are dropped."""
    if not any(k.startswith("flava.") for k in hf_sd):  # FlavaModel
        hf_sd = {f"flava.{k}": v for k, v in hf_sd.items()}
    out: dict[str, Tensor] = {}
    for ours, hf in _PARAM_MAP:
        if ours.endswith("."):
            for suffix in ("weight", "bias"):
                if hf + suffix in hf_sd:
                    out[ours + suffix] = hf_sd[hf + suffix]
        elif hf in hf_sd:
            out[ours] = hf_sd[hf]
    if "flava.logit_scale" in hf_sd:
        out["logit_scale"] = hf_sd["flava.logit_scale"].reshape(1)
    for ours_enc, hf_enc in _ENCODERS:
        for i in range(_num_layers(hf_sd, f"{hf_enc}.layer.")):
            src, dst = f"{hf_enc}.layer.{i}.", f"{ours_enc}.layers.{i}."
            for suffix in ("weight", "bias"):
                qkv = [hf_sd.get(f"{src}attention.attention.{n}.{suffix}") for n in ("query", "key", "value")]
                if all(t is not None for t in qkv):
                    out[f"{dst}qkv.{suffix}"] = torch.cat(qkv, dim=0)
                for o, h in _LAYER_MAP:
                    if f"{src}{h}.{suffix}" in hf_sd:
                        out[f"{dst}{o}.{suffix}"] = hf_sd[f"{src}{h}.{suffix}"]
    return out


def ours_to_hf_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Ours -> transformers ``FlavaForPreTraining`` keys (heads' tied ``bias`` included, no codebook)."""
    out: dict[str, Tensor] = {}
    for ours, hf in _PARAM_MAP:
        if ours.endswith("."):
            for suffix in ("weight", "bias"):
                if ours + suffix in sd:
                    out[hf + suffix] = sd[ours + suffix]
        elif ours in sd:
            out[hf] = sd[ours]
    for head in ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head"):
        if f"{head}.decoder.bias" in sd:
            out[f"{head}.bias"] = sd[f"{head}.decoder.bias"]
    if "logit_scale" in sd:
        out["flava.logit_scale"] = sd["logit_scale"].reshape(())
    for ours_enc, hf_enc in _ENCODERS:
        for i in range(_num_layers(sd, f"{ours_enc}.layers.")):
            src, dst = f"{ours_enc}.layers.{i}.", f"{hf_enc}.layer.{i}."
            for suffix in ("weight", "bias"):
                if f"{src}qkv.{suffix}" in sd:
                    for name, part in zip(("query", "key", "value"), sd[f"{src}qkv.{suffix}"].chunk(3, dim=0)):
                        out[f"{dst}attention.attention.{name}.{suffix}"] = part
                for o, h in _LAYER_MAP:
                    if f"{src}{o}.{suffix}" in sd:
                        out[f"{dst}{h}.{suffix}"] = sd[f"{src}{o}.{suffix}"]
    return out


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------
def from_transformers(hf_model, strict: bool = True) -> FlavaForPretraining:
    """transformers ``FlavaForPreTraining`` or ``FlavaModel`` -> ``FlavaForPretraining`` with the same weights.

    From a ``FlavaModel`` the pretraining heads are missing and stay randomly initialised (a warning says so).
    """
    config = config_from_transformers(hf_model.config)
    model = FlavaForPretraining(config)
    sd = hf_to_ours_state_dict({k: v.detach().clone().float() for k, v in hf_model.state_dict().items()})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise RuntimeError(f"unexpected keys after conversion: {unexpected}")
    if missing:
        heads_only = all(k.split(".")[0].endswith("_head") for k in missing)
        if strict and not (heads_only and not any(k.startswith("mim_head") for k in sd)):
            raise RuntimeError(f"missing keys after conversion: {missing}")
        log.warning("from_transformers: %d head tensors not in the source model, left at init", len(missing))
    return model


def to_transformers(model: FlavaForPretraining, image_codebook=None):
    """``FlavaForPretraining`` -> transformers ``FlavaForPreTraining`` (fp32). ``image_codebook`` (a transformers
    ``FlavaImageCodebook``, e.g. from ``flava.codebook.load_codebook``) is attached when given; otherwise the
    transformers model has no codebook and needs ``mim_labels`` passed explicitly."""
    from transformers import FlavaForPreTraining

    hf_config = config_to_transformers(model.config, init_codebook=False)
    hf = FlavaForPreTraining(hf_config, image_codebook=getattr(image_codebook, "model", image_codebook))
    sd = ours_to_hf_state_dict({k: v.detach().float() for k, v in model.state_dict().items()})
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("image_codebook.")]
    if unexpected or missing:
        raise RuntimeError(f"to_transformers: missing {missing}, unexpected {unexpected}")
    return hf


def from_pretrained(name_or_path: str = "facebook/flava-full", **kwargs) -> FlavaForPretraining:
    """Load transformers weights (hub name or local directory; honours ``HF_HUB_OFFLINE``) and convert."""
    from transformers import FlavaForPreTraining

    hf = FlavaForPreTraining.from_pretrained(name_or_path, **kwargs)
    return from_transformers(hf)


# ------------------------------------------------------------------------------------------------------ export
def export_final(model, mcfg: FlavaConfig, run_dir: Path, info: DistInfo) -> None:
    """The trained model in transformers format (safetensors) + the run's tokenizer, in RUN/final."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        export_state_dict(sd, mcfg, run_dir / "final", run_dir / "tokenizer")
    barrier(info)


def export_state_dict(sd: dict, mcfg: FlavaConfig, out: Path, tokenizer_dir: Path | None) -> None:
    """A full state dict -> transformers ``FlavaForPreTraining`` directory (without the codebook: it is not
    trained, load it separately) plus the tokenizer files."""
    plain = FlavaForPretraining(mcfg)
    plain.load_state_dict({k: v.float().cpu() for k, v in sd.items()})
    hf = to_transformers(plain, image_codebook=None)
    with atomic_directory(out, owner="export") as tmp:  # one name: a killed export's leftover is replaced
        hf.save_pretrained(str(tmp))
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            for f in tokenizer_dir.iterdir():
                shutil.copy(f, tmp / f.name)
    log.info("exported %s", out)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``flava export``: a run's latest checkpoint (or the checkpoint directory given) in transformers format, with
    the run's tokenizer, in ``out``. Returns the checkpoint exported."""
    p = Path(checkpoint)
    ckpt = p if (p / "meta.json").is_file() else ckpt_mod.latest_checkpoint(p)
    if ckpt is None:
        raise ckpt_mod.CheckpointError(f"{p}: no complete checkpoint")
    meta = ckpt_mod.read_meta(ckpt)
    model = FlavaForPretraining(FlavaConfig.from_dict(meta["model_config"]))
    ckpt_mod.load_model_weights(ckpt, model)
    export_state_dict(model.state_dict(), model.config, Path(out), ckpt.parent.parent / "tokenizer")
    return ckpt
