"""The FLAVA pretraining loop: FSDP2, precision, gradient accumulation, DCP checkpoints with exact resume, logging.

Run it with ``flava train`` (one process, ``torchrun --nproc_per_node N -m pmd_cli.flava train ...`` or
``flava train --nproc N``). One optimizer step = ``global_batch_size`` samples of ONE kind (pairs, images or text)
chosen by ``flava.data.kind_for_step(seed, step)`` identically on every rank, in ``accumulation`` micro-batches of
``micro_batch_size`` per rank.

Exact resume: model init, data order and every random choice on the data side are pure functions of the seed and
the position; a checkpoint holds the model, AdamW state, scheduler, step, RNG states and the loader cursors, so
stopping after step k and resuming reproduces steps k+1.. of an uninterrupted run.

This file keeps the loop; process setup and FSDP2 sharding are in ``flava.distributed``, what a step reports in
``flava.metrics`` and the export to transformers format in ``flava.convert``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import checkpoint as ckpt_mod
from .codebook import CODEBOOK_DTYPES, RANDOM_CODEBOOK_WARNING, load_codebook, map_pixels, random_codebook
from .config import FlavaConfig
from .data import (
    MultiSourceLoader, Source, build_specs, iter_texts, kind_for_step, normalize_images, reshard_loader_states,
)
from .convert import export_final
from .devcheck import device_check
from .distributed import DistInfo, any_rank, barrier, require_shared, setup_distributed, shard_model, teardown
from .init_weights import apply_init_configs, load_encoder_init
from .losses import global_contrastive_loss, positive_pair_mask
from .metrics import MetricsWriter, Throughput, flops_per_sample, log_record
from .model import FlavaForPretraining, FlavaPretrainingOutput, masked_positions
from .optim import build_optimizer, build_scheduler
from .run_config import ConfigError, RunConfig
from .tokenizer import TextTokenizer, copy_tokenizer, load_tokenizer, train_wordpiece

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------------------------
def prepare_tokenizer(cfg: RunConfig, run_dir: Path, info: DistInfo) -> TextTokenizer:
    """The run's tokenizer lives in RUN/tokenizer (so evaluation and resume use the very same one): copied from
    ``data.tokenizer``, or trained on the pair captions (text corpus if there are no pairs) when none is given."""
    tok_dir = run_dir / "tokenizer"
    # only rank 0 looks and writes; every rank passes the barrier (a rank that saw the file already written and
    # skipped the barrier would deadlock the others)
    if info.is_main and not (tok_dir / "tokenizer.json").is_file():
        if cfg.data.tokenizer:
            copy_tokenizer(load_tokenizer(cfg.data.tokenizer), tok_dir)
        else:
            corpus = cfg.data.pairs or cfg.data.text
            log.info("training a WordPiece tokenizer (vocab %d) on %s", cfg.data.tokenizer_vocab_size, corpus)
            train_wordpiece(iter_texts(list(corpus)), tok_dir, vocab_size=cfg.data.tokenizer_vocab_size)
    barrier(info)
    return load_tokenizer(tok_dir)


def build_model_config(cfg: RunConfig, tokenizer: TextTokenizer) -> tuple[FlavaConfig, FlavaForPretraining | None]:
    pretrained = None
    if cfg.model.pretrained:
        from .convert import from_pretrained

        pretrained = from_pretrained(cfg.model.pretrained)
        mcfg = pretrained.config
    else:
        mcfg = cfg.model.build()
        if cfg.model.text_vocab_from_tokenizer:
            mcfg.text.vocab_size = len(tokenizer)
        mcfg = apply_init_configs(cfg, mcfg)  # encoders shaped like their initial weights (flava.init_weights)
    if len(tokenizer) > mcfg.text.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's text vocabulary is {mcfg.text.vocab_size}: "
            "use the model's tokenizer, or train from scratch with model.text_vocab_from_tokenizer=true"
        )
    mcfg.gradient_checkpointing = bool(cfg.run.activation_checkpointing)
    return mcfg, pretrained


def build_codebook(cfg: RunConfig, mcfg: FlavaConfig, device):
    if cfg.model.codebook == "random":
        if {"pairs", "images"} & set(cfg.data.active_kinds()):
            log.warning(RANDOM_CODEBOOK_WARNING)
        cb = random_codebook(mcfg.codebook, seed=cfg.model.codebook_seed)
    else:
        cb = load_codebook(cfg.model.codebook, config=mcfg.codebook)
    if cb.vocab_size != mcfg.image.vocab_size:
        raise ConfigError(
            f"codebook vocabulary {cb.vocab_size} != model image.vocab_size {mcfg.image.vocab_size}"
        )
    return cb.to(device, dtype=CODEBOOK_DTYPES[cfg.model.codebook_dtype])


def compile_layers(model: FlavaForPretraining) -> None:
    """``run.compile``: torch.compile every transformer layer in place (before FSDP2 wraps it, as torchtitan does:
    the layers are the repeated, compute-bound part; the heads' gathers and the losses' dynamic shapes stay eager).
    The layers of a stack share one compiled graph."""
    for layer in model.transformer_layers():
        layer.compile()


def compute_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    p = cfg.run.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if p == "bf16" else torch.float32


def prepare_batch(batch: dict, device: torch.device, codebook, ignore_index: int = -100) -> dict:
    """Worker batch (uint8 pixels) -> model inputs on ``device``; the frozen codebook makes the MIM targets. The
    masked positions are found here, on the host copies (``masked_positions``), so that the step needs no host
    sync; pinned, so that their copy does not wait for the device either."""
    out = {}
    nb = device.type == "cuda"

    def host_positions(mask: Tensor) -> Tensor:
        idx = masked_positions(mask.cpu())
        return (idx.pin_memory() if nb else idx).to(device, non_blocking=nb)

    if "patch_mask" in batch:
        out["mim_positions"] = host_positions(batch["patch_mask"].bool())
    if "mlm_labels" in batch:
        out["mlm_positions"] = host_positions(batch["mlm_labels"].ne(ignore_index))
    if "pixels" in batch:
        out["pixel_values"] = normalize_images(batch["pixels"].to(device, non_blocking=nb))
        cb_pixels = map_pixels(batch["codebook_pixels"].to(device, non_blocking=nb).float() / 255.0)
        out["image_token_ids"] = codebook(cb_pixels)
        out["patch_mask"] = batch["patch_mask"].to(device, non_blocking=nb)
    for k in ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels", "itm_labels"):
        if k in batch:
            out[k] = batch[k].to(device, non_blocking=nb)
    return out


def micro_batches(loader, kind: str, n: int, device, codebook, text_lengths: list[int], ignore_index: int = -100):
    """The step's ``n`` micro-batches, prepared one at a time; records each one's text length (for FLOPs)."""
    for _ in range(n):
        inputs = prepare_batch(loader.next(kind), device, codebook, ignore_index)
        ids = inputs.get("input_ids", inputs.get("input_ids_masked"))
        text_lengths.append(0 if ids is None else int(ids.shape[1]))
        yield inputs


# ------------------------------------------------------------------------------------------------------------------
# one optimizer step's forward and backward
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ContrastiveCache:
    """The contrastive loss of a whole global batch and its gradient w.r.t. each micro-batch's embeddings."""

    loss: Tensor  # weighted, detached
    image_grads: list[Tensor]
    text_grads: list[Tensor]
    scale_grad: Tensor

    def surrogate(self, out: FlavaPretrainingOutput, micro: int) -> Tensor:
        """A term whose gradient w.r.t. the model equals the cached loss's for this micro-batch: the embeddings
        dotted with their cached gradients (and the temperature's, counted once per step)."""
        term = (out.image_embedding.float() * self.image_grads[micro]).sum()
        term = term + (out.text_embedding.float() * self.text_grads[micro]).sum()
        if micro == 0:
            term = term + (out.logit_scale.float() * self.scale_grad).sum()
        return term


def cache_contrastive(model: FlavaForPretraining, batches, autocast) -> tuple[ContrastiveCache, list[dict]]:
    """Gradient caching (Gao et al. 2021): embed every micro-batch without a graph, compute the contrastive loss
    over all of them (gathered over ranks), and keep its gradient w.r.t. each embedding. Each micro-batch is
    embedded as it arrives (the device works while the loader prepares the next); returns the cache and the
    micro-batches, for the second pass."""
    cfg = model.config
    kept, outs = [], []
    for inputs in batches:
        kept.append(inputs)
        with torch.no_grad(), autocast:
            outs.append(model(**inputs, embeddings_only=True))
    batches = kept
    images = torch.cat([o.image_embedding.float() for o in outs]).requires_grad_()
    texts = torch.cat([o.text_embedding.float() for o in outs]).requires_grad_()
    scale = outs[0].logit_scale.detach().float().clone().requires_grad_()
    itm = [b.get("itm_labels") for b in batches]
    pos = None if any(x is None for x in itm) else positive_pair_mask(torch.cat(itm), len(images), images.device)
    loss, _, _ = global_contrastive_loss(
        images, texts, scale, pos, global_backprop=cfg.global_backprop_contrastive,
        exclude_negative_texts=cfg.contrastive_exclude_itm_negatives,
    )
    loss = loss * cfg.loss_weights.global_contrastive
    loss.backward()
    sizes = [len(o.image_embedding) for o in outs]
    cache = ContrastiveCache(loss.detach(), images.grad.split(sizes), texts.grad.split(sizes), scale.grad)
    return cache, batches


def forward_backward(model, batches, accum: int, autocast, sync: bool, cached: bool,
                     reshard: bool = True) -> dict[str, Tensor]:
    """Forward and backward of the ``accum`` micro-batches of one step; returns the step's (detached) losses.

    The gradient is that of the mean loss over the micro-batches. With ``cached`` (pair steps) the contrastive
    loss is instead one loss over the whole global batch (``cache_contrastive``) and each micro-batch backpropagates
    its share of it through the cached embedding gradients. ``sync``: FSDP reduce-scatters only on the last one;
    with ``reshard=False`` it also keeps the gathered weights until the last one (``run.reshard_after_forward``).
    """
    cache = None
    if cached:
        cache, batches = cache_contrastive(model, batches, autocast)
    losses: dict[str, Tensor] = {}
    for micro, inputs in enumerate(batches):
        if sync:
            model.set_requires_gradient_sync(micro == accum - 1)
            if not reshard:
                model.set_reshard_after_backward(micro == accum - 1)
        with autocast:
            out = model(**inputs, global_contrastive=cache is None)
        loss = out.loss / accum if out.loss is not None else 0.0
        if cache is not None:
            loss = loss + cache.surrogate(out, micro)
        loss.backward()
        for name, v in (("loss", out.loss), *out.losses.as_dict().items()):
            if v is not None:
                losses[name] = losses.get(name, 0.0) + v.detach().float() / accum
    if cache is not None:
        losses["global_contrastive"] = cache.loss.float()
        losses["loss"] = losses.get("loss", 0.0) + cache.loss.float()
    return losses


class GradientCheckError(RuntimeError):
    """A parameter the step's losses depend on received no gradient (e.g. FSDP2 hooks that never fired)."""


def check_gradients(model: FlavaForPretraining, kind: str, step: int) -> None:
    """After the first backward of each batch kind: every parameter that kind must train has a gradient. FSDP2
    before torch 2.13 did not see tensors inside unregistered dataclass outputs, and the parameters behind them
    then silently got none; this turns any such gap (an output detached, a hook lost) into an error at once.
    Only ``.grad is None`` is read: no device synchronisation."""
    expected = model.gradient_parameters(kind)
    missing = sorted(n for n, p in model.named_parameters() if n in expected and p.grad is None)
    if missing:
        more = f" and {len(missing) - 12} more" if len(missing) > 12 else ""
        raise GradientCheckError(
            f"step {step} ({kind}): {len(missing)} of {len(expected)} trainable parameters received no gradient: "
            f"{', '.join(missing[:12])}{more}. Their outputs do not reach the loss through autograd (under FSDP2 "
            "a module output FSDP cannot see into: register it with torch.utils._pytree, see flava.model)"
        )


# ------------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------------
def _check_resume(meta: dict, mcfg: FlavaConfig, cfg: RunConfig, info: DistInfo, ckpt: Path) -> None:
    saved = meta.get("model_config")
    if saved != json.loads(json.dumps(mcfg.to_dict())):
        diff = sorted(_diff_keys(saved or {}, mcfg.to_dict()))
        raise ckpt_mod.CheckpointError(
            f"{ckpt} was written with another model config (differs in {diff[:8]}): use a new --out or the "
            "original config"
        )
    for key in ("world_size", "num_workers"):
        if not isinstance(meta.get(key), int) or meta[key] < 1:
            raise ckpt_mod.CheckpointError(f"{ckpt}: meta.json has no valid {key} ({meta.get(key)!r})")


def resume_rank_state(ckpt: Path, meta: dict, info: DistInfo, num_workers: int) -> tuple[dict, dict]:
    """This rank's RNG and loader state from a checkpoint. Written by as many processes and workers as this run: its
    own. Otherwise the loader state is resharded (``flava.data.reshard_loader_states``: the interrupted pass is
    finished with nothing repeated or skipped) and rank r takes the RNG state of old rank ``r % old_world``."""
    old_world, old_workers = meta["world_size"], meta["num_workers"]
    if old_world == info.world_size and old_workers == num_workers:
        state = ckpt_mod.read_rank_state(ckpt, info.rank)
        return state["rng"], state["loader"]
    states = ckpt_mod.read_rank_states(ckpt)
    loader, summary = reshard_loader_states([s["loader"] for s in states], info.rank, info.world_size, num_workers)
    if info.is_main:
        log.warning(
            "%s was written by %d process(es) x %d worker(s), this run has %d x %d: model and optimizer are resharded "
            "by DCP; the data streams are re-dealt: every stream of the checkpoint is finished (in its old order) "
            "to the end of the pass it had reached, then the new partition starts the next pass, so no row is "
            "repeated or skipped; the micro-batch order differs from an uninterrupted run where streams do not "
            "map one to one. Per kind: %s",
            ckpt, old_world, old_workers, info.world_size, num_workers, summary,
        )
    return states[info.rank % old_world]["rng"], loader


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def apply_determinism(deterministic: bool) -> None:
    """``run.deterministic``: deterministic kernels everywhere (before CUDA creates its cuBLAS handles, which read
    CUBLAS_WORKSPACE_CONFIG once)."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def train(cfg: RunConfig, run_dir: str | os.PathLike) -> dict:
    """Train until ``cfg.run.steps`` (resuming from the latest checkpoint in ``run_dir``). Returns a summary."""
    run_dir = Path(run_dir)
    apply_determinism(cfg.run.deterministic)
    info = setup_distributed(cfg.run.device, cfg.run.dist_timeout_minutes)
    check = device_check([info.host_group]) if cfg.run.check_devices else contextlib.nullcontext()
    try:
        with check:
            return _train(cfg, run_dir, info)
    finally:
        teardown(info)


def _train(cfg: RunConfig, run_dir: Path, info: DistInfo) -> dict:
    # -- everything that can be wrong is checked before the first step ------------------------------------------
    cfg.validate(info.world_size)
    cfg.validate_sources()
    accum = cfg.accumulation(info.world_size)
    sources = {kind: Source(kind, cfg.source_paths(kind), cfg.data.split) for kind in cfg.data.active_kinds()}
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run_config.yaml").write_text(cfg.to_yaml())
    barrier(info)
    require_shared(run_dir / "run_config.yaml", info, "the run directory (--out)")
    tokenizer = prepare_tokenizer(cfg, run_dir, info)
    mcfg, pretrained = build_model_config(cfg, tokenizer)
    latest = ckpt_mod.latest_checkpoint(run_dir)
    if latest is not None:
        _check_resume(ckpt_mod.read_meta(latest), mcfg, cfg, info, latest)

    # -- model, codebook, optimizer --------------------------------------------------------------------------------
    device = info.device
    dtype = compute_dtype(cfg, device)
    torch.manual_seed(cfg.run.seed)  # identical init on every rank (FSDP2 shards the full init)
    model = pretrained if pretrained is not None else FlavaForPretraining(mcfg)
    if latest is None and pretrained is None:
        load_encoder_init(model, cfg)  # the paper's unimodal initialisation, when the config names one
    model.set_gradient_checkpointing(bool(cfg.run.activation_checkpointing))
    model.to(device).train()
    codebook = build_codebook(cfg, mcfg, device)
    if cfg.run.compile:
        compile_layers(model)
    if info.distributed:
        shard_model(model, dtype, cfg.run.reshard_after_forward)
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if (dtype != torch.float32 and not info.distributed)
        else contextlib.nullcontext()
    )
    sync = info.distributed and accum > 1  # reduce-scatter gradients only on the last micro-batch
    # one global batch per contrastive softmax; with a single micro-batch per rank that is already the case
    gradient_cache = cfg.run.contrastive_gradient_cache and accum > 1 and mcfg.loss_weights.global_contrastive > 0
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    ckpt_mod.init_optimizer_state(optimizer)

    step, loader_state = 0, None
    if latest is not None:
        meta = ckpt_mod.load_checkpoint(latest, model, optimizer)
        step = int(meta["step"])
        scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        rng, loader_state = resume_rank_state(latest, meta, info, max(1, cfg.data.num_workers))
        ckpt_mod.set_rng_state(rng)
        log.info("resumed from %s at step %d", latest, step)

    specs = build_specs(cfg, mcfg)
    loader = MultiSourceLoader(
        sources, specs, tokenizer, info.rank, info.world_size, cfg.data.num_workers, cfg.data.prefetch_factor,
        loader_state,
    )
    metrics = MetricsWriter(run_dir, info.is_main, cfg.run.tensorboard, step)
    stop_at = cfg.run.steps
    meta_common = {
        "model_config": mcfg.to_dict(), "world_size": info.world_size, "num_workers": max(1, cfg.data.num_workers),
        "tokenizer_vocab_size": len(tokenizer), "run_config": cfg.to_dict(),
    }

    stop_requested = {"flag": False}

    def _on_signal(signum, frame):  # checkpoint at the end of the current step, then exit
        stop_requested["flag"] = True

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    pending: list[ckpt_mod.PendingSave] = []  # run.async_checkpoint: the save still being written

    def finish_saves() -> None:
        while pending:
            pending.pop().wait()

    def save(at: int) -> None:
        finish_saves()  # one save in flight at a time: its host copy of the state is the memory cost
        meta = {**meta_common, "step": at, "scheduler": _jsonable(scheduler.state_dict())}
        rank_state = {"rng": ckpt_mod.rng_state(), "loader": loader.state_dict()}
        res = ckpt_mod.save_checkpoint(run_dir, at, model, optimizer, meta, rank_state, keep=cfg.run.keep_checkpoints,
                                       async_save=cfg.run.async_checkpoint, process_group=info.host_group)
        if cfg.run.async_checkpoint:
            pending.append(res)

    progress = None
    if info.is_main and cfg.run.progress:
        from tqdm import tqdm

        progress = tqdm(total=stop_at, initial=step, desc="flava train", unit="step", dynamic_ncols=True)

    summary = {"start_step": step, "steps": 0}
    throughput = Throughput(device, info.world_size)
    sums: dict[str, torch.Tensor] = {}
    last_saved = step
    grads_checked: set[str] = set()
    try:
        while step < stop_at:
            kind = kind_for_step(cfg.run.seed, step, cfg.data.ratios)
            text_lengths: list[int] = []
            batches = micro_batches(loader, kind, accum, device, codebook, text_lengths, mcfg.ce_ignore_index)
            cached = gradient_cache and kind == "pairs"
            step_losses = forward_backward(model, batches, accum, autocast, sync, cached,
                                           reshard=cfg.run.reshard_after_forward)
            if kind not in grads_checked:
                check_gradients(model, kind, step + 1)
                grads_checked.add(kind)
            grad_norm = None
            if cfg.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            model.clamp_logit_scale_()
            step += 1
            summary["steps"] += 1
            per_micro = cfg.run.global_batch_size / accum  # FLOPs at this rank's (padded-to-longest) text length
            throughput.add(cfg.run.global_batch_size, sum(per_micro * flops_per_sample(mcfg, kind, n)
                                                          for n in text_lengths))
            sums = step_losses  # the logged values are those of the logged step (not averaged over log_every)
            stop_requested["flag"] = any_rank(stop_requested["flag"], info)
            last = step == stop_at or stop_requested["flag"]
            if step % cfg.run.log_every == 0 or last:
                rec = {**log_record(step, kind, sums, lr, grad_norm, info, device), **throughput.record()}
                bad = loader.bad_rows()
                if bad:
                    rec["bad_rows"] = bad
                metrics.write(rec)
                if progress is not None:
                    progress.set_postfix(loss=f"{rec['loss']:.4f}", kind=kind, refresh=False)
                throughput.restart()
                summary["last"] = rec
            if progress is not None:
                progress.update(1)
            if step % cfg.run.checkpoint_every == 0 or last:
                save(step)
                last_saved = step
            if stop_requested["flag"]:
                log.warning("stop requested: checkpoint written at step %d", step)
                break
        if last_saved != step:
            save(step)
        finish_saves()
        if cfg.run.export_final and step >= stop_at:
            export_final(model, mcfg, run_dir, info)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if progress is not None:
            progress.close()
        metrics.close()
        loader.close()
    summary["step"] = step
    return summary


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if _is_plain(v)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _is_plain(v) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(_is_plain(x) for x in v.values())
    return False
