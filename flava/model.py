"""FLAVA in plain PyTorch, written for speed and for FSDP2.

Layout (every transformer layer is its own module, so ``fully_shard`` can wrap per layer; see
``FlavaForPretraining.transformer_layers``)::

    FlavaForPretraining
      image_encoder       ImageEncoder: patch conv, CLS_I, mask token, learned positions, pre-LN layers, final LN
      text_encoder        TextEncoder: BERT embeddings (word + position + type, LN), pre-LN layers, final LN
      multimodal_encoder  MultimodalEncoder: CLS_M + pre-LN layers + final LN over [CLS_M, img, txt]
      image_projection / text_projection    contrastive projections (Linear, no pooler)
      image_to_mm / text_to_mm              unimodal hidden states (before the final LN) -> fusion width
      logit_scale         shape (1,), temperature exp(logit_scale) clamped to <= 100
      mim_head, mlm_head, mmm_image_head, mmm_text_head, itm_head

Numerics match transformers' ``FlavaForPreTraining`` (see ``flava.convert`` and ``tests/flava/test_parity.py``);
the speed comes from fused QKV projections, ``scaled_dot_product_attention``, running the unmasked and masked
copies of a modality as one batch, and skipping work transformers does but never uses (the unmasked passes of
image-only and text-only batches, unmasked-pass fusion projections, poolers).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import EncoderConfig, FlavaConfig, ImageEncoderConfig, TextEncoderConfig
from .losses import global_contrastive_loss, itm_loss, masked_prediction_loss, positive_pair_mask

_ACTS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# --------------------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------------------
class TransformerLayer(nn.Module):
    """Pre-LN block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``; attention via SDPA with a fused QKV matmul."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.attention_dropout = cfg.attention_dropout
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, d)
        self.act = _ACTS[cfg.hidden_act]
        self.drop = nn.Dropout(cfg.hidden_dropout) if cfg.hidden_dropout > 0 else nn.Identity()
        self.norm_first = cfg.norm_first

    def _attention(self, h: Tensor, attn_mask: Tensor | None) -> Tensor:
        b, n, d = h.shape
        qkv = self.qkv(h).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attention_dropout if self.training else 0.0
        )
        return self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if not self.norm_first:  # post-LN (BERT): norm1 / norm2 after each residual
            x = self.norm1(x + self._attention(x, attn_mask))
            return self.norm2(x + self.drop(self.fc2(self.act(self.fc1(x)))))
        x = x + self._attention(self.norm1(x), attn_mask)
        return x + self.drop(self.fc2(self.act(self.fc1(self.norm2(x)))))


class Pooler(nn.Module):
    """``tanh(W h_0 + b)``. Kept in the unimodal/fusion encoders only for weight import/export (no loss uses them)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class TransformerStack(nn.Module):
    """Layers + final LN. ``forward`` returns ``(hidden, last_hidden_state)``: the last layer's output before and
    after the final LayerNorm (the fusion encoder consumes the former, contrastive/MIM/MLM the latter)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_layers)])
        # post-LN layers end normalised: no final LayerNorm (as BERT)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()
        self.pooler = Pooler(cfg.hidden_size)
        self.gradient_checkpointing = False

    def run_layers(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        return x


@dataclass
class EncoderOutput:
    hidden: Tensor  # [B, N, D] last layer output before the final LayerNorm (fusion input)
    last_hidden_state: Tensor  # [B, N, D] after the final LayerNorm


# FSDP2 finds the tensors of a module's output with pytree to hook its pre-backward (re-gather, reduce-scatter);
# before torch 2.13 it did not look inside an unregistered dataclass, so an encoder's parameters could silently get
# no gradient. Registered, both fields are pytree leaves on every torch version.
pytree.register_dataclass(EncoderOutput)


def _attn_mask(padding_mask: Tensor | None) -> Tensor | None:
    """``[B, N]`` 1 = keep, 0 = padding -> boolean SDPA mask ``[B, 1, 1, N]`` (True = attend)."""
    if padding_mask is None:
        return None
    return padding_mask.bool()[:, None, None, :]


class ImageEncoder(TransformerStack):
    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__(cfg)
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))
        self.embed_drop = nn.Dropout(cfg.hidden_dropout) if cfg.hidden_dropout > 0 else nn.Identity()

    def patchify(self, pixel_values: Tensor) -> Tensor:
        h, w = pixel_values.shape[-2:]
        if h != self.cfg.image_size or w != self.cfg.image_size:
            raise ValueError(f"expected {self.cfg.image_size}x{self.cfg.image_size} images, got {h}x{w}")
        return self.patch_embed(pixel_values).flatten(2).transpose(1, 2)

    def embed(self, patches: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """Patch embeddings ``[B, P, D]`` -> ``[B, 1+P, D]`` with masked patches replaced by the mask token."""
        b = patches.shape[0]
        if patch_mask is not None:
            m = patch_mask.reshape(b, -1, 1).bool()
            patches = torch.where(m, self.mask_token.to(patches.dtype), patches)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(patches.dtype), patches], dim=1)
        return self.embed_drop(x + self.position_embeddings)

    def encode(self, x: Tensor) -> EncoderOutput:
        hidden = self.run_layers(x, None)
        return EncoderOutput(hidden, self.norm(hidden))

    def forward(
        self, pixel_values: Tensor, patch_mask: Tensor | None = None, also_unmasked: bool = False
    ) -> EncoderOutput | tuple[EncoderOutput, EncoderOutput]:
        """One pass; with ``also_unmasked`` the unmasked and the masked copies of the images run as ONE batch and
        ``(unmasked, masked)`` is returned. Everything goes through ``forward`` so FSDP2 hooks see it."""
        patches = self.patchify(pixel_values)
        if not also_unmasked:
            return self.encode(self.embed(patches, patch_mask))
        out = self.encode(torch.cat([self.embed(patches, None), self.embed(patches, patch_mask)]))
        return tuple(_split(out, 2))


class TextEncoder(TransformerStack):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__(cfg)
        self.cfg = cfg
        d = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.embed_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.embed_drop = nn.Dropout(cfg.hidden_dropout) if cfg.hidden_dropout > 0 else nn.Identity()

    def embed(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        n = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        if position_ids is None:
            x = x + self.position_embeddings.weight[:n]
        else:
            x = x + self.position_embeddings(position_ids)
        return self.embed_drop(self.embed_norm(x))

    def encode(self, x: Tensor, attention_mask: Tensor | None = None) -> EncoderOutput:
        hidden = self.run_layers(x, _attn_mask(attention_mask))
        return EncoderOutput(hidden, self.norm(hidden))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        input_ids_masked: Tensor | None = None,
    ) -> EncoderOutput | tuple[EncoderOutput, EncoderOutput]:
        """One pass; with ``input_ids_masked`` the original and the masked text run as ONE batch and
        ``(unmasked, masked)`` is returned."""
        if input_ids_masked is None:
            return self.encode(self.embed(input_ids, token_type_ids, position_ids), attention_mask)
        two = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
        x = self.embed(torch.cat([input_ids, input_ids_masked]), two(token_type_ids), two(position_ids))
        return tuple(_split(self.encode(x, two(attention_mask)), 2))


class MultimodalEncoder(TransformerStack):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))

    def forward(self, fused: Tensor, attention_mask: Tensor | None = None) -> EncoderOutput:
        """``fused [B, N, D]`` (projected image then text states), ``attention_mask [B, N]`` -> ``[B, 1+N, D]``."""
        b = fused.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(fused.dtype), fused], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(b, 1), attention_mask], dim=1)
        hidden = self.run_layers(x, _attn_mask(attention_mask))
        return EncoderOutput(hidden, self.norm(hidden))


class MaskedPredictionHead(nn.Module):
    """``decoder(LN(act(dense(h))))``; separate weights per task (not tied to the word embeddings)."""

    def __init__(self, d: int, vocab_size: int, eps: float, act: str) -> None:
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.act = _ACTS[act]
        self.norm = nn.LayerNorm(d, eps=eps)
        self.decoder = nn.Linear(d, vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))


class ITMHead(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.pooler = Pooler(d)
        self.classifier = nn.Linear(d, 2)

    def forward(self, fused_hidden: Tensor) -> Tensor:
        return self.classifier(self.pooler(fused_hidden))


# --------------------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------------------
@dataclass
class FlavaLosses:
    """Weighted losses; ``None`` where the batch kind does not produce the loss."""

    mim: Tensor | None = None
    mlm: Tensor | None = None
    itm: Tensor | None = None
    global_contrastive: Tensor | None = None
    mmm_image: Tensor | None = None
    mmm_text: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class FlavaPretrainingOutput:
    loss: Tensor | None
    losses: FlavaLosses
    image: EncoderOutput | None = None  # unmasked image pass (pair batches)
    image_masked: EncoderOutput | None = None
    text: EncoderOutput | None = None  # unmasked text pass (pair batches)
    text_masked: EncoderOutput | None = None
    multimodal_masked: EncoderOutput | None = None  # fusion over the masked pair, all rows
    image_embedding: Tensor | None = None  # projected, not normalised, [B, projection_dim]
    text_embedding: Tensor | None = None
    itm_logits: Tensor | None = None
    logits_per_image: Tensor | None = None
    logits_per_text: Tensor | None = None
    logit_scale: Tensor | None = None  # the clamped log temperature used (pair batches), fp32 under FSDP too


class _ClampSTE(torch.autograd.Function):
    """Clamp in the forward, identity gradient: the value used is the clamped one (as transformers' in-place
    ``logit_scale.data.clamp_``), and the gradient does not vanish while the parameter sits outside the range."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: float, hi: float) -> Tensor:  # type: ignore[override]
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None, None


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------
class FlavaForPretraining(nn.Module):
    """FLAVA encoders, heads and the five pretraining losses (MMM split into image and text parts, as in the
    reference implementations). The image tokenizer (dVAE codebook) is deliberately NOT a submodule: it is frozen
    and lives outside FSDP and the optimizer (``flava.codebook``); pass its token ids as ``image_token_ids``.
    """

    def __init__(self, config: FlavaConfig | None = None) -> None:
        super().__init__()
        config = config or FlavaConfig()
        self.config = config
        ic, tc, mc = config.image, config.text, config.multimodal
        self.image_encoder = ImageEncoder(ic)
        self.text_encoder = TextEncoder(tc)
        self.multimodal_encoder = MultimodalEncoder(mc)
        self.image_projection = nn.Linear(ic.hidden_size, config.projection_dim)
        self.text_projection = nn.Linear(tc.hidden_size, config.projection_dim)
        self.image_to_mm = nn.Linear(ic.hidden_size, mc.hidden_size)
        self.text_to_mm = nn.Linear(tc.hidden_size, mc.hidden_size)
        # shape (1,), not 0-dim: FSDP2 cannot shard a scalar parameter
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init)))
        self.mim_head = MaskedPredictionHead(ic.hidden_size, ic.vocab_size, ic.layer_norm_eps, ic.hidden_act)
        self.mlm_head = MaskedPredictionHead(tc.hidden_size, tc.vocab_size, tc.layer_norm_eps, tc.hidden_act)
        self.mmm_image_head = MaskedPredictionHead(mc.hidden_size, ic.vocab_size, ic.layer_norm_eps, ic.hidden_act)
        self.mmm_text_head = MaskedPredictionHead(mc.hidden_size, tc.vocab_size, tc.layer_norm_eps, tc.hidden_act)
        self.itm_head = ITMHead(mc.hidden_size)
        self.reset_parameters()
        self.set_gradient_checkpointing(config.gradient_checkpointing)

    # -- setup ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Linear/Conv/Embedding ~ N(0, initializer_range), biases 0, LayerNorm (1, 0), padding embedding row 0,
        logit_scale = logit_scale_init (transformers' and torchmultimodal's scheme), except the CLS, mask and image
        position tokens: truncated N(0, initializer_range) as in ViT/BEiT, not zeros. At zero, a CLS token's first
        LayerNorm normalises an all-zero vector (variance 0, eps 1e-12), and its gradient at step 1 is ~1e5 times
        the others' (docs/flava-model.md). Parity with transformers is unaffected: it compares copied weights."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (
            self.image_encoder.cls_token,
            self.image_encoder.mask_token,
            self.image_encoder.position_embeddings,
            self.multimodal_encoder.cls_token,
        ):
            nn.init.trunc_normal_(p, 0.0, std, -2 * std, 2 * std)
        self.logit_scale.fill_(self.config.logit_scale_init)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for stack in (self.image_encoder, self.text_encoder, self.multimodal_encoder):
            stack.gradient_checkpointing = enabled

    def transformer_layers(self) -> list[TransformerLayer]:
        """Every transformer layer (image, text, fusion), the natural FSDP2 ``fully_shard`` units."""
        return [
            *self.image_encoder.layers,
            *self.text_encoder.layers,
            *self.multimodal_encoder.layers,
        ]

    def encoders(self) -> list[TransformerStack]:
        return [self.image_encoder, self.text_encoder, self.multimodal_encoder]

    def heads(self) -> list[nn.Module]:
        """Everything outside the encoders except ``logit_scale``: their own FSDP2 units, so the root can keep
        ``logit_scale`` in fp32 while these compute in bf16."""
        return [
            self.image_projection, self.text_projection, self.image_to_mm, self.text_to_mm,
            self.mim_head, self.mlm_head, self.mmm_image_head, self.mmm_text_head, self.itm_head,
        ]

    def gradient_parameters(self, kind: str) -> set[str]:
        """Names of the trainable parameters that a ``kind`` step ("pairs", "images", "text") must give a gradient,
        under this config's loss weights: the trainer's step-1 check (``flava.train.check_gradients``) compares
        them with the gradients that arrived. The encoders' poolers serve weight import/export only; an encoder's
        final LayerNorm feeds contrastive/MIM/MLM, never the fusion (which reads the pre-norm states)."""
        w = self.config.loss_weights
        pools = ("image_encoder.pooler.", "text_encoder.pooler.", "multimodal_encoder.pooler.")
        prefixes: set[str] = set()
        if kind == "images" and w.mim > 0:
            prefixes |= {"image_encoder.", "mim_head."}
        elif kind == "text" and w.mlm > 0:
            prefixes |= {"text_encoder.", "mlm_head."}
        elif kind == "pairs":
            heads = {"itm_head.": w.itm, "mmm_image_head.": w.mmm_image, "mmm_text_head.": w.mmm_text}
            fusion = {h for h, weight in heads.items() if weight > 0}
            if fusion:
                prefixes |= fusion | {"image_encoder.", "text_encoder.", "image_to_mm.", "text_to_mm.",
                                      "multimodal_encoder."}
            if w.global_contrastive > 0:
                prefixes |= {"image_encoder.", "text_encoder.", "image_projection.", "text_projection.",
                             "logit_scale"}
        elif kind not in ("images", "text"):
            raise ValueError(f"unknown batch kind {kind!r}")
        skip = set(pools)
        if kind == "pairs" and w.global_contrastive <= 0:
            skip |= {"image_encoder.norm.", "text_encoder.norm."}
        return {
            n for n, p in self.named_parameters()
            if p.requires_grad and n.startswith(tuple(prefixes)) and not n.startswith(tuple(skip))
        }

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter in place (call after ``optimizer.step()``; works on an FSDP2-sharded parameter)."""
        self.logit_scale.clamp_(self.config.logit_scale_min, self.config.logit_scale_max)

    def clamped_logit_scale(self) -> Tensor:
        return _ClampSTE.apply(self.logit_scale, self.config.logit_scale_min, self.config.logit_scale_max)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- embeddings ------------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """Projected (not normalised) image CLS embedding ``[B, projection_dim]``."""
        out = self.image_encoder(pixel_values, patch_mask)
        return self.image_projection(out.last_hidden_state[:, 0])

    def encode_text(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Projected (not normalised) text CLS embedding ``[B, projection_dim]``."""
        out = self.text_encoder(input_ids, attention_mask, token_type_ids, position_ids)
        return self.text_projection(out.last_hidden_state[:, 0])

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        input_ids_masked: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        patch_mask: Tensor | None = None,
        image_token_ids: Tensor | None = None,
        mlm_labels: Tensor | None = None,
        itm_labels: Tensor | None = None,
        embeddings_only: bool = False,
        global_contrastive: bool = True,
        mim_positions: Tensor | None = None,
        mlm_positions: Tensor | None = None,
    ) -> FlavaPretrainingOutput:
        """One pretraining step's forward; the batch kind follows from the inputs (as in transformers):

        * image only (``pixel_values``): MIM on ``patch_mask`` positions, targets ``image_token_ids`` ``[B, P]``
          (codebook ids for every patch, or already ``ce_ignore_index`` where unmasked);
        * text only (``input_ids_masked`` and/or ``input_ids``): MLM with ``mlm_labels`` ``[B, L]``;
        * pairs (both): global contrastive on the unmasked encoders, then the fusion encoder on the masked image
          and masked text for ITM (``itm_labels`` ``[B]``, 1 = match, 0 = mismatch), MMM-image and MMM-text.
          Rows with ``itm_labels == 0`` are excluded from contrastive and MMM (all rows if none is positive).

        ``attention_mask`` is the text padding mask (1 keep, 0 pad); it also masks text padding in the fusion.

        Gradient caching (``flava.train``) calls a pair batch twice: ``embeddings_only`` runs only the unmasked
        encoders and projections (``image_embedding``, ``text_embedding``, ``logit_scale``; no loss), and
        ``global_contrastive=False`` runs everything but the contrastive loss, whose gradient the caller supplies.
        Both go through ``forward`` so that FSDP2's hooks gather the parameters.

        ``mim_positions`` / ``mlm_positions``: flat indices of the masked patches / labelled tokens
        (``masked_positions``), computed on the host; with them the masked-prediction losses need no host sync.
        """
        if embeddings_only:
            out = FlavaPretrainingOutput(loss=None, losses=FlavaLosses(), logit_scale=self.clamped_logit_scale())
            out.image_embedding = self.encode_image(pixel_values)
            out.text_embedding = self.encode_text(input_ids, attention_mask, token_type_ids, position_ids)
            return out
        cfg, w = self.config, self.config.loss_weights
        ignore = cfg.ce_ignore_index
        has_image = pixel_values is not None
        has_text = input_ids is not None or input_ids_masked is not None
        out = FlavaPretrainingOutput(loss=None, losses=FlavaLosses())
        losses = out.losses

        mim_labels = None
        if image_token_ids is not None:
            mim_labels = image_token_ids.reshape(image_token_ids.shape[0], -1).long()
            if patch_mask is not None:
                mim_labels = mim_labels.masked_fill(~patch_mask.reshape(mim_labels.shape).bool(), ignore)
        if mlm_labels is not None:
            mlm_labels = mlm_labels.reshape(mlm_labels.shape[0], -1).long()

        if has_image and not has_text:
            img = self.image_encoder(pixel_values, patch_mask)
            out.image_masked = img
            if patch_mask is None:
                out.image = img
            if mim_labels is not None and w.mim > 0:
                loss, _ = masked_prediction_loss(self.mim_head, img.last_hidden_state[:, 1:], mim_labels, ignore,
                                                 positions=mim_positions)
                losses.mim = loss * w.mim
        elif has_text and not has_image:
            ids = input_ids_masked if input_ids_masked is not None else input_ids
            txt = self.text_encoder(ids, attention_mask, token_type_ids, position_ids)
            out.text_masked = txt
            if input_ids_masked is None:
                out.text = txt
            if mlm_labels is not None and w.mlm > 0:
                seq = txt.last_hidden_state[:, -mlm_labels.shape[1] :]
                loss, _ = masked_prediction_loss(self.mlm_head, seq, mlm_labels, ignore, positions=mlm_positions)
                losses.mlm = loss * w.mlm
        elif has_image and has_text:
            self._pair_forward(
                out, pixel_values, input_ids, input_ids_masked, attention_mask, token_type_ids, position_ids,
                patch_mask, mim_labels, mlm_labels, itm_labels, global_contrastive, mim_positions, mlm_positions,
            )
        else:
            raise ValueError("FlavaForPretraining.forward needs pixel_values and/or input_ids")

        terms = list(losses.as_dict().values())
        if terms:  # plain sum, in transformers' order (mim, mlm, itm, gc, mmm_image, mmm_text)
            total = terms[0]
            for t in terms[1:]:
                total = total + t
            out.loss = total
        return out

    def _pair_forward(
        self, out, pixel_values, input_ids, input_ids_masked, attention_mask, token_type_ids, position_ids,
        patch_mask, mim_labels, mlm_labels, itm_labels, global_contrastive=True, mim_positions=None,
        mlm_positions=None,
    ) -> None:
        cfg, w, losses = self.config, self.config.loss_weights, out.losses
        ignore = cfg.ce_ignore_index
        # unmasked and masked copies of each modality run as ONE batch through their encoder
        if patch_mask is not None:
            out.image, out.image_masked = self.image_encoder(pixel_values, patch_mask, also_unmasked=True)
        else:
            out.image = out.image_masked = self.image_encoder(pixel_values)
        text_args = (attention_mask, token_type_ids, position_ids)
        if input_ids is None:  # masked text only: no unmasked text, so no contrastive loss (as transformers)
            out.text_masked = self.text_encoder(input_ids_masked, *text_args)
        elif input_ids_masked is not None and input_ids_masked is not input_ids:
            out.text, out.text_masked = self.text_encoder(input_ids, *text_args, input_ids_masked=input_ids_masked)
        else:
            out.text = out.text_masked = self.text_encoder(input_ids, *text_args)

        # fusion over projected pre-final-LN states of the masked passes, with the text padding mask
        img_h, txt_h = out.image_masked.hidden, out.text_masked.hidden
        fused = torch.cat([self.image_to_mm(img_h), self.text_to_mm(txt_h)], dim=1)
        fusion_mask = None
        if attention_mask is not None:
            fusion_mask = torch.cat([attention_mask.new_ones(img_h.shape[:2]), attention_mask], dim=1)
        mm = self.multimodal_encoder(fused, fusion_mask)
        out.multimodal_masked = mm
        batch = pixel_values.shape[0]
        pos = positive_pair_mask(itm_labels, batch, pixel_values.device)

        if itm_labels is not None and w.itm > 0:
            out.itm_logits = self.itm_head(mm.last_hidden_state)
            losses.itm = itm_loss(out.itm_logits, itm_labels) * w.itm

        if mim_labels is not None and w.mmm_image > 0:
            n_img = img_h.shape[1] - 1  # patches; fused layout is [CLS_M, CLS_I, patches, text]
            seq = mm.last_hidden_state[:, 2 : 2 + n_img]
            loss, _ = masked_prediction_loss(self.mmm_image_head, seq, mim_labels, ignore, pos, mim_positions)
            losses.mmm_image = loss * w.mmm_image

        if mlm_labels is not None and w.mmm_text > 0:
            seq = mm.last_hidden_state[:, -mlm_labels.shape[1] :]
            loss, _ = masked_prediction_loss(self.mmm_text_head, seq, mlm_labels, ignore, pos, mlm_positions)
            losses.mmm_text = loss * w.mmm_text

        out.image_embedding = self.image_projection(out.image.last_hidden_state[:, 0])
        if out.text is None:
            return
        out.text_embedding = self.text_projection(out.text.last_hidden_state[:, 0])
        out.logit_scale = self.clamped_logit_scale()
        if w.global_contrastive > 0 and global_contrastive:
            gc, out.logits_per_image, out.logits_per_text = global_contrastive_loss(
                out.image_embedding,
                out.text_embedding,
                out.logit_scale,
                pos,
                global_backprop=cfg.global_backprop_contrastive,
                exclude_negative_texts=cfg.contrastive_exclude_itm_negatives,
            )
            losses.global_contrastive = gc * w.global_contrastive


def masked_positions(mask: Tensor) -> Tensor:
    """Flat indices of the true entries of a host ``[B, N]`` mask (``forward``'s ``*_positions``). Call it before
    the batch moves to the device: on the device, nonzero is a synchronisation."""
    if mask.device.type != "cpu":
        raise ValueError("masked_positions expects the host copy of the mask (on the device it would synchronise)")
    return torch.nonzero(mask.reshape(-1)).reshape(-1)


def _split(out: EncoderOutput, n: int) -> list[EncoderOutput]:
    if n == 1:
        return [out]
    return [EncoderOutput(h, last) for h, last in zip(out.hidden.chunk(n), out.last_hidden_state.chunk(n))]
