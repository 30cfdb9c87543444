"""What a training run reports: metrics.jsonl and TensorBoard (rank 0), each logged step's record, model FLOPs.

``flava.train`` calls these once per logged step; MFU is model FLOPs per second over the devices' bf16 peak.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import FlavaConfig
from .distributed import DistInfo

log = logging.getLogger(__name__)

PEAK_FLOPS_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
LOSS_NAMES = ("mim", "mlm", "itm", "global_contrastive", "mmm_image", "mmm_text")


def _layer_flops(n: int, d: int, mlp: int) -> float:
    return 2 * n * (4 * d * d + 2 * d * mlp) + 4 * n * n * d


def flops_per_sample(mcfg: FlavaConfig, kind: str, text_len: int) -> float:
    """Model FLOPs of one training sample (forward + backward = 3x forward; recomputation not counted)."""
    ic, tc, mc = mcfg.image, mcfg.text, mcfg.multimodal
    n_img = ic.num_patches + 1
    img = ic.num_layers * _layer_flops(n_img, ic.hidden_size, ic.mlp_dim)
    txt = tc.num_layers * _layer_flops(text_len, tc.hidden_size, tc.mlp_dim)
    if kind == "images":
        fwd = img
    elif kind == "text":
        fwd = txt
    else:  # unmasked + masked copies of each modality, fusion once over [CLS_M, image, text]
        fwd = 2 * img + 2 * txt + mc.num_layers * _layer_flops(1 + n_img + text_len, mc.hidden_size, mc.mlp_dim)
    return 3.0 * fwd


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_FLOPS_BF16.items():
        if key in name:
            return v
    return None


class Throughput:
    """Samples per second and MFU since the last logged step, and the device's peak memory."""

    def __init__(self, device: torch.device, world_size: int, clock=time.perf_counter) -> None:
        self.device, self.world_size, self.clock = device, world_size, clock
        self.peak = peak_flops(device)
        self.restart()

    def restart(self) -> None:
        self.start, self.samples, self.flops = self.clock(), 0, 0.0

    def add(self, samples: int, flops: float) -> None:
        self.samples += samples
        self.flops += flops

    def record(self) -> dict:
        rec = {}
        if self.device.type == "cuda":  # the step's kernels finish before the clock is read
            torch.cuda.synchronize(self.device)
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        dt = self.clock() - self.start
        rec["samples_per_s"] = self.samples / dt if dt > 0 else None
        if self.peak:
            rec["mfu"] = self.flops / dt / (self.peak * self.world_size)
        return rec


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard, on rank 0."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # a run killed after its last checkpoint logged steps that will be redone
            keep = []
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
            self.path.write_text("".join(x + "\n" for x in keep))
        self.f = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard is optional at run time
                log.warning("tensorboard is not installed: logging to metrics.jsonl only")

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k if k in ("loss", "lr") or k in LOSS_NAMES else f"perf/{k}", v, rec["step"])

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def log_record(step: int, kind: str, sums: dict, lr: float, grad_norm, info: DistInfo, device) -> dict:
    """One logged step: its losses (mean over ranks), learning rate and gradient norm, read from the device in ONE
    transfer (called every ``run.log_every`` steps only: each read waits for the device to finish the step)."""
    names = ["loss", *LOSS_NAMES]
    vec = torch.stack([sums[n] if n in sums else torch.zeros((), device=device) for n in names]).float()
    present = [n in sums for n in names]
    if info.distributed:  # mean over ranks; every rank had the same kind, so the same losses present
        vec = vec.clone()
        dist.all_reduce(vec)
        vec /= info.world_size
    if grad_norm is not None:  # the same on every rank: not averaged
        g = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        vec = torch.cat([vec, g.detach().reshape(1).float().to(vec.device)])
    vals = vec.cpu().tolist()
    rec = {"step": step, "kind": kind}
    for n, p, v in zip(names, present, vals):
        if p:
            rec[n] = v
    rec["lr"] = lr
    if grad_norm is not None:
        rec["grad_norm"] = vals[len(names)]
    return rec
