"""Forward+backward of a FLAVA pretraining step: ours (flava.model) vs transformers' FlavaForPreTraining.

Same config, same weights (ours is converted from the transformers model), same pair batch (image + text with
padding, masked patches and tokens, codebook targets, ITM labels with 10% negatives) -> losses GC, ITM, MMM-image,
MMM-text. The two models are timed interleaved (one step each, alternating) in one process so that machine noise hits
both alike; each is additionally run alone in a fresh subprocess to measure its peak memory.

    python benchmarks/bench_model.py --config tiny --batch 8 --iters 20
    python benchmarks/bench_model.py --config flava_full --batch 2 --iters 4
    python benchmarks/bench_model.py --config flava_full --device cuda --dtype bf16 --batch 32 --which ours

The codebook is not part of the timed step (targets are given as ids, as in our trainer where the frozen dVAE runs
outside the model); neither is the optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from flava.config import FlavaConfig
from flava.convert import config_to_transformers, from_transformers

PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def make_batch(cfg: FlavaConfig, batch: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ic, P = cfg.image, cfg.image.num_patches
    pixel_values = torch.randn(batch, ic.num_channels, ic.image_size, ic.image_size, generator=g)
    input_ids = torch.randint(min(1000, cfg.text.vocab_size // 2), cfg.text.vocab_size, (batch, length), generator=g)
    input_ids[:, 0] = 101
    lengths = torch.randint(max(2, length // 3), length + 1, (batch,), generator=g)
    lengths[0] = length
    attention_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    input_ids[attention_mask == 0] = 0
    sel = (torch.rand(batch, length, generator=g) < 0.15) & attention_mask.bool()
    sel[:, 0] = False
    sel[:, 1] = True
    mlm_labels = torch.full((batch, length), -100).masked_scatter(sel, input_ids[sel])
    input_ids_masked = input_ids.masked_fill(sel, 103)
    from flava.masking import BlockMaskGenerator

    grid = ic.grid_size
    gen = BlockMaskGenerator(grid, round(0.38 * P), min_num_patches=min(16, max(1, P // 8)))
    patch_mask = gen.batch(batch, g)
    image_token_ids = torch.randint(0, ic.vocab_size, (batch, P), generator=g)
    itm_labels = torch.ones(batch, dtype=torch.long)
    itm_labels[:: 10] = 0 if batch >= 10 else 1
    if batch >= 2:
        itm_labels[-1] = 0
    return dict(
        pixel_values=pixel_values, input_ids=input_ids, input_ids_masked=input_ids_masked,
        attention_mask=attention_mask, patch_mask=patch_mask, image_token_ids=image_token_ids,
        mlm_labels=mlm_labels, itm_labels=itm_labels,
    )


def hf_inputs(b: dict) -> dict:
    return dict(
        pixel_values=b["pixel_values"], input_ids=b["input_ids"], input_ids_masked=b["input_ids_masked"],
        attention_mask=b["attention_mask"], bool_masked_pos=b["patch_mask"], mim_labels=b["image_token_ids"].clone(),
        mlm_labels=b["mlm_labels"].clone(), itm_labels=b["itm_labels"],
    )


def build(config_name: str, seed: int = 0, which: str = "both"):
    from transformers import FlavaForPreTraining

    cfg = FlavaConfig.preset(config_name)
    torch.manual_seed(seed)
    hf = FlavaForPreTraining(config_to_transformers(cfg)).train()
    ours = from_transformers(hf).train()
    if which == "ours":
        hf = None
    elif which == "hf":
        ours = None
    return cfg, ours, hf


def step_fn(model, kind: str, batch: dict, device: str, dtype: torch.dtype | None):
    inputs = batch if kind == "ours" else None

    def run():
        kw = inputs if kind == "ours" else hf_inputs(batch)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            out = model(**kw)
        loss = out.loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses = out.losses.as_dict() if kind == "ours" else {k: v for k, v in out.loss_info.items() if v is not None}
        return loss.detach(), {k: v.detach() for k, v in losses.items()}

    return run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def count_flops(model, kind, batch, device, dtype) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step_fn(model, kind, batch, device, dtype)()
    return fc.get_total_flops()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_only(args) -> dict:
    """Run in a fresh process: build ONE model, run steps, report peak RSS and the step's increase over the
    resident model (peak reset after building, where the kernel allows it)."""
    cfg = FlavaConfig.preset(args.config)
    torch.manual_seed(0)
    if args.which == "ours":
        from flava.model import FlavaForPretraining

        model = FlavaForPretraining(cfg).train()
    else:
        from transformers import FlavaForPreTraining

        model = FlavaForPreTraining(config_to_transformers(cfg)).train()
    device = args.device
    model.to(device)
    batch = {k: v.to(device) for k, v in make_batch(cfg, args.batch, args.text_len).items()}
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    run = step_fn(model, args.which, batch, device, dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    import gc

    gc.collect()
    reset = _reset_peak_rss()
    base = _status_mib("VmRSS")
    for _ in range(2):
        run()
    sync(device)
    peak = _status_mib("VmHWM") if reset else peak_rss_mib()
    res = {"which": args.which, "rss_model_resident_mib": base, "peak_rss_mib": peak,
           "step_peak_increase_mib": None if base is None or peak is None else peak - base,
           "peak_was_reset_after_build": reset}
    if device == "cuda":
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "flava_full"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=None, help="default: 77 (flava_full), 12 (tiny)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--which", default="both", choices=["both", "ours", "hf"])
    ap.add_argument("--no-memory", action="store_true", help="skip the per-model peak-memory subprocesses")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    if args.text_len is None:
        args.text_len = 12 if args.config == "tiny" else 77
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(memory_only(args)))
        return

    device = args.device
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    t0 = time.perf_counter()
    cfg, ours, hf = build(args.config, which=args.which)
    models = {k: m for k, m in (("ours", ours), ("hf", hf)) if m is not None}
    for m in models.values():
        m.to(device)
    batch = {k: v.to(device) for k, v in make_batch(cfg, args.batch, args.text_len).items()}
    print(f"built in {time.perf_counter() - t0:.1f}s; torch {torch.__version__}, threads {torch.get_num_threads()}")
    runs = {k: step_fn(m, k, batch, device, dtype) for k, m in models.items()}

    results = {}
    for k, run in runs.items():  # warmup + losses
        for _ in range(args.warmup):
            loss, losses = run()
        results[k] = {"loss": float(loss), "losses": {n: float(v) for n, v in losses.items()}}
    times = {k: [] for k in runs}
    for _ in range(args.iters):
        for k, run in runs.items():
            sync(device)
            t = time.perf_counter()
            run()
            sync(device)
            times[k].append(time.perf_counter() - t)

    n_params = {k: sum(p.numel() for n, p in m.named_parameters() if not n.startswith("image_codebook."))
                for k, m in models.items()}
    P, L = cfg.image.num_patches, args.text_len
    tokens_per_sample = (1 + P) + L  # one image-text pair: image CLS + patches, text tokens
    for k in runs:
        med = statistics.median(times[k])
        results[k].update(
            median_s=med, min_s=min(times[k]), mean_s=statistics.fmean(times[k]),
            samples_per_s=args.batch / med, tokens_per_s=args.batch * tokens_per_sample / med,
            params=n_params[k],
        )
    if device == "cuda" and "ours" in runs:
        flops = count_flops(models["ours"], "ours", batch, device, dtype)
        name = torch.cuda.get_device_name()
        peak = next((v for key, v in PEAK_TFLOPS_BF16.items() if key in name), None)
        results["ours"]["model_flops_per_step"] = flops
        results["ours"]["achieved_tflops"] = flops / results["ours"]["median_s"] / 1e12
        if peak:
            results["ours"]["mfu"] = results["ours"]["achieved_tflops"] / peak
        results["device_name"] = name
    if len(runs) == 2:
        results["speedup_hf_over_ours"] = results["hf"]["median_s"] / results["ours"]["median_s"]
        results["max_abs_loss_diff"] = max(
            abs(results["ours"]["losses"][n] - results["hf"]["losses"][n]) for n in results["hf"]["losses"]
        )
    if not args.no_memory:
        for k in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-only", "--which", k, "--config", args.config,
                   "--batch", str(args.batch), "--text-len", str(args.text_len), "--device", device,
                   "--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[k]["memory"] = json.loads(out)
    results["setup"] = dict(
        config=args.config, batch=args.batch, text_len=L, iters=args.iters, warmup=args.warmup, device=device,
        dtype=args.dtype, threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
        cpu=platform.processor() or platform.machine(), losses="global_contrastive, itm, mmm_image, mmm_text",
    )
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
