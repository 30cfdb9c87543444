"""Trainer step time and samples/s: `flava train` end to end (loader, codebook, FSDP2, optimizer, logging).

CPU: the tiny config with 1 and 2 processes (gloo). GPU (when available): flava_full (random codebook, tokenizer
trained on the captions, bf16, activation checkpointing) -> samples/s and model FLOPs utilisation. Figures are the
median over the logged steps after a warm-up, from RUN/metrics.jsonl.

    python benchmarks/bench_trainer.py --nproc 1 2 --steps 30
    python benchmarks/bench_trainer.py --full --steps 30 --micro 32   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.flava.shards import make_build  # noqa: E402


def run(data: Path, out: Path, config: str, steps: int, nproc: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "flava.cli", "train", "--config", config, "--data", str(data), "--out", str(out),
           "--steps", str(steps), "run.progress=false", "run.tensorboard=false", "run.export_final=false",
           "run.checkpoint_every=100000", "run.log_every=1", *extra]  # fmt: skip
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr[-4000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    warm = rows[min(5, len(rows) // 3):]
    sps = statistics.median(r["samples_per_s"] for r in warm)
    res = {"nproc": nproc, "steps": steps, "samples_per_s": sps, "wall_s": wall}
    mfu = [r["mfu"] for r in warm if r.get("mfu") is not None]
    if mfu:
        res["mfu"] = statistics.median(mfu)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32, help="global batch (tiny)")
    ap.add_argument("--full", action="store_true", help="flava_full on GPU")
    ap.add_argument("--micro", type=int, default=32, help="per-GPU micro batch (flava_full)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if args.full:
            data = make_build(d / "data", n=2048, size=256, shards=4, row_group_size=256)
            extra = ["model.codebook=random", "model.allow_random_codebook=true", "data.tokenizer=null",
                     "data.tokenizer_vocab_size=30522", "model.text_vocab_from_tokenizer=false",
                     f"run.micro_batch_size={args.micro}", f"run.global_batch_size={args.micro}", "data.num_workers=6", "data.ratios={pairs: 1.0}"]  # fmt: skip
            for n in args.nproc:
                results.append({"config": "flava_full", **run(data, d / f"full{n}", "flava_full", args.steps, n, extra)})
        else:
            data = make_build(d / "data", n=512, size=48, shards=2, row_group_size=64)
            for n in args.nproc:
                extra = [f"run.global_batch_size={args.batch}", f"run.micro_batch_size={args.batch // n}",
                         "data.num_workers=1", "data.ratios={pairs: 1.0}"]  # fmt: skip
                r = run(data, d / f"tiny{n}", "tiny", args.steps, n, extra)
                r["step_s"] = args.batch / r["samples_per_s"]
                results.append({"config": "tiny", "global_batch": args.batch, **r})
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
