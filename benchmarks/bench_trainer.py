"""Trainer step time and samples/s: `flava train` end to end (loader, codebook, FSDP2, optimizer, logging).

CPU: the tiny config with 1 and 2 processes (gloo). GPU (when available): flava_full (random codebook, tokenizer
trained on the captions, bf16, activation checkpointing) -> samples/s and model FLOPs utilisation. Figures are the
median over the logged steps after a warm-up, from RUN/metrics.jsonl.

    python benchmarks/bench_trainer.py --nproc 1 2 --steps 30
    python benchmarks/bench_trainer.py --full --steps 30 --micro 32   # on a GPU machine

A/B of two override sets in alternating rounds (medians per side), e.g. padding to the batch's longest text
against padding to the maximum length, at the paper's text lengths (77 for pairs, 512 for MLM):

    python benchmarks/bench_trainer.py --ab data.pad_to_longest=false data.pad_to_longest=true --rounds 3 \
        --steps 15 --lengths --threads 1
    python benchmarks/bench_trainer.py --ab run.contrastive_gradient_cache=false run.contrastive_gradient_cache=true \
        --batch 32 --micro 8 --rounds 3 --steps 15 --threads 1
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

THREADS = 0  # --threads


def run(data: Path, out: Path, config: str, steps: int, nproc: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pmd_cli.flava", "train", "--config", config, "--data", str(data), "--out", str(out),
           "--steps", str(steps), "run.progress=false", "run.tensorboard=false", "run.export_final=false",
           "run.checkpoint_every=100000", "run.log_every=1", *extra]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    t = time.perf_counter()
    env = dict(os.environ)
    if THREADS:  # torch's default (all cores) oversubscribes badly on a loaded machine
        env["OMP_NUM_THREADS"] = str(THREADS)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr[-4000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    warm = rows[min(5, len(rows) // 3):]
    sps = statistics.median(r["samples_per_s"] for r in warm)
    res = {"nproc": nproc, "steps": steps, "samples_per_s": sps, "wall_s": wall}
    for kind in sorted({r["kind"] for r in warm}):  # mixed-kind runs: each kind's steps on their own
        res[f"samples_per_s_{kind}"] = statistics.median(r["samples_per_s"] for r in warm if r["kind"] == kind)
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
    ap.add_argument("--ab", nargs=2, metavar=("A", "B"), help="two override sets (comma-separated key=value)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating A/B rounds (with --ab)")
    ap.add_argument("--lengths", action="store_true", help="tiny at the paper's text lengths: 77 pairs, 512 text")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: torch's default)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    if args.ab:
        return ab(args)
    results = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if args.full:
            data = make_build(d / "data", n=2048, size=256, shards=4, row_group_size=256)
            extra = ["model.codebook=random", "model.allow_random_codebook=true", "data.tokenizer=null",
                     "data.tokenizer_vocab_size=30522", "model.text_vocab_from_tokenizer=false",
                     f"run.micro_batch_size={args.micro}", f"run.global_batch_size={args.micro}", "data.num_workers=6",
                     "data.ratios={pairs: 1.0}"]
            for n in args.nproc:
                results.append({"config": "flava_full",
                                **run(data, d / f"full{n}", "flava_full", args.steps, n, extra)})
        else:
            data = make_build(d / "data", n=512, size=48, shards=2, row_group_size=64)
            for n in args.nproc:
                extra = [f"run.global_batch_size={args.batch}", f"run.micro_batch_size={args.batch // n}",
                         "data.num_workers=1", "data.ratios={pairs: 1.0}"]
                r = run(data, d / f"tiny{n}", "tiny", args.steps, n, extra)
                r["step_s"] = args.batch / r["samples_per_s"]
                results.append({"config": "tiny", "global_batch": args.batch, **r})
    for r in results:
        print(json.dumps(r))


def ab(args) -> None:
    """Alternating rounds A, B, A, B, ... on the same data; prints every run and the median samples/s per side."""
    micro = min(args.micro, args.batch)  # < --batch: gradient accumulation
    extra = [f"run.global_batch_size={args.batch}", f"run.micro_batch_size={micro}", "data.num_workers=1"]
    if args.lengths:  # pairs + MLM text as in the paper; the tiny model gets 512 positions for it
        extra += ["model.overrides.text.max_position_embeddings=512", "data.text_max_length=77",
                  "data.text_only_max_length=512", "data.ratios={pairs: 0.5, text: 0.5}"]
    sides = {"A": args.ab[0].split(","), "B": args.ab[1].split(",")}
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        data = make_build(d / "data", n=512, size=48, shards=2, row_group_size=64)
        for i in range(args.rounds):
            for side, over in sides.items():
                r = run(data, d / f"{side}{i}", "tiny", args.steps, 1, [*extra, *over])
                runs[side].append(r)
                print(json.dumps({"round": i, "side": side, "overrides": over, **r}), flush=True)
    keys = [k for k in runs["A"][0] if k.startswith("samples_per_s")]
    for key in keys:
        med = {side: statistics.median(r[key] for r in rs) for side, rs in runs.items()}
        print(json.dumps({"metric": key, "median": med, "B_over_A": med["B"] / med["A"], "A": sides["A"],
                          "B": sides["B"]}))


if __name__ == "__main__":
    main()
