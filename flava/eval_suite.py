"""``flava eval suite``: a list of evaluation tasks from one TOML file, one JSON and one Markdown table.

Each ``[[task]]`` is a retrieval, zero-shot or linear-probe run of flava.evaluate / flava.linear_probe on one
model, loaded once. A task may carry ``[task.paper]``: the published figures of ``[suite] paper_model`` (the
FLAVA paper's ``facebook/flava-full``) for the same task, with ``cite`` naming the paper and table; they are
printed beside ours when the checkpoint is that model's conversion (the hub name, a transformers directory saved
from it, or ``--paper``). Relative paths in the file are relative to the file.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pmd.config_loader import ConfigError, from_dict

log = logging.getLogger(__name__)

RETRIEVAL, ZEROSHOT, LINEAR_PROBE = "retrieval", "zeroshot", "linear_probe"
KINDS = (RETRIEVAL, ZEROSHOT, LINEAR_PROBE)
#: The figures a table shows per kind (our result's keys; a task's [task.paper] uses the same names).
FIGURES = {
    RETRIEVAL: ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"),
    ZEROSHOT: ("top1", "top5"),
    LINEAR_PROBE: ("top1", "top5"),
}
PUBLISHED = "facebook/flava-full"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


@dataclass
class TaskConfig:
    name: str
    kind: str
    data: list[str] = field(default_factory=list)  # retrieval / zero-shot: shards or a labelled set
    split: str | None = None
    limit: int | None = None
    # retrieval on Karpathy's split file plus the image archives/folders
    karpathy: str | None = None
    karpathy_dataset: str | None = None
    images: list[str] = field(default_factory=list)
    # zero-shot
    classes: str | None = None  # "imagenet", a file, or "a,b,c" (a linear probe on PMD shards labels by these)
    templates: str | None = None  # "imagenet" (default), "single", a file, or "a {}|b {}"
    format: str | None = None
    label_column: str = "label"
    label_key: str = "label"
    # linear probe
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    save_embeddings: str | None = None
    paper: dict[str, float | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r}, expected one of {', '.join(KINDS)}")
        if self.kind == RETRIEVAL and not (self.data or self.karpathy):
            raise ValueError(f"task {self.name!r}: retrieval needs data or karpathy (+ images)")
        if self.kind == ZEROSHOT and not (self.data and self.classes):
            raise ValueError(f"task {self.name!r}: zeroshot needs data and classes")
        if self.kind == LINEAR_PROBE and not (self.train and self.test):
            raise ValueError(f"task {self.name!r}: linear_probe needs train and test")
        unknown = sorted(set(self.paper) - set(FIGURES[self.kind]) - {"cite"})
        if unknown:
            raise ValueError(f"task {self.name!r}: [task.paper] figure(s) {unknown} are not among "
                             f"{', '.join(FIGURES[self.kind])}")


@dataclass
class SuiteOptions:
    name: str = "eval suite"
    paper_model: str = PUBLISHED
    paper: str = ""  # the paper the [task.paper] figures come from


@dataclass
class SuiteConfig:
    suite: SuiteOptions = field(default_factory=SuiteOptions)
    task: list[TaskConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.task:
            raise ValueError("no [[task]] in the suite")
        names = [t.name for t in self.task]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task name(s) given twice: {dup}")


def _rebase(value: str | None, base: Path) -> str | None:
    if value is None or "://" in value or os.path.isabs(value):
        return value
    p = base / value
    return str(p) if p.exists() or not Path(value).exists() else value


def load_suite(path: str | os.PathLike) -> SuiteConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg = from_dict(SuiteConfig, data, str(path))
    base = path.resolve().parent
    for t in cfg.task:
        for key in ("data", "images", "train", "test"):
            setattr(t, key, [_rebase(v, base) for v in getattr(t, key)])
        t.karpathy = _rebase(t.karpathy, base)
        t.save_embeddings = _rebase(t.save_embeddings, base)
        for key in ("classes", "templates"):  # a file next to the config; else a name or an inline list
            v = getattr(t, key)
            if v and (base / v).is_file():
                setattr(t, key, str(base / v))
    return cfg


def is_conversion_of(model_path: str | os.PathLike, published: str) -> bool:
    """The checkpoint is ``published`` itself (hub name) or a transformers directory saved from it."""
    if str(model_path) == published:
        return True
    cfg = Path(model_path) / "config.json"
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text()).get("_name_or_path") == published
        except (ValueError, OSError):
            return False
    return False


def run_task(task: TaskConfig, lm, device: str = "cpu") -> dict:
    from . import evaluate, linear_probe
    from .eval_data import load_classes, load_templates

    if task.kind == RETRIEVAL:
        return evaluate.retrieval(None, task.data, split=task.split, limit=task.limit, device=device,
                                  karpathy=task.karpathy, images=task.images, karpathy_dataset=task.karpathy_dataset,
                                  lm=lm)
    if task.kind == ZEROSHOT:
        return evaluate.zeroshot(None, task.data, load_classes(task.classes), load_templates(task.templates),
                                 label_key=task.label_key, split=task.split, limit=task.limit, device=device,
                                 fmt=task.format, label_column=task.label_column, lm=lm)
    return linear_probe.run(None, task.train, task.test, fmt=task.format, label_column=task.label_column,
                            classes=load_classes(task.classes) if task.classes else None, limit=task.limit,
                            device=device, save_embeddings=task.save_embeddings, lm=lm)


def run_suite(model_path: str | os.PathLike, config: SuiteConfig | str | os.PathLike, out: str | os.PathLike,
              device: str = "cpu", paper: bool | None = None, lm=None) -> dict:
    """Every task on one loaded model; writes OUT/results.json and OUT/results.md and returns the results."""
    from .evaluate import load_for_eval

    cfg = config if isinstance(config, SuiteConfig) else load_suite(config)
    lm = lm or load_for_eval(model_path, device)
    show_paper = is_conversion_of(model_path, cfg.suite.paper_model) if paper is None else paper
    tasks = {}
    for task in cfg.task:
        log.info("suite: task %s (%s)", task.name, task.kind)
        tasks[task.name] = {"kind": task.kind, "result": run_task(task, lm, device)}
        if show_paper and task.paper:
            tasks[task.name]["paper"] = dict(task.paper)
    results = {"suite": cfg.suite.name, "model": lm.source, "paper_model": cfg.suite.paper_model,
               "paper_shown": bool(show_paper), "paper": cfg.suite.paper, "tasks": tasks}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / RESULTS_MD).write_text(markdown_table(results))
    return results


def table_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """``(task, figure, ours, paper or None)`` for each figure of each task, in table order."""
    rows = []
    for name, t in results["tasks"].items():
        paper = t.get("paper", {})
        for fig in FIGURES[t["kind"]]:
            ours = t["result"].get(fig)
            if ours is None:
                continue
            rows.append((name, fig, float(ours), float(paper[fig]) if fig in paper else None))
    return rows


def markdown_table(results: dict) -> str:
    """Figures in percent ([task.paper] is written in percent, as the paper prints it); the paper column only when
    the checkpoint is the published model's conversion."""
    show = results["paper_shown"]
    head = "| task | figure | ours |" + (" paper |" if show else "")
    sep = "|---|---|---:|" + ("---:|" if show else "")
    lines = [f"# {results['suite']}: {results['model']}", "", head, sep]
    for name, fig, ours, paper in table_rows(results):
        row = f"| {name} | {fig} | {100 * ours:.2f} |"
        if show:
            row += " |" if paper is None else f" {paper:.2f} |"
        lines.append(row)
    cites = {t["paper"]["cite"] for t in results["tasks"].values() if "cite" in t.get("paper", {})}
    if show and cites:
        lines += ["", "Paper figures: " + "; ".join(sorted(str(c) for c in cites))]
    return "\n".join(lines) + "\n"
