"""CPU cost of the trainer's speed/memory choices, in alternating A/B rounds (medians and ratios; the machine is
noisy). GPU figures come from benchmarks/gpu_check.sh; these say what each choice does where no GPU is lent.

    python benchmarks/bench_config_choices.py --rounds 3 [--only codebook,checkpointing,async,prefetch,compile]

* codebook: DALL-E-sized dVAE (112 px input, random weights) fp32 vs bf16: time per image, token-id agreement;
* checkpointing: a step of a mid-size FLAVA (hidden 256, 4+4+2 layers, 64 px) with activation checkpointing off/on:
  time, counted FLOPs (recompute), activations saved for backward without it (saved_tensors_hooks);
* async: DCP save of that model + AdamW state, sync vs async: how long the step is held;
* prefetch: a loader stream (64 px JPEG pairs, decode and masking included) without and with window prefetch, on
  local disk: time per batch;
* compile: the mid-size image step eager vs run.compile (inductor), after compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from flava import checkpoint as ckpt_mod  # noqa: E402
from flava.codebook import map_pixels, random_codebook  # noqa: E402
from flava.config import CodebookConfig, FlavaConfig, tiny  # noqa: E402
from flava.model import FlavaForPretraining  # noqa: E402
from flava.optim import build_optimizer  # noqa: E402
from flava.run_config import OptimSection  # noqa: E402
from flava.train import compile_layers  # noqa: E402
from tests.flava.conftest import make_batch  # noqa: E402


def _alternate(rounds: int, sides: dict) -> dict:
    """Run every side once per round, in turn; the median of each side's seconds."""
    times = {k: [] for k in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _mid_config() -> FlavaConfig:
    cfg = tiny()
    for enc, layers in ((cfg.image, 4), (cfg.text, 4), (cfg.multimodal, 2)):
        enc.hidden_size, enc.num_layers, enc.num_heads, enc.mlp_dim = 256, layers, 4, 1024
    cfg.image.image_size, cfg.image.patch_size = 64, 8
    cfg.codebook.image_size = 64
    cfg.projection_dim = 256
    return cfg


def bench_codebook(rounds: int) -> dict:
    cfg, n = CodebookConfig(), 4
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, cfg.image_size // 8, cfg.image_size // 8, generator=g)
    x = F.interpolate(low, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False)
    x = map_pixels((x + 0.05 * torch.rand(x.shape, generator=g)).clamp(0, 1))
    fp32, bf16 = random_codebook(cfg, seed=0), random_codebook(cfg, seed=0).to(dtype=torch.bfloat16)
    agree = (fp32(x) == bf16(x)).float().mean().item()
    t = _alternate(rounds, {"fp32": lambda: fp32(x), "bf16": lambda: bf16(x)})
    return {"images": n, "image_px": cfg.image_size, "fp32_s_per_image": t["fp32"] / n,
            "bf16_s_per_image": t["bf16"] / n, "bf16_over_fp32_time": t["bf16"] / t["fp32"],
            "token_agreement": agree}


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs its forward (activation memory)."""
    total = {"n": 0}

    def pack(t):
        total["n"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total["n"]


def bench_checkpointing(rounds: int) -> dict:
    torch.manual_seed(0)
    model = FlavaForPretraining(_mid_config()).train()
    batch = make_batch(model.config, batch=8, length=32, seed=1)

    def step(on: bool):
        model.set_gradient_checkpointing(on)
        out = model(**batch)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    flops = {}
    for on in (False, True):
        model.set_gradient_checkpointing(on)
        with FlopCounterMode(display=False) as fc:
            step(on)
        flops[on] = fc.get_total_flops()
    # with checkpointing on, the checkpoint's own hooks hold the layers' inputs out of sight of these hooks: only
    # the "off" figure is a measurement (what checkpointing can save at most)
    model.set_gradient_checkpointing(False)
    holder = {}
    saved = _saved_bytes(lambda: holder.setdefault("out", model(**batch)))
    holder["out"].loss.backward()
    model.zero_grad(set_to_none=True)
    t = _alternate(rounds, {"off": lambda: step(False), "on": lambda: step(True)})
    return {"batch": 8, "step_s_off": t["off"], "step_s_on": t["on"], "on_over_off_time": t["on"] / t["off"],
            "flops_off": flops[False], "recompute_flops": flops[True] - flops[False],
            "saved_activation_mib_off": saved / 2**20}


def bench_async(rounds: int) -> dict:
    torch.manual_seed(0)
    model = FlavaForPretraining(_mid_config()).train()
    opt = build_optimizer(model, OptimSection())
    ckpt_mod.init_optimizer_state(opt)
    size = sum(p.numel() * 4 * 3 for p in model.parameters()) / 2**20
    with tempfile.TemporaryDirectory() as d:
        step = {"n": 0}
        held = {"sync": [], "async": [], "async_total": []}
        for _ in range(rounds):
            for mode in ("sync", "async"):
                step["n"] += 1
                t = time.perf_counter()
                res = ckpt_mod.save_checkpoint(Path(d) / mode, step["n"], model, opt, {"step": 1}, {},
                                               async_save=mode == "async")
                held[mode].append(time.perf_counter() - t)
                if mode == "async":
                    res.wait()
                    held["async_total"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in held.items()}
    return {"state_mib": size, "sync_save_s": med["sync"], "async_blocking_s": med["async"],
            "async_total_s": med["async_total"], "async_over_sync_blocking": med["async"] / med["sync"]}


def bench_prefetch(rounds: int) -> dict:
    from flava.data import DataSpec, Source, StreamingDataset, iter_texts
    from flava.tokenizer import train_wordpiece
    from tests.flava.shards import make_build

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        build = make_build(d / "b", n=1200, seed=0, size=96, shards=2, row_group_size=100)
        tok = train_wordpiece(iter_texts([str(build)]), d / "tok", vocab_size=300)
        n_batches = 60

        def stream(prefetch: bool):
            spec = DataSpec(kind="pairs", batch_size=16, image_size=64, codebook_size=64, grid_size=8,
                            text_max_length=32, seed=1, shuffle_buffer=400, prefetch_window=prefetch)
            it = iter(StreamingDataset(Source("pairs", [str(build)]), spec, tok, 0, 1, 0))
            for _ in range(n_batches):
                next(it)
            it.close()

        t = _alternate(rounds, {"off": lambda: stream(False), "on": lambda: stream(True)})
    return {"batches": n_batches, "off_s_per_batch": t["off"] / n_batches, "on_s_per_batch": t["on"] / n_batches,
            "on_over_off_time": t["on"] / t["off"]}


def bench_compile(rounds: int) -> dict:
    torch.manual_seed(0)
    eager = FlavaForPretraining(_mid_config()).train()
    compiled = FlavaForPretraining(_mid_config()).train()
    compiled.load_state_dict(eager.state_dict())
    compile_layers(compiled)
    b = make_batch(eager.config, batch=8, seed=1)
    batch = {k: b[k] for k in ("pixel_values", "patch_mask", "image_token_ids")}

    def step(m):
        m(**batch).loss.backward()
        m.zero_grad(set_to_none=True)

    t = time.perf_counter()
    step(compiled)
    first = time.perf_counter() - t
    t = _alternate(rounds, {"eager": lambda: step(eager), "compiled": lambda: step(compiled)})
    return {"first_compiled_step_s": first, "eager_s": t["eager"], "compiled_s": t["compiled"],
            "compiled_over_eager_time": t["compiled"] / t["eager"]}


BENCHES = {"codebook": bench_codebook, "checkpointing": bench_checkpointing, "async": bench_async,
           "prefetch": bench_prefetch, "compile": bench_compile}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(BENCHES))
    args = ap.parse_args()
    for name in args.only.split(","):
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            res = BENCHES[name](args.rounds)
        print(json.dumps({"bench": name, "torch": torch.__version__, "threads": torch.get_num_threads(), **res}),
              flush=True)


if __name__ == "__main__":
    main()
