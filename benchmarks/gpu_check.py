"""The GPU check's Python entry (benchmarks/gpu_check.sh runs it): the multi-GPU path of `flava train` on ONE GPU.

A one-process NCCL group (plus the gloo host group), FSDP2 over the whole model as `flava train` shards it on N
GPUs, bf16, each step kind (pairs with gradient caching, images, text) for a few measured steps with the trainer's
own step functions and loader, FLOPs counted by torch.utils.flop_counter on the real step, a sharded DCP save
(sync and async) and load, and a resume that must reproduce the step after the checkpoint. Writes ONE JSON.

    python3 benchmarks/gpu_check.py --out DIR                      # GPU: flava_full, bf16
    python3 benchmarks/gpu_check.py --dry-run --out DIR            # CPU: tiny, gloo, fp32; every part but the GPU

The dry run also checks every collective's tensors against its group's device (``flava.devcheck``), which NCCL
would enforce and gloo does not.

Per kind: ``samples_per_s`` (median of the measured steps), ``step_s``, ``loader_wait_share`` (median share of a
step spent waiting for the loader), ``peak_mem_gib``, FLOPs per step (``model_flops``: the model's forward and
backward; ``codebook_flops``; ``recompute_flops``: what activation checkpointing adds), ``mfu`` (model FLOPs over
the device's bf16 peak) and ``hfu`` (all counted FLOPs). ``checkpoint``: save/load times, the async save's
blocking time and the step time while it is written, and the resume checks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from flava import checkpoint as ckpt_mod  # noqa: E402
from flava.devcheck import device_check  # noqa: E402
from flava.data import MultiSourceLoader, Source, build_specs, iter_texts  # noqa: E402
from flava.distributed import DistInfo, shard_model  # noqa: E402
from flava.metrics import peak_flops  # noqa: E402
from flava.model import FlavaForPretraining  # noqa: E402
from flava.optim import build_optimizer, build_scheduler  # noqa: E402
from flava.run_config import load_run_config  # noqa: E402
from flava.tokenizer import load_tokenizer, train_wordpiece  # noqa: E402
from flava.train import (  # noqa: E402
    build_codebook, build_model_config, check_gradients, compile_layers, compute_dtype, forward_backward,
    micro_batches,
)

KINDS = ("pairs", "images", "text")
RESULT_KEYS = ("device", "torch", "python", "config", "process_group", "kinds", "checkpoint", "wall_s")
KIND_KEYS = ("samples_per_s", "step_s", "loader_wait_share", "peak_mem_gib", "model_flops", "codebook_flops",
             "recompute_flops", "mfu", "hfu")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="work directory: data, tokenizer, checkpoints, gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny, gloo: every part but the GPU one")
    ap.add_argument("--config", default=None, help="flava_full (GPU default) or tiny (dry-run default)")
    ap.add_argument("--micro", type=int, default=None, help="micro-batch (GPU 64, dry-run 4)")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per step (2: gradient caching runs)")
    ap.add_argument("--warmup", type=int, default=None, help="unmeasured steps per kind (GPU 3, dry-run 1)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per kind (GPU 6, dry-run 2)")
    ap.add_argument("--rows", type=int, default=None, help="generated pair rows (GPU 1536, dry-run 48)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers per kind (GPU 4, dry-run 0)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak (default: flava.metrics' table; dry-run 1, nominal)")
    ap.add_argument("overrides", nargs="*", help="run config key=value (run.activation_checkpointing=false, ...)")
    return ap.parse_args(argv)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedLoader:
    """The loader with the time each ``next`` waited (a batch not ready yet is the device idling)."""

    def __init__(self, loader: MultiSourceLoader) -> None:
        self.loader, self.wait = loader, 0.0

    def next(self, kind: str) -> dict:
        t = time.perf_counter()
        batch = self.loader.next(kind)
        self.wait += time.perf_counter() - t
        return batch


class CountedCodebook:
    """The codebook, its FLOPs counted apart while ``counting`` (it is not model compute)."""

    def __init__(self, codebook) -> None:
        self.codebook, self.counting, self.flops = codebook, False, 0

    def __call__(self, x):
        if not self.counting:
            return self.codebook(x)
        with FlopCounterMode(display=False) as fc:
            out = self.codebook(x)
        self.flops += fc.get_total_flops()
        return out


class Harness:
    def __init__(self, args) -> None:
        self.args, self.dry = args, args.dry_run
        self.device = torch.device("cpu") if self.dry else torch.device("cuda", 0)
        name = args.config or ("tiny" if self.dry else "flava_full")
        micro = args.micro or (4 if self.dry else 64)
        base = [f"run.micro_batch_size={micro}", f"run.global_batch_size={micro * args.accum}",
                "run.contrastive_gradient_cache=true", "run.progress=false", "run.tensorboard=false",
                f"run.precision={'fp32' if self.dry else 'bf16'}", f"run.device={self.device.type}",
                "model.codebook=random", "model.allow_random_codebook=true",
                f"data.num_workers={args.workers if args.workers is not None else (0 if self.dry else 4)}"]
        if name == "flava_full":  # a vocabulary of BERT's size trained on the captions, nothing downloaded
            base += ["data.tokenizer_vocab_size=30522", "model.text_vocab_from_tokenizer=false"]
        else:
            base += ["data.tokenizer_vocab_size=200"]
        self.cfg = load_run_config(name, [*base, *args.overrides])
        self.config_name = name
        self.out = Path(args.out)

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from tests.flava.shards import make_build
        from tests.ports import free_port

        backend = "gloo" if self.dry else "nccl"
        kw = {} if self.dry else {"device_id": self.device}
        if not self.dry:
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=5), **kw)
        self.backend = backend
        host = dist.new_group(backend="gloo")
        self.info = DistInfo(0, 1, 0, self.device, host)
        cfg = self.cfg
        rows = self.args.rows or (48 if self.dry else 1536)
        size = 32 if self.config_name == "tiny" else 256
        data = self.out / "data"
        if not (data / "manifest.json").is_file():
            make_build(data, n=rows, seed=0, size=size, shards=2, row_group_size=min(256, max(8, rows // 8)))
        cfg.data.pairs = [str(data)]
        tok_dir = self.out / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            train_wordpiece(iter_texts([str(data)]), tok_dir, vocab_size=cfg.data.tokenizer_vocab_size)
        self.tokenizer = load_tokenizer(tok_dir)
        self.mcfg, _ = build_model_config(cfg, self.tokenizer)
        self.dtype = compute_dtype(cfg, self.device)
        self.codebook = CountedCodebook(build_codebook(cfg, self.mcfg, self.device))
        self.model, self.optimizer, self.scheduler = self.new_model()
        sources = {k: Source(k, cfg.source_paths(k), cfg.data.split) for k in KINDS}
        specs = build_specs(cfg, self.mcfg)
        self.loader = TimedLoader(MultiSourceLoader(sources, specs, self.tokenizer, 0, 1, cfg.data.num_workers,
                                                    cfg.data.prefetch_factor))
        self.accum = cfg.accumulation(1)

    def new_model(self):
        torch.manual_seed(self.cfg.run.seed)
        model = FlavaForPretraining(self.mcfg)
        model.set_gradient_checkpointing(bool(self.cfg.run.activation_checkpointing))
        model.to(self.device).train()
        if self.cfg.run.compile:
            compile_layers(model)
        shard_model(model, self.dtype, self.cfg.run.reshard_after_forward)  # FSDP2 on a 1-process group
        optimizer = build_optimizer(model, self.cfg.optim)
        ckpt_mod.init_optimizer_state(optimizer)
        return model, optimizer, build_scheduler(optimizer, self.cfg.optim)

    # -- one step, as flava.train._train runs it ---------------------------------------------------------------
    def batches(self, kind: str) -> list[dict]:
        return list(micro_batches(self.loader, kind, self.accum, self.device, self.codebook, [],
                                  self.mcfg.ce_ignore_index))

    def step(self, kind: str, batches=None, model=None, optimizer=None, scheduler=None) -> dict:
        model, optimizer = model or self.model, optimizer or self.optimizer
        scheduler = scheduler or self.scheduler
        if batches is None:
            batches = micro_batches(self.loader, kind, self.accum, self.device, self.codebook, [],
                                    self.mcfg.ce_ignore_index)
        losses = forward_backward(model, batches, self.accum, contextlib.nullcontext(), sync=self.accum > 1,
                                  cached=kind == "pairs", reshard=self.cfg.run.reshard_after_forward)
        check_gradients(model, kind, 1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        return losses

    def count_flops(self, kind: str, checkpointing: bool) -> tuple[int, int]:
        """(all FLOPs of one real step, the codebook's part of them)."""
        self.model.set_gradient_checkpointing(checkpointing)
        self.codebook.counting, self.codebook.flops = True, 0
        try:
            with FlopCounterMode(display=False) as fc:
                self.step(kind)
                _sync(self.device)
        finally:
            self.codebook.counting = False
            self.model.set_gradient_checkpointing(bool(self.cfg.run.activation_checkpointing))
        return fc.get_total_flops(), self.codebook.flops

    # -- the phases --------------------------------------------------------------------------------------------
    def measure_kind(self, kind: str, peak: float | None) -> dict:
        args = self.args
        warm = args.warmup if args.warmup is not None else (1 if self.dry else 3)
        steps = args.steps if args.steps is not None else (2 if self.dry else 6)
        for _ in range(warm):
            self.step(kind)
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times, waits = [], []
        for _ in range(steps):
            self.loader.wait = 0.0
            t = time.perf_counter()
            self.step(kind)
            _sync(self.device)
            dt = time.perf_counter() - t
            times.append(dt)
            waits.append(self.loader.wait / dt)
        peak_mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        ckpt = bool(self.cfg.run.activation_checkpointing)
        hw, cb = self.count_flops(kind, ckpt)
        plain, _ = self.count_flops(kind, False) if ckpt else (hw, cb)
        step_s = statistics.median(times)
        model_flops = plain - cb
        rec = {
            "samples_per_s": self.cfg.run.global_batch_size / step_s, "step_s": step_s,
            "loader_wait_share": statistics.median(waits), "peak_mem_gib": peak_mem,
            "model_flops": model_flops, "codebook_flops": cb, "recompute_flops": hw - plain,
            "mfu": model_flops / step_s / peak if peak else None, "hfu": hw / step_s / peak if peak else None,
            "steps": steps, "step_s_all": times,
        }
        return rec

    def checkpoint_phase(self) -> dict:
        run_dir = self.out / "run"
        meta = {"step": 1, "model_config": self.mcfg.to_dict()}
        _sync(self.device)
        t = time.perf_counter()
        sync_ckpt = ckpt_mod.save_checkpoint(run_dir, 1, self.model, self.optimizer, meta, {"rng": {}})
        save_s = time.perf_counter() - t
        after_sync = self.batches("pairs")
        loss_a = self.step("pairs", batches=after_sync)["loss"].item()
        # async: the save's blocking part (the copy to host memory), then a step while it is written
        _sync(self.device)
        t = time.perf_counter()
        pending = ckpt_mod.save_checkpoint(run_dir, 2, self.model, self.optimizer, {**meta, "step": 2},
                                           {"rng": {}}, async_save=True, process_group=self.info.host_group)
        async_block_s = time.perf_counter() - t
        after_async = self.batches("pairs")
        t = time.perf_counter()
        loss_b = self.step("pairs", batches=after_async)["loss"].item()
        _sync(self.device)
        step_during_save_s = time.perf_counter() - t
        async_ckpt = pending.wait()
        async_total_s = time.perf_counter() - t + async_block_s
        # resume: a fresh FSDP2 model loads each checkpoint (resharded by DCP) and takes the same next step
        out = {"save_s": save_s, "async_block_s": async_block_s, "async_total_s": async_total_s,
               "step_during_async_save_s": step_during_save_s,
               "size_gib": sum(f.stat().st_size for f in sync_ckpt.rglob("*") if f.is_file()) / 2**30}
        for name, ckpt, batches, ref in (("sync", sync_ckpt, after_sync, loss_a),
                                         ("async", async_ckpt, after_async, loss_b)):
            model, optimizer, scheduler = self.new_model()
            _sync(self.device)
            t = time.perf_counter()
            ckpt_mod.load_checkpoint(ckpt, model, optimizer)
            _sync(self.device)
            out[f"load_{name}_s"] = time.perf_counter() - t
            got = self.step("pairs", batches=batches, model=model, optimizer=optimizer, scheduler=scheduler)
            out[f"resume_{name}_loss_diff"] = abs(got["loss"].item() - ref)
            del model, optimizer
        return out

    def close(self) -> None:
        self.loader.loader.close()
        dist.destroy_process_group()


def run(args) -> dict:
    t0 = time.perf_counter()
    h = Harness(args)
    h.out.mkdir(parents=True, exist_ok=True)
    h.setup()
    # dry run: the collectives' tensors are checked against their group's device as NCCL would (flava.devcheck)
    check = device_check([h.info.host_group]) if h.dry else contextlib.nullcontext()
    try:
        with check:
            if args.peak_tflops is not None:
                peak = args.peak_tflops * 1e12
            else:
                peak = 1e12 if h.dry else peak_flops(h.device)  # dry-run: nominal, so the figures' path runs
            kinds = {kind: h.measure_kind(kind, peak) for kind in KINDS}
            ckpt = h.checkpoint_phase()
    finally:
        h.close()
    dev = "cpu (dry run)" if h.dry else torch.cuda.get_device_name(h.device)
    return {
        "device": dev, "torch": torch.__version__, "python": platform.python_version(),
        "config": {"name": h.config_name, "micro_batch": h.cfg.run.micro_batch_size, "accum": h.accum,
                   "dtype": str(h.dtype).removeprefix("torch."), "peak_flops": peak,
                   "activation_checkpointing": bool(h.cfg.run.activation_checkpointing),
                   "reshard_after_forward": h.cfg.run.reshard_after_forward, "compile": h.cfg.run.compile,
                   "codebook_dtype": h.cfg.model.codebook_dtype, "loader_workers": h.cfg.data.num_workers,
                   "prefetch_window": h.cfg.data.prefetch_window, "collective_device_check": h.dry,
                   "overrides": args.overrides},
        "process_group": f"{h.backend}, 1 process, FSDP2 (fully_shard per layer, encoder, head and root)",
        "kinds": kinds, "checkpoint": ckpt, "wall_s": time.perf_counter() - t0,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 1
    res = run(args)
    path = Path(args.out) / "gpu_check.json"
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
