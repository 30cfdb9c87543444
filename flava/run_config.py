"""Typed configuration of a pretraining run: model, data, optimiser, run. YAML in, validated, ``key=value``
overrides with dotted keys (``optim.lr=1e-4``, ``model.overrides.image.image_size=64``); unknown keys are an error
that names the key and the accepted ones, so a typo never silently falls back to a default.

    cfg = load_run_config("configs/tiny.yaml", ["run.micro_batch_size=8", "data.ratios.pairs=1.0"])
    model_cfg = cfg.model.build()          # a flava.config.FlavaConfig
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pmd.config_loader import ConfigError, Where, apply_overrides, from_dict, merge

from .config import FlavaConfig

KINDS = ("pairs", "images", "text")


@dataclass
class ModelSection:
    preset: str = "tiny"  # flava.config preset: tiny | flava_full
    overrides: dict = field(default_factory=dict)  # nested FlavaConfig keys applied on the preset
    pretrained: str | None = None  # transformers FLAVA dir or hub name (facebook/flava-full) to start from
    codebook: str = "random"  # "random" (offline tests/demo) | a dir / file / hub name (facebook/flava-image-codebook)
    codebook_seed: int = 0
    # The frozen dVAE's weights and compute: fp32 | bf16. bf16 halves its cost (~20% of a flava_full pair step in
    # fp32) and changes some target ids (agreement with fp32 in docs/pretrain.md)
    codebook_dtype: str = "fp32"
    # "random" gives MIM / MMM-image targets that mean nothing; flava_full refuses it unless this is set (benchmarks)
    allow_random_codebook: bool = False
    # Encoder-only initial weights (paper section 3.3; flava.init_weights): a transformers ViT (DINO ViT-B/16
    # layout) for the image encoder; a BERT / RoBERTa, or a FLAVA run / export (the text-only MLM stage), for the
    # text encoder. A directory or hub name; None: random init.
    image_encoder_init: str | None = None
    text_encoder_init: str | None = None
    # From scratch, the text vocabulary follows the tokenizer (a trained WordPiece vocab is smaller than BERT's).
    text_vocab_from_tokenizer: bool = True

    def build(self) -> FlavaConfig:
        """The FlavaConfig of the preset with ``overrides`` applied (unknown keys rejected by FlavaConfig)."""
        base = FlavaConfig.preset(self.preset).to_dict()
        over = copy.deepcopy(self.overrides or {})
        img = over.get("image", {}) or {}
        # Changing the image grid without the codebook resolution would always fail the 8x check: follow it.
        if ("image_size" in img or "patch_size" in img) and "image_size" not in (over.get("codebook") or {}):
            size = img.get("image_size", base["image"]["image_size"])
            patch = img.get("patch_size", base["image"]["patch_size"])
            over.setdefault("codebook", {})["image_size"] = 8 * (size // patch)
        try:
            return FlavaConfig.from_dict(merge(base, over))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None


@dataclass
class DataSection:
    pairs: list = field(default_factory=list)  # PMD build dirs / manifest.json / shard dirs / .parquet files
    images: list = field(default_factory=list)  # image shards (an `image` column) or image folders, for MIM
    text: list = field(default_factory=list)  # Parquet with a `text` column or .txt files (one document a line)
    ratios: dict = field(default_factory=lambda: {"pairs": 0.70, "images": 0.15, "text": 0.15})
    split: str | None = None  # keep only pair rows whose `split` column equals this (None: all rows)
    tokenizer: str | None = None  # tokenizer dir or hub name; None: train a WordPiece vocab on the pair captions
    tokenizer_vocab_size: int = 30522  # target size when training the tokenizer
    text_max_length: int = 77  # pairs
    text_only_max_length: int = 512  # text-only MLM batches
    num_workers: int = 2  # dataloader worker processes per source per rank
    prefetch_factor: int = 2
    shuffle_buffer: int = 1000  # rows shuffled together (a window of consecutive row groups)
    crop_scale: list = field(default_factory=lambda: [0.9, 1.0])
    crop_ratio: list = field(default_factory=lambda: [0.75, 4 / 3])
    itm_probability: float = 0.1
    mlm_probability: float = 0.15
    mask_patches: int | None = None  # masked patches per image; None: 75/196 of the grid (BEiT)
    mask_min_block: int | None = None  # smallest masking block; None: 16/196 of the grid, at least 1
    pad_to_longest: bool = True  # text tensors padded to the batch's longest sequence, not to *_max_length
    # each loader worker reads its next shuffle window in a background thread while it serves the current one
    # (same order and resume; one more window in memory)
    prefetch_window: bool = True

    def active_kinds(self) -> list[str]:
        return [k for k in KINDS if float(self.ratios.get(k, 0.0)) > 0]


@dataclass
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 10000
    # The schedule's horizon. Deliberately independent of `run.steps`: stopping early and resuming with a larger
    # --steps must not change the learning rate of steps already taken.
    total_steps: int = 150000
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class RunSection:
    steps: int = 1000  # train until this optimizer step (`--steps`); larger on a resumed run continues it
    global_batch_size: int = 8192  # samples per optimizer step over all ranks
    micro_batch_size: int = 8  # samples per forward per rank; accumulation = global / (micro * world)
    seed: int = 1337
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: bool = False
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    export_final: bool = True  # write RUN/final in transformers format at the end of training
    device: str = "auto"  # auto | cpu | cuda
    tensorboard: bool = True
    progress: bool = True
    # The contrastive softmax spans the whole global batch (all micro-batches of all ranks) through gradient
    # caching, as the paper's 8192-way loss; false: per micro-batch (global_batch / accumulation columns).
    contrastive_gradient_cache: bool = False
    # The process group's collective timeout. Rank 0 trains the WordPiece vocabulary (data.tokenizer unset) while
    # the other ranks wait in a barrier: NCCL's default 10 minutes is too short for a large corpus
    # (or train it first: `data.tokenizer=DIR` skips that wait).
    dist_timeout_minutes: int = 60
    # torch.use_deterministic_algorithms(True) (and cuBLAS's fixed workspace): on GPU the default kernels (atomic
    # adds in backward, SDPA, scatter) make a fresh run and a resume differ in the last bits; on CPU both already
    # reproduce exactly. Costs speed; an op without a deterministic GPU kernel raises (docs/pretrain.md).
    deterministic: bool = False
    # Rehearse an NCCL run's device placement on CPU (flava.devcheck): a host tensor handed to a device group's
    # collective (which gloo accepts and NCCL rejects) raises. A Python call per torch op: CI and debugging only.
    check_devices: bool = False
    # FSDP2 reshard_after_forward for the layers, encoders and heads. false: the gathered (bf16) weights are kept
    # from the forward through the step's last backward, so an accumulation step gathers them once instead of twice
    # per micro-batch (flava_full: +0.7 GB per GPU of bf16 weights; ~29 GB less traffic per GPU per step at accum 16)
    reshard_after_forward: bool = True
    # torch.compile of every transformer layer (before FSDP2 wraps it): fused kernels; the first steps compile
    compile: bool = False
    # torch.distributed.checkpoint.async_save: the step goes on while the checkpoint is written (the state is first
    # copied to host memory); the previous save is finished before the next one and at exit
    async_checkpoint: bool = False


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    # -- dict / YAML -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None) -> "RunConfig":
        cfg = from_dict(cls, data, Where("run config"))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self, world_size: int | None = None) -> None:
        """Static checks (and, given ``world_size``, the batch split). Raises ConfigError."""
        d, o, r = self.data, self.optim, self.run
        bad_kinds = sorted(set(d.ratios) - set(KINDS))
        if bad_kinds:
            raise ConfigError(f"data.ratios: unknown kind(s) {bad_kinds}; accepted are {list(KINDS)}")
        vals = {k: float(v) for k, v in d.ratios.items()}
        if any(v < 0 for v in vals.values()):
            raise ConfigError(f"data.ratios must be non-negative, got {d.ratios}")
        if not math.isclose(sum(vals.values()), 1.0, abs_tol=1e-6):
            raise ConfigError(f"data.ratios must sum to 1, got {d.ratios} (sum {sum(vals.values()):.6g})")
        lo, hi = (float(x) for x in d.crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {d.crop_scale}")
        if not 0 <= d.itm_probability < 1:
            raise ConfigError(f"data.itm_probability must be in [0, 1), got {d.itm_probability}")
        if not 0 < d.mlm_probability < 1:
            raise ConfigError(f"data.mlm_probability must be in (0, 1), got {d.mlm_probability}")
        if d.num_workers < 0 or d.shuffle_buffer < 1 or d.prefetch_factor < 1:
            raise ConfigError("data.num_workers >= 0, data.shuffle_buffer >= 1 and data.prefetch_factor >= 1")
        mcfg = self.model.build()
        for key in ("text_max_length", "text_only_max_length"):
            n = getattr(d, key)
            if not 3 <= n <= mcfg.text.max_position_embeddings:
                raise ConfigError(
                    f"data.{key} ({n}) must be in [3, model text.max_position_embeddings "
                    f"({mcfg.text.max_position_embeddings})]"
                )
        if d.mask_patches is not None and not 0 < d.mask_patches < mcfg.image.num_patches:
            raise ConfigError(f"data.mask_patches must be in (0, {mcfg.image.num_patches}), got {d.mask_patches}")
        if o.lr <= 0 or o.weight_decay < 0 or o.eps <= 0 or o.grad_clip < 0:
            raise ConfigError("optim: lr > 0, weight_decay >= 0, eps > 0 and grad_clip >= 0 are required")
        if o.warmup_steps < 0 or o.total_steps < 1 or o.warmup_steps > o.total_steps:
            raise ConfigError(
                f"optim: need 0 <= warmup_steps ({o.warmup_steps}) <= total_steps ({o.total_steps}) and total >= 1"
            )
        if not 0 <= o.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        if r.steps < 0 or r.micro_batch_size < 1 or r.global_batch_size < 1:
            raise ConfigError("run: steps >= 0, micro_batch_size >= 1 and global_batch_size >= 1 are required")
        if r.global_batch_size % r.micro_batch_size:
            raise ConfigError(
                f"run.global_batch_size ({r.global_batch_size}) is not divisible by run.micro_batch_size "
                f"({r.micro_batch_size})"
            )
        if world_size is not None and r.global_batch_size % (r.micro_batch_size * world_size):
            raise ConfigError(
                f"run.global_batch_size ({r.global_batch_size}) is not divisible by micro_batch_size x world size "
                f"({r.micro_batch_size} x {world_size})"
            )
        if self.model.codebook_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"model.codebook_dtype must be fp32 or bf16, got {self.model.codebook_dtype!r}")
        if r.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"run.precision must be auto, fp32 or bf16, got {r.precision!r}")
        if r.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"run.device must be auto, cpu or cuda, got {r.device!r}")
        if r.dist_timeout_minutes < 1:
            raise ConfigError(f"run.dist_timeout_minutes must be >= 1, got {r.dist_timeout_minutes}")
        if r.checkpoint_every < 1 or r.log_every < 1 or r.keep_checkpoints < 1:
            raise ConfigError("run: checkpoint_every, log_every and keep_checkpoints must be >= 1")
        if (self.model.preset == "flava_full" and self.model.codebook == "random" and not self.model.pretrained
                and not self.model.allow_random_codebook):
            raise ConfigError(
                "flava_full with model.codebook=random: MIM and MMM-image would learn random dVAE targets. Use the "
                "DALL-E codebook (model.codebook=facebook/flava-image-codebook; `flava fetch-assets` for offline "
                "nodes), or set model.allow_random_codebook=true for a benchmark or smoke test"
            )
        if self.model.pretrained and (self.model.image_encoder_init or self.model.text_encoder_init):
            raise ConfigError("model.pretrained and model.image/text_encoder_init exclude each other: choose one start")
        if r.contrastive_gradient_cache and any(
            getattr(mcfg, e).hidden_dropout > 0 or getattr(mcfg, e).attention_dropout > 0
            for e in ("image", "text", "multimodal")
        ):
            raise ConfigError(
                "run.contrastive_gradient_cache needs dropout 0 (the embedding pass and the backward pass must see "
                "the same network); FLAVA trains without dropout"
            )
        if self.model.pretrained is None and self.model.preset not in ("tiny", "flava_full"):
            raise ConfigError(f"model.preset must be tiny or flava_full, got {self.model.preset!r}")

    def source_paths(self, kind: str) -> list:
        """Paths of ``kind``. Without explicit image-only / text-only data, the pair shards serve as both (their
        images for MIM, their captions for MLM), so a PMD build alone runs the full recipe."""
        paths = list(getattr(self.data, kind))
        if not paths and kind in ("images", "text"):
            paths = list(self.data.pairs)
        return paths

    def validate_sources(self) -> None:
        """Every kind with a positive ratio has at least one source."""
        for kind in self.data.active_kinds():
            if not self.source_paths(kind):
                raise ConfigError(
                    f"data.ratios.{kind} is {self.data.ratios[kind]} but no {kind} data is given "
                    f"(--data for pairs, or data.{kind}=[...])"
                )

    def accumulation(self, world_size: int) -> int:
        self.validate(world_size)
        return self.run.global_batch_size // (self.run.micro_batch_size * world_size)


def builtin_config_path(name: str) -> Path:
    """``tiny`` / ``flava_full`` -> the packaged configs/<name>.yaml."""
    return Path(str(importlib.resources.files("configs") / f"{name}.yaml"))


def read_config_dict(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists() and not p.suffix:
        candidate = builtin_config_path(str(path))
        if candidate.exists():
            p = candidate
    if not p.exists():
        raise ConfigError(f"config file not found: {path}")
    with open(p) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return data


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = read_config_dict(path) if path is not None else {}
    return RunConfig.from_dict(apply_overrides(data, overrides or []))


def load_train_config(path: str | Path, overrides: list[str], pairs: list[str] | None = None,
                      images: list[str] | None = None, text: list[str] | None = None,
                      steps: int | None = None) -> RunConfig:
    """`flava train`'s configuration: the file, its ``key=value`` overrides, then ``--data`` / ``--images`` /
    ``--text`` / ``--steps`` (each, when given, replacing its key); every active kind must have data."""
    flags = {"data.pairs": pairs, "data.images": images, "data.text": text, "run.steps": steps}
    cfg = RunConfig.from_dict(apply_overrides(apply_overrides(read_config_dict(path), overrides), flags))
    cfg.validate_sources()
    return cfg
