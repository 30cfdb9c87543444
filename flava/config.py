"""Typed, YAML-friendly configuration of the FLAVA model.

``FlavaConfig.from_dict`` / ``to_dict`` round-trip plain dictionaries (as read from YAML); ``from_dict`` is the
project's one config loader (``pmd.config_loader``), so a typo or a wrong type in a config file fails loudly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pmd.config_loader import from_dict


@dataclass
class EncoderConfig:
    """A stack of pre-LN transformer layers (shared by the image, text and multimodal encoders)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    qkv_bias: bool = True
    hidden_act: str = "gelu"  # exact (erf) GELU, as transformers' ACT2FN["gelu"]
    # False: post-LN layers (LayerNorm after each residual, no final LayerNorm), the BERT / RoBERTa layout that a text
    # encoder initialised from such a checkpoint keeps (flava.init_weights). FLAVA itself is pre-LN.
    norm_first: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.hidden_act not in ("gelu", "gelu_tanh", "relu"):
            raise ValueError(f"hidden_act must be gelu, gelu_tanh or relu, got {self.hidden_act!r}")


@dataclass
class ImageEncoderConfig(EncoderConfig):
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    vocab_size: int = 8192  # number of image (codebook) tokens predicted by MIM / MMM-image

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


@dataclass
class TextEncoderConfig(EncoderConfig):
    vocab_size: int = 30522
    type_vocab_size: int = 2
    max_position_embeddings: int = 512
    pad_token_id: int = 0


@dataclass
class MultimodalEncoderConfig(EncoderConfig):
    num_layers: int = 6


@dataclass
class CodebookConfig:
    """The DALL-E dVAE encoder (transformers' ``FlavaImageCodebookConfig``)."""

    hidden_size: int = 256
    num_groups: int = 4
    num_blocks_per_group: int = 2
    input_channels: int = 3
    vocab_size: int = 8192
    image_size: int = 112  # codebook input resolution; 8x downsampling gives the patch grid


@dataclass
class LossWeights:
    mim: float = 1.0
    mlm: float = 1.0
    global_contrastive: float = 1.0
    itm: float = 1.0
    mmm_image: float = 1.0
    mmm_text: float = 1.0


@dataclass
class FlavaConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    multimodal: MultimodalEncoderConfig = field(default_factory=MultimodalEncoderConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    loss_weights: LossWeights = field(default_factory=LossWeights)
    projection_dim: int = 768
    logit_scale_init: float = 2.6592  # ln(1 / 0.07), transformers' default
    logit_scale_max: float = 4.6052  # ln(100): temperature exp(logit_scale) <= 100
    logit_scale_min: float = 0.0
    ce_ignore_index: int = -100
    initializer_range: float = 0.02
    global_backprop_contrastive: bool = True  # gather embeddings WITH gradients across ranks
    # drop ITM-negative rows' captions (duplicates of another row's caption) from the contrastive columns;
    # transformers keeps them (set false for parity with it)
    contrastive_exclude_itm_negatives: bool = True
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing per transformer layer

    def __post_init__(self) -> None:
        if self.image.vocab_size != self.codebook.vocab_size:
            raise ValueError(
                f"image.vocab_size ({self.image.vocab_size}) must equal codebook.vocab_size "
                f"({self.codebook.vocab_size}): MIM predicts codebook tokens"
            )
        if self.codebook.image_size // 8 != self.image.grid_size:
            raise ValueError(
                f"codebook.image_size ({self.codebook.image_size}) must be 8x the patch grid "
                f"({self.image.grid_size}): the dVAE downsamples by 8"
            )

    # -- dict / YAML -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "FlavaConfig":
        return from_dict(cls, data, "FlavaConfig")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- presets -----------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "FlavaConfig":
        try:
            return PRESETS[name]()
        except KeyError:
            raise ValueError(f"unknown FLAVA preset {name!r}; known: {sorted(PRESETS)}") from None


def flava_full() -> FlavaConfig:
    """The paper's model: ViT-B/16 image and text encoders, 6-layer fusion, 768 hidden, 224 px."""
    return FlavaConfig()


def tiny() -> FlavaConfig:
    """A few-hundred-thousand-parameter model for tests (32 px images, 4x4 patch grid)."""
    enc = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
    return FlavaConfig(
        image=ImageEncoderConfig(**enc, image_size=32, patch_size=8, vocab_size=64),
        text=TextEncoderConfig(**enc, vocab_size=512, max_position_embeddings=64),
        multimodal=MultimodalEncoderConfig(**{**enc, "num_layers": 2}),
        codebook=CodebookConfig(hidden_size=8, vocab_size=64, image_size=32),
        projection_dim=24,
    )


PRESETS = {"flava_full": flava_full, "tiny": tiny}
