"""Encoder-only initial weights: the paper's unimodal initialisation (FLAVA section 3.3).

``model.image_encoder_init`` and ``model.text_encoder_init`` (``flava.run_config.ModelSection``) name a directory or
a hub name holding one of:

* a transformers ViT (``ViTModel`` / ``ViTForImageClassification`` layout, e.g. ``facebook/dino-vitb16``): image
  encoder; pre-LN like FLAVA's, mapped one to one;
* a transformers BERT or RoBERTa (``BertModel`` / ``RobertaModel`` and their ``*ForMaskedLM``): text encoder. BERT
  is post-LN, so the text encoder is built post-LN (``norm_first=False``, no final LayerNorm) and its outputs equal
  the checkpoint's. RoBERTa's position table starts at ``pad_token_id + 1``; those rows are the ones copied;
* a FLAVA run directory (latest checkpoint) or a transformers FLAVA directory (``RUN/final``, ``flava export``):
  that encoder's weights, e.g. the text encoder of a text-only MLM stage.

The encoder's architecture follows the checkpoint (:func:`apply_init_configs`, before the model is built); the
weights are copied by the exact key maps below (:func:`load_encoder_init`), every key of the encoder accounted for:
a source key that maps nowhere, or an encoder key left unfilled (other than the MIM ``mask_token``), is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from .config import FlavaConfig
from .run_config import ConfigError

log = logging.getLogger(__name__)

# (ours within an encoder layer, transformers ViT layer)
VIT_LAYER_MAP = (
    ("norm1", "layernorm_before"),
    ("proj", "attention.output.dense"),
    ("norm2", "layernorm_after"),
    ("fc1", "intermediate.dense"),
    ("fc2", "output.dense"),
)
VIT_QKV = "attention.attention.{}"
VIT_PARAM_MAP = (  # (ours under image_encoder., ViT); a trailing "." takes .weight and .bias
    ("cls_token", "embeddings.cls_token"),
    ("mask_token", "embeddings.mask_token"),
    ("position_embeddings", "embeddings.position_embeddings"),
    ("patch_embed.", "embeddings.patch_embeddings.projection."),
    ("norm.", "layernorm."),
    ("pooler.dense.", "pooler.dense."),
)
BERT_LAYER_MAP = (
    ("proj", "attention.output.dense"),
    ("norm1", "attention.output.LayerNorm"),
    ("fc1", "intermediate.dense"),
    ("fc2", "output.dense"),
    ("norm2", "output.LayerNorm"),
)
BERT_QKV = "attention.self.{}"
BERT_PARAM_MAP = (  # (ours under text_encoder., BERT)
    ("word_embeddings.", "embeddings.word_embeddings."),
    ("position_embeddings.", "embeddings.position_embeddings."),
    ("token_type_embeddings.", "embeddings.token_type_embeddings."),
    ("embed_norm.", "embeddings.LayerNorm."),
    ("pooler.dense.", "pooler.dense."),
)
OPTIONAL = {"image_encoder.mask_token", "image_encoder.pooler.dense.weight", "image_encoder.pooler.dense.bias",
            "text_encoder.pooler.dense.weight", "text_encoder.pooler.dense.bias"}
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_PREFIXES = {"vit": ("vit.",), "bert": ("bert.",), "roberta": ("roberta.",)}


# ----------------------------------------------------------------------------------------------------------------
# locating and reading a source
# ----------------------------------------------------------------------------------------------------------------
def _local_dir(value: str) -> Path:
    p = Path(value).expanduser()
    if p.exists():
        return p
    from huggingface_hub import snapshot_download

    # flava.assets.check_assets put it into the cache (or failed with one line) before the run started
    return Path(snapshot_download(value, allow_patterns=["*.json", "*.txt", "*.safetensors", "pytorch_model*.bin"]))


def source_kind(path: Path) -> str:
    """``flava_run`` | ``flava`` | ``vit`` | ``bert`` | ``roberta``."""
    if (path / "meta.json").is_file() or (path / "checkpoints").is_dir():
        return "flava_run"
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"{path}: neither a FLAVA run nor a transformers model directory (no config.json)")
    model_type = json.loads(cfg.read_text()).get("model_type")
    kinds = {"vit": "vit", "dino": "vit", "bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta",
             "flava": "flava"}
    if model_type not in kinds:
        raise ConfigError(f"{path}: model_type {model_type!r} is not a ViT, BERT, RoBERTa or FLAVA checkpoint")
    return kinds[model_type]


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The weights of a transformers directory, as stored (safetensors, sharded or not, else PyTorch .bin)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ConfigError(f"{path}: no model.safetensors or pytorch_model.bin")
    sd: dict[str, Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            sd.update(load_file(str(f)))
        else:
            sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return sd


def _strip(sd: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """Drop the task wrapper's prefix (``vit.`` of ViTForImageClassification, ``bert.`` of BertForMaskedLM...) and
    the task heads, which no encoder uses."""
    for prefix in _PREFIXES.get(kind, ()):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if k.startswith(("embeddings.", "encoder.", "layernorm.", "pooler."))}


# ----------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------
def _enc_fields(c: dict) -> dict:
    act = c.get("hidden_act", "gelu")
    if act not in _ACTS:
        raise ConfigError(f"hidden_act {act!r} of the initial weights is not supported")
    return dict(hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                mlp_dim=c["intermediate_size"], layer_norm_eps=c.get("layer_norm_eps", 1e-12),
                qkv_bias=c.get("qkv_bias", True), hidden_act=_ACTS[act])


def _flava_source_config(path: Path, kind: str) -> FlavaConfig:
    if kind == "flava_run":
        from . import checkpoint as ckpt_mod

        ckpt = path if (path / "meta.json").is_file() else ckpt_mod.latest_checkpoint(path)
        if ckpt is None:
            raise ConfigError(f"{path}: no complete checkpoint to initialise from")
        return FlavaConfig.from_dict(ckpt_mod.read_meta(ckpt)["model_config"])
    from transformers import FlavaConfig as HFFlavaConfig

    from .convert import config_from_transformers

    return config_from_transformers(HFFlavaConfig.from_pretrained(str(path)))


def encoder_config_changes(path: Path, encoder: str) -> dict:
    """The fields of ``FlavaConfig.<encoder>`` that the checkpoint at ``path`` fixes."""
    kind = source_kind(path)
    if kind in ("flava_run", "flava"):
        src = getattr(_flava_source_config(path, kind), encoder)
        skip = {"vocab_size"} if encoder == "image" else set()  # image tokens are the codebook's, not the encoder's
        return {k: v for k, v in dataclasses.asdict(src).items() if k not in skip}
    c = json.loads((path / "config.json").read_text())
    if encoder == "image":
        if kind != "vit":
            raise ConfigError(f"{path}: a {kind} checkpoint cannot initialise the image encoder (a ViT is needed)")
        return dict(**_enc_fields(c), patch_size=c.get("patch_size", 16), num_channels=c.get("num_channels", 3),
                    norm_first=True, image_size=c.get("image_size", 224))
    if kind not in ("bert", "roberta"):
        raise ConfigError(f"{path}: a {kind} checkpoint cannot initialise the text encoder (BERT or RoBERTa needed)")
    pad = c.get("pad_token_id", 0) or 0
    positions = c["max_position_embeddings"] - (pad + 1 if kind == "roberta" else 0)
    return dict(**_enc_fields(c), vocab_size=c["vocab_size"], type_vocab_size=c.get("type_vocab_size", 2),
                max_position_embeddings=positions, pad_token_id=pad, norm_first=False)


def apply_init_configs(cfg, mcfg: FlavaConfig) -> FlavaConfig:
    """``mcfg`` with each encoder named by ``model.image_encoder_init`` / ``model.text_encoder_init`` shaped like its
    checkpoint. An image checkpoint for another image size or patch size is refused (no position interpolation)."""
    if not (cfg.model.image_encoder_init or cfg.model.text_encoder_init):
        return mcfg
    d = mcfg.to_dict()
    for encoder, value in (("image", cfg.model.image_encoder_init), ("text", cfg.model.text_encoder_init)):
        if not value:
            continue
        changes = encoder_config_changes(_local_dir(value), encoder)
        if encoder == "image":
            for k in ("image_size", "patch_size"):
                theirs = changes.pop(k)
                if theirs != d["image"][k]:
                    raise ConfigError(
                        f"model.image_encoder_init={value} is for {k} {theirs}, the model has {d['image'][k]}: set "
                        f"model.overrides.image.{k}={theirs}"
                    )
        diff = {k: (d[encoder].get(k), v) for k, v in changes.items() if d[encoder].get(k) != v}
        if diff:
            log.info("model.%s_encoder_init=%s sets %s", encoder, value, {k: v for k, (_, v) in diff.items()})
        d[encoder].update(changes)
    try:
        out = FlavaConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: with the initial weights' encoder sizes: {e}") from None
    if not out.text.norm_first and cfg.run.export_final:
        raise ConfigError(
            f"model.text_encoder_init={cfg.model.text_encoder_init} makes a post-LN (BERT-layout) text encoder, which "
            "transformers' FLAVA format cannot hold: set run.export_final=false (checkpoints and flava eval work)"
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------
def _map_layers(sd, src_prefix: str, dst_prefix: str, qkv: str, layer_map, n: int) -> dict[str, Tensor]:
    out = {}
    for i in range(n):
        src, dst = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
        for suffix in ("weight", "bias"):
            parts = [sd.get(src + qkv.format(x) + "." + suffix) for x in ("query", "key", "value")]
            if all(p is not None for p in parts):
                out[f"{dst}qkv.{suffix}"] = torch.cat(parts, dim=0)
            for ours, theirs in layer_map:
                if src + theirs + "." + suffix in sd:
                    out[f"{dst}{ours}.{suffix}"] = sd[src + theirs + "." + suffix]
    return out


def _map_params(sd, dst_prefix: str, param_map) -> dict[str, Tensor]:
    out = {}
    for ours, theirs in param_map:
        for suffix in (("weight", "bias") if ours.endswith(".") else ("",)):
            if theirs + suffix in sd:
                out[dst_prefix + ours + suffix] = sd[theirs + suffix]
    return out


def _used(sd, qkv: str, layer_map, param_map, n_layers: int) -> set[str]:
    keys = set()
    for _, theirs in param_map:
        keys |= {theirs + s for s in (("weight", "bias") if theirs.endswith(".") else ("",))}
    for i in range(n_layers):
        for suffix in ("weight", "bias"):
            keys |= {f"encoder.layer.{i}.{qkv.format(x)}.{suffix}" for x in ("query", "key", "value")}
            keys |= {f"encoder.layer.{i}.{t}.{suffix}" for _, t in layer_map}
    return keys


def vit_to_image_encoder(sd: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """transformers ViT keys (stored layout) -> ``image_encoder.*``."""
    sd = _strip(sd, "vit")
    out = _map_params(sd, "image_encoder.", VIT_PARAM_MAP)
    out.update(_map_layers(sd, "encoder.layer.", "image_encoder.layers.", VIT_QKV, VIT_LAYER_MAP, num_layers))
    _no_leftovers(sd, _used(sd, VIT_QKV, VIT_LAYER_MAP, VIT_PARAM_MAP, num_layers), "ViT")
    return out


def bert_to_text_encoder(sd: dict[str, Tensor], num_layers: int, kind: str = "bert", pad_token_id: int = 0):
    """transformers BERT / RoBERTa keys (stored layout) -> ``text_encoder.*``."""
    sd = _strip(sd, kind)
    sd.pop("embeddings.position_ids", None)  # a buffer in older checkpoints
    sd.pop("embeddings.token_type_ids", None)
    out = _map_params(sd, "text_encoder.", BERT_PARAM_MAP)
    if kind == "roberta":  # RoBERTa numbers positions from pad_token_id + 1
        key = "text_encoder.position_embeddings.weight"
        out[key] = out[key][pad_token_id + 1 :]
    out.update(_map_layers(sd, "encoder.layer.", "text_encoder.layers.", BERT_QKV, BERT_LAYER_MAP, num_layers))
    _no_leftovers(sd, _used(sd, BERT_QKV, BERT_LAYER_MAP, BERT_PARAM_MAP, num_layers), kind)
    return out


def _no_leftovers(sd, used: set[str], what: str) -> None:
    left = sorted(k for k in sd if k not in used)
    if left:
        raise ConfigError(f"{what} checkpoint: {len(left)} tensor(s) map to no encoder weight, e.g. {left[:4]}")


def _flava_encoder(path: Path, kind: str, encoder: str) -> dict[str, Tensor]:
    prefix = f"{encoder}_encoder."
    if kind == "flava_run":
        from . import checkpoint as ckpt_mod
        from .model import FlavaForPretraining

        ckpt = path if (path / "meta.json").is_file() else ckpt_mod.latest_checkpoint(path)
        model = FlavaForPretraining(FlavaConfig.from_dict(ckpt_mod.read_meta(ckpt)["model_config"]))
        ckpt_mod.load_model_weights(ckpt, model)
        sd = model.state_dict()
    else:
        from .convert import hf_to_ours_state_dict

        sd = hf_to_ours_state_dict(read_state_dict(path))
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def encoder_state_dict(value: str, encoder: str, mcfg: FlavaConfig) -> dict[str, Tensor]:
    """``image_encoder.*`` / ``text_encoder.*`` weights from the checkpoint ``value`` names."""
    path = _local_dir(value)
    kind = source_kind(path)
    enc_cfg = getattr(mcfg, encoder)
    if kind in ("flava_run", "flava"):
        return _flava_encoder(path, kind, encoder)
    if encoder == "image":
        return vit_to_image_encoder(read_state_dict(path), enc_cfg.num_layers)
    return bert_to_text_encoder(read_state_dict(path), enc_cfg.num_layers, kind, enc_cfg.pad_token_id)


@torch.no_grad()
def load_encoder_init(model, cfg) -> list[str]:
    """Copy the encoder-only initial weights of ``cfg.model`` into ``model`` (unsharded, before training starts).
    Returns the names of the encoders initialised."""
    done = []
    for encoder, value in (("image", cfg.model.image_encoder_init), ("text", cfg.model.text_encoder_init)):
        if not value:
            continue
        sd = encoder_state_dict(value, encoder, model.config)
        own = {k: v for k, v in model.state_dict().items() if k.startswith(f"{encoder}_encoder.")}
        missing = sorted(set(own) - set(sd) - OPTIONAL)
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ConfigError(
                f"model.{encoder}_encoder_init={value}: missing {missing[:6]}, unexpected {unexpected[:6]}"
            )
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise ConfigError(f"model.{encoder}_encoder_init={value}: {k} has shape {tuple(v.shape)}, "
                                  f"the model {tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))
        log.info("initialised the %s encoder from %s (%d tensors)", encoder, value, len(sd))
        done.append(encoder)
    return done
