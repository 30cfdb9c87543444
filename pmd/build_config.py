"""The configuration of `pmd build`: its sources and options (BuildConfig), read from a TOML or YAML file with the
command line's overrides laid on it (load_config), and written back (config_to_toml). docs/build.md describes
every key; pmd.plan.fingerprint says which of them the work state depends on."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmd import final, storage
from pmd.config_loader import ConfigError, Where, apply_overrides, from_dict
from pmd.download import DownloadOptions
from pmd.eval_screen import EvalScreenOptions
from pmd.images import ImageOptions

WORK_DIR = final.WORK_DIR
EXECUTORS = ("auto", "ray", "pool", "local")  # pipelines/build.py chooses and starts them


@dataclass
class SourceSpec:
    """One source of the build. `images` empty: a URL source (downloaded); else archive files holding the images."""

    name: str
    inputs: list[Path | str]  # local paths or URLs on object storage (pmd.storage.location)
    images: list[Path | str] = field(default_factory=list)
    options: dict[str, str | int | float | bool] = field(default_factory=dict)  # strings once built

    def __post_init__(self) -> None:
        from pmd.sources import adapter_class

        adapter_class(self.name)  # unknown names fail here, before any work
        if isinstance(self.inputs, (str, Path)):
            self.inputs = [self.inputs]
        if isinstance(self.images, (str, Path)):
            self.images = [self.images]
        self.inputs = [storage.location(p) for p in self.inputs]
        self.images = [storage.location(p) for p in self.images]
        self.options = {str(k): str(v) for k, v in self.options.items()}
        if not self.inputs:
            raise ValueError(f"source {self.name!r}: no input files")

    @property
    def mode(self) -> str:
        return "archive" if self.images else "url"


@dataclass
class BuildConfig:
    sources: list[SourceSpec]
    out: Path | str  # a local directory, or a URL on object storage (kept as a string)
    shard_rows: int = 10_000
    row_group_rows: int = 1_000
    chunk_rows: int = 2_000
    seed: int = 0
    image: ImageOptions = field(default_factory=ImageOptions)
    download: DownloadOptions = field(default_factory=DownloadOptions)
    # "auto": "pool" up to pipelines.build.POOL_MAX_CANDIDATES candidates without `ray_address`, else "ray";
    # "pool": a process pool of this machine (no Ray); "local": in-process, one task at a time (debugging)
    executor: str = "auto"
    ray_address: str | None = None
    num_cpus: int | None = None  # CPUs of an embedded local Ray or of the pool (default: all)
    task_cpus: float = 1.0  # CPUs reserved per chunk/shard task
    # download again the rows whose last failure is transient (pmd.http_client.is_transient)
    retry_failures: bool = False
    progress: bool = True
    decontaminate: EvalScreenOptions = field(default_factory=EvalScreenOptions)  # evaluation images kept out
    work: Path | str | None = None  # the work state: a directory or a URL (default OUT/work, default_work_dir)

    def __post_init__(self) -> None:
        self.out = storage.location(self.out)
        if self.work is None:
            self.work = default_work_dir(self.out)
        self.work = storage.as_path(self.work)
        if not self.sources:
            raise ValueError("a build needs at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"a source is listed twice: {names}")
        for name in ("shard_rows", "row_group_rows", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, not {self.executor!r}")
        if not 0 < self.task_cpus <= 64:
            raise ValueError("task_cpus must be in (0, 64]")

    @property
    def dirs(self) -> final.BuildDirs:
        return final.BuildDirs(str(self.out), str(self.work))

    def to_dict(self) -> dict:
        """The configuration as given (for the manifest): paths as strings."""
        return {
            "sources": [{"name": s.name, "inputs": [str(p) for p in s.inputs], "images": [str(p) for p in s.images],
                         "options": dict(s.options)} for s in self.sources],
            "shard_rows": self.shard_rows, "row_group_rows": self.row_group_rows, "chunk_rows": self.chunk_rows,
            "seed": self.seed, "image": dataclasses.asdict(self.image), "download": self.download.to_dict(),
            "executor": self.executor, "task_cpus": self.task_cpus, "retry_failures": self.retry_failures,
            "decontaminate": self.decontaminate.to_dict(),
        }


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> BuildConfig:
    """A build configuration file (TOML, or YAML by extension) with `overrides` laid on it (pmd.config_loader).

    Relative paths in the file are relative to the file; `overrides` come from the command line (dotted keys:
    `shard_rows`, `image.image_size`, `decontaminate.against`; None = not given) and their paths stay as given.
    Without a file the overrides are the whole configuration (`pmd build SOURCE INPUT...`). Unknown keys are
    errors at every level: a misspelt option must never be silently ignored.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif path.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        else:
            raise ConfigError(f"{path}: config must be .toml, .yaml or .yml")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        _resolve_paths(raw, path.parent)
    raw = apply_overrides(raw, overrides)
    return from_dict(BuildConfig, raw, Where("command line" if path is None else str(path)))


def _resolve_paths(raw: dict, base: Path) -> None:
    """The file's input, image and evaluation paths made relative to the file (in place, before validation)."""
    def resolve(p):
        if not isinstance(p, (str, Path)) or storage.is_remote(p):
            return p  # left for the loader to refuse; a URL is absolute
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else base / p

    def each(value):
        return [resolve(p) for p in value] if isinstance(value, list) else resolve(value)

    sources = raw.get("sources")
    for s in sources if isinstance(sources, list) else []:
        if isinstance(s, dict):
            for key in ("images", "options"):  # an empty YAML key: none
                if key in s and s[key] is None:
                    del s[key]
            for key in ("inputs", "images"):
                if key in s:
                    s[key] = each(s[key])
    decontaminate = raw.get("decontaminate")
    if isinstance(decontaminate, dict):
        for key in ("against", "flickr_ids"):
            if key in decontaminate:
                decontaminate[key] = each(decontaminate[key])


def config_to_toml(config: BuildConfig) -> str:
    """The configuration as a TOML file that `load_config` reads back to an equal BuildConfig (paths absolute).

    Only the keys a config file may hold are written (`progress` belongs to the command line). TOML has no null:
    a field left None is left out, which is its default for every field whose default is None; any other None
    cannot be written and is an error.
    """
    import tomli_w

    def plain(value: Any, where: str) -> Any:
        if dataclasses.is_dataclass(value):
            out = {}
            for f in dataclasses.fields(value):
                v = getattr(value, f.name)
                if v is None:
                    if f.default is not None:
                        raise ValueError(f"{where}{f.name} is None, which a TOML build config cannot express")
                    continue
                out[f.name] = plain(v, f"{where}{f.name}.")
            return out
        if isinstance(value, Path):
            return str(value.absolute())
        if isinstance(value, (list, tuple)):
            return [plain(v, where) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v, where) for k, v in value.items()}
        return value

    table = plain(config, "")
    for source in table["sources"]:
        if not source["options"]:
            del source["options"]
    return tomli_w.dumps({k: v for k, v in table.items() if k != "progress"})


def default_work_dir(out: Path | str) -> storage.WorkPath:
    """OUT/work, on the store OUT is on: a local directory, or a prefix beside the corpus on object storage, so
    that every node of a cluster sees it and rerunning the same command finds it and resumes. Nothing of it is
    kept on a node's own disk."""
    return storage.as_path(storage.join(out, WORK_DIR))

