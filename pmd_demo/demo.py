"""`pmd demo`: the whole system, offline, on a laptop, in a few minutes.

1. generate a small PMD in the exact upstream formats (COCO Karpathy JSON + image zips, Conceptual Captions TSV,
   YFCC100M 25-field TSV, RedCaps JSON) whose captions describe their images;
2. serve the URL images from a loopback HTTP server (some broken on purpose);
3. `pmd build` all of it into one shuffled corpus on the embedded Ray, then `pmd verify` and `pmd stats` with a
   report;
4. train the tiny FLAVA with 2 processes (FSDP2, gloo), evaluate zero-shot retrieval on held-out pairs, and end
   with `flava eval suite`'s table (retrieval, zero-shot classification, linear probe) on the held-out images;
5. say where everything is and what to try next.
Every figure printed is computed by the run itself.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
from rich.console import Console
from rich.table import Table

from pmd import report, schema, stats
from pmd.config_loader import ConfigError
from pmd.download import DownloadOptions
from pmd.images import ImageOptions
from pmd.shards import verify
from pmd_demo import synthetic
from pmd_demo.serve import serve_directory
from pipelines.build import BuildConfig, SourceSpec, config_to_toml, load_config, run_build

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path = Path("pmd-demo")
    images: int = 180  # per source; COCO's test split then holds one image of each of the 18 colour-shape pairs
    train_steps: int = 300
    nproc: int = 2
    image_size: int = 64  # shorter side stored in the shards (the generated images are 96 px)
    seed: int = 0
    train_overrides: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls, out: Path) -> DemoConfig:
        """The same chain at CI size: fewer images and steps; still two processes."""
        return cls(out=out, images=60, train_steps=20)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.images < 20:
            raise ConfigError("the demo needs at least 20 images per source")
        if self.train_steps < 1 or self.nproc < 1:
            raise ConfigError("train_steps and nproc must be positive")


def _build_config(corpus: synthetic.SyntheticCorpus, config: DemoConfig, out: Path, base_url: str) -> BuildConfig:
    """The build: small shards and chunks so that even the demo has several of each; 2 CPUs. The address guard
    admits the demo's own server (`base_url`'s address) and nothing else of loopback (docs/build.md)."""
    host = urlsplit(base_url).hostname or ""
    sources = [SourceSpec(name, inputs, corpus.archives.get(name, [])) for name, inputs in corpus.inputs.items()]
    return BuildConfig(sources=sources, out=out, shard_rows=250, row_group_rows=50, chunk_rows=100, seed=config.seed,
                       executor="ray", num_cpus=2, task_cpus=0.5,
                       image=ImageOptions(image_size=config.image_size, min_side=16),
                       download=DownloadOptions(timeout=5.0, retries=0, thread_count=16,
                                                allow_networks=[str(ipaddress.ip_network(host))]))


def _heldout(build: Path, out: Path) -> int:
    """One caption per held-out image (COCO's Karpathy test split): a retrieval set without duplicate images."""
    frame = (pl.scan_parquet(sorted((build / "shards").glob("*.parquet")))
             .filter((pl.col(schema.SOURCE) == "coco") & (pl.col(schema.SPLIT) == "test"))
             .sort(schema.KEY).unique(subset=[schema.IMAGE_REF], keep="first", maintain_order=True)
             .collect())
    out.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out / "heldout.parquet")
    return frame.height


def _probe_train(build: Path, out: Path) -> int:
    """One row per COCO train-split image: the linear probe's train set (its labels are the captions' classes)."""
    frame = (pl.scan_parquet(sorted((build / "shards").glob("*.parquet")))
             .filter((pl.col(schema.SOURCE) == "coco") & (pl.col(schema.SPLIT) == "train"))
             .sort(schema.KEY).unique(subset=[schema.IMAGE_REF], keep="first", maintain_order=True)
             .collect())
    out.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out / "train.parquet")
    return frame.height


def _suite_config(out: Path) -> Path:
    """The demo's `flava eval suite` file: retrieval, zero-shot and a linear probe, all on the held-out images."""
    import tomli_w

    from pmd_demo.drawings import COLOURS, SHAPES

    classes = ",".join(f"{c} {s}" for s in SHAPES for c in COLOURS)
    heldout = str(out / "heldout")
    cfg = {"suite": {"name": "demo held-out evaluations"},
           "task": [{"name": "coco_test_retrieval", "kind": "retrieval", "data": [heldout]},
                    {"name": "shapes_zeroshot", "kind": "zeroshot", "data": [heldout], "classes": classes},
                    {"name": "shapes_linear_probe", "kind": "linear_probe", "train": [str(out / "probe_train")],
                     "test": [heldout], "classes": classes}]}
    path = out / "eval.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def _flava(args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pmd_cli.flava", *args]
    log.info("running %s", " ".join(cmd))
    return subprocess.run(cmd, env=env, text=True, capture_output=True, check=False)


def run_demo(config: DemoConfig, console: Console | None = None) -> dict:
    """Run every stage; returns the summary (also written to OUT/demo.json)."""

    console = console or Console(highlight=False)
    out = config.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    summary: dict = {"out": str(out)}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "RAY_USAGE_STATS_ENABLED", "NO_ALBUMENTATIONS_UPDATE",
                                           "WANDB_MODE")})
    inputs, build, run = out / "inputs", out / "build", out / "run"

    (inputs / "http").mkdir(parents=True, exist_ok=True)
    with serve_directory(inputs / "http") as base_url:
        t = time.perf_counter()
        console.rule("[bold]1. upstream files")
        corpus = synthetic.generate(inputs, base_url, images=config.images, seed=config.seed)
        timings["generate_s"] = time.perf_counter() - t
        console.print(f"wrote {', '.join(corpus.inputs)} in their upstream formats under {inputs}; "
                      f"serving URL images at {base_url} ({len(corpus.broken_urls)} broken on purpose)")

        console.rule("[bold]2. pmd build (embedded Ray)")
        # Written first and read back: the build that runs is the file a user can rerun with `pmd build --config`.
        config_path = out / "build.toml"
        config_path.write_text(config_to_toml(_build_config(corpus, config, build, base_url)))
        t = time.perf_counter()
        manifest = run_build(load_config(config_path))
        timings["build_s"] = time.perf_counter() - t
    summary["totals"] = manifest["totals"]

    console.rule("[bold]3. pmd verify and pmd stats")
    t = time.perf_counter()
    problems = verify(build)
    audit = stats.audit(build)
    written = report.write_report(audit, out / "report")
    timings["audit_s"] = time.perf_counter() - t
    if problems or not audit["trusted"]:
        raise RuntimeError("the demo build does not verify: " + "; ".join(problems + audit["problems"]))
    console.print(f"verify: OK ({audit['shards']} shards); report: {written['html']}")
    table = Table(title="the build, per source")
    for col in ("source", "input rows", "pairs", "rejects", "failures", "unique images", "mean words"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for name, s in audit["sources"].items():
        acc = s["accounting"]
        table.add_row(name, f"{acc['input_rows']:,}", f"{s['pairs']:,}", f"{acc['rejects']:,}",
                      f"{acc['failures']:,}", f"{s['unique_images']:,}", f"{s['words']['mean']:.1f}")
    console.print(table)
    failures = audit["total"]["failures_by_reason"]
    console.print("failures by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(failures.items())))
    summary["sources"] = {n: {"pairs": s["pairs"], "accounting": s["accounting"]} for n, s in audit["sources"].items()}
    summary["failures_by_reason"] = failures

    console.rule(f"[bold]4. train the tiny FLAVA ({config.nproc} processes, FSDP2/gloo) and evaluate")
    heldout_n = _heldout(build, out / "heldout")
    t = time.perf_counter()
    train = _flava(["train", "--config", "tiny", "--data", str(build), "--out", str(run), "--steps",
                    str(config.train_steps), "--nproc", str(config.nproc), "data.split=train",
                    "run.progress=false", *config.train_overrides], env)
    timings["train_s"] = time.perf_counter() - t
    if train.returncode != 0:
        raise RuntimeError(f"flava train failed ({train.returncode}):\n{train.stderr[-4000:]}")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = metrics[0], metrics[-1]
    console.print(f"trained {last['step']} steps: loss {first['loss']:.3f} -> {last['loss']:.3f}")
    evaluation = _flava(["eval", "retrieval", "--checkpoint", str(run), "--data", str(out / "heldout"), "--json"],
                        env)
    if evaluation.returncode != 0:
        raise RuntimeError(f"flava eval failed ({evaluation.returncode}):\n{evaluation.stderr[-4000:]}")
    retrieval = json.loads(evaluation.stdout.strip().splitlines()[-1])
    table = Table(title=f"zero-shot retrieval on {retrieval['n_images']} held-out images and "
                        f"{retrieval['n_texts']} captions (COCO test split, the standard protocol)")
    for col in ("", "R@1", "R@5", "R@10"):
        table.add_column(col, justify="right")
    table.add_row("image -> text", *(f"{retrieval[f'i2t_r{k}']:.2f}" for k in (1, 5, 10)))
    table.add_row("  chance", *(f"{min(k * retrieval['chance_i2t_r1'], 1.0):.2f}" for k in (1, 5, 10)))
    table.add_row("text -> image", *(f"{retrieval[f't2i_r{k}']:.2f}" for k in (1, 5, 10)))
    table.add_row("  chance", *(f"{min(k * retrieval['chance_t2i_r1'], 1.0):.2f}" for k in (1, 5, 10)))
    console.print(table)
    summary.update(train={"steps": last["step"], "first_loss": first["loss"], "last_loss": last["loss"]},
                   retrieval=retrieval, heldout_pairs=heldout_n, timings=timings)

    # the whole suite on the held-out images: one JSON and one Markdown table (docs/pretrain.md, Evaluation)
    t = time.perf_counter()
    probe_n = _probe_train(build, out / "probe_train")
    suite_cfg = _suite_config(out)
    suite = _flava(["eval", "suite", "--checkpoint", str(run), "--config", str(suite_cfg), "--out",
                    str(out / "eval"), "--json"], env)
    timings["suite_s"] = time.perf_counter() - t
    if suite.returncode != 0:
        raise RuntimeError(f"flava eval suite failed ({suite.returncode}):\n{suite.stderr[-4000:]}")
    from flava.eval_suite import table_rows

    results = json.loads(suite.stdout.strip().splitlines()[-1])
    table = Table(title=f"flava eval suite on the held-out images ({out / 'eval' / 'results.md'}; "
                        f"linear probe trained on {probe_n} COCO train images)")
    for col in ("task", "figure", "ours (%)"):
        table.add_column(col, justify="left" if col != "ours (%)" else "right")
    for name, fig, ours, _ in table_rows(results):
        table.add_row(name, fig, f"{100 * ours:.1f}")
    console.print(table)
    summary["suite"] = results

    console.rule("[bold]5. where everything is")
    places = {"upstream files": inputs, "build config": config_path, "shards": build / "shards",
              "manifest": build / "manifest.json", "failures": build / "failures", "report": written["html"],
              "training run": run, "metrics": run / "metrics.jsonl", "held-out pairs": out / "heldout",
              "eval suite": out / "eval"}
    for what, where in places.items():
        console.print(f"  {what:>15}: {where}")
    console.print("next: "
                  f"pmd stats {build} --report {out / 'report'}  |  pmd verify {build}  |  "
                  f"flava train --config tiny --data {build} --out {run} --steps {config.train_steps + 100} "
                  f"--nproc {config.nproc} data.split=train  (resumes)  |  docs/rebuild-pmd.md for the real build")
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
