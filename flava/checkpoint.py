"""Checkpoints with torch.distributed.checkpoint (DCP), without pickle on the load path.

A checkpoint is ``RUN/checkpoints/step-XXXXXXXX/``:

* DCP files holding only tensors: ``model`` (sharded FSDP2 state or a plain state dict) and ``optim`` (AdamW state
  keyed by parameter name; hyper-parameters come from the config, not the checkpoint). Tensor data load with
  ``weights_only=True``; DCP's ``.metadata`` (a pickle) is read with an allow-listed unpickler
  (``SafeFileSystemReader``), so no arbitrary object can be constructed while loading.
* ``meta.json`` (step, scheduler, the model config, the tokenizer vocab size) and ``rank-<r>.json`` (RNG states and
  loader state of rank r) in plain JSON.
* ``COMPLETE``: written last, after every rank finished; a directory without it is ignored (a crash mid-save
  never looks like a checkpoint). The directory is assembled under pmd.atomic's temporary name (shared by the
  ranks) and renamed.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from pmd.atomic import replace_directory, temp_path

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d{8})$")

# Everything DCP's metadata pickle legitimately references (torch 2.x): its own dataclasses, sizes, dtypes, enums.
_SAFE_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "getattr"),
    ("torch.serialization", "_get_layout"),
    ("enum", "Enum"),
    ("pathlib", "PosixPath"),  # storage_meta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class CheckpointError(RuntimeError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith(_SAFE_MODULE_PREFIXES) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and (name.endswith("dtype") or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata references {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """DCP reader whose metadata unpickling only constructs DCP metadata classes, sizes and dtypes."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _SafeUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# -- RNG states as JSON ----------------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


# -- locating ----------------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / "COMPLETE").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def read_meta(ckpt: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: unreadable checkpoint metadata ({e})") from None


# -- state dicts -------------------------------------------------------------------------------------------------
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW state for every parameter now (zeros, step 0), exactly what AdamW creates lazily on its first
    step, so that a checkpoint always has every key and a fresh optimizer can load it."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in optimizer.state and optimizer.state[p]:
                continue
            optimizer.state[p] = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def _tensor_states(model, optimizer) -> tuple[dict, dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return msd, osd["state"], osd


def save_checkpoint(
    run_dir: str | os.PathLike, step: int, model, optimizer, meta: dict, rank_state: dict, keep: int = 3,
    async_save: bool = False, process_group=None,
) -> "Path | PendingSave":
    """Collective: every rank calls it. Returns the checkpoint directory; with ``async_save`` a ``PendingSave``
    whose ``wait()`` (collective, on every rank) finishes it: the state is copied to host memory here and written
    by a background thread (``torch.distributed.checkpoint.async_save``, its collectives on ``process_group``, a
    gloo group: NCCL is not for a second thread) while training goes on."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    final = checkpoint_dir(run_dir, step)
    tmp = temp_path(final, owner="ranks")  # one name every rank computes (a pid would differ per rank)
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if distributed:
        dist.barrier()
    msd, ostate, _ = _tensor_states(model, optimizer)
    future = None
    with _quiet_single_process():
        if async_save:
            future = dcp.async_save({"model": msd, "optim": ostate}, checkpoint_id=str(tmp),
                                    process_group=process_group)
        else:
            dcp.save({"model": msd, "optim": ostate}, checkpoint_id=str(tmp))
    (tmp / f"rank-{rank}.json").write_text(json.dumps(rank_state))
    pending = PendingSave(future, Path(run_dir), step, tmp, final, meta, keep)
    return pending if async_save else pending.wait()


class PendingSave:
    """A checkpoint whose tensors are still being written; ``wait()`` (collective) marks it COMPLETE and renames
    it. Until then it is not a checkpoint (``list_checkpoints`` ignores it)."""

    def __init__(self, future, run_dir: Path, step: int, tmp: Path, final: Path, meta: dict, keep: int) -> None:
        self.future, self.run_dir, self.step = future, run_dir, step
        self.tmp, self.final, self.meta, self.keep = tmp, final, meta, keep

    def wait(self) -> Path:
        if self.future is not None:
            result = self.future.result()
            # a staged save answers with an object holding the upload's future (newer torch)
            upload = getattr(result, "upload_completion", None)
            if upload is not None:
                upload.result()
            self.future = None
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        if distributed:
            dist.barrier()
        if rank == 0:
            (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=1))
            (self.tmp / "COMPLETE").write_text(str(self.step))
            replace_directory(self.tmp, self.final)
            for _, old in list_checkpoints(self.run_dir)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if distributed:
            dist.barrier()
        return self.final


def load_checkpoint(ckpt: str | os.PathLike, model, optimizer) -> dict:
    """Collective. Loads model and optimizer state in place and returns the checkpoint's meta. DCP reshards: the
    checkpoint may have been written by any number of processes (each tensor is stored with its global shape and
    the pieces each rank wrote), and is read into this run's sharding, or into a plain model on one process."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    init_optimizer_state(optimizer)
    msd, ostate, osd = _tensor_states(model, optimizer)
    state = {"model": msd, "optim": ostate}
    with _quiet_single_process():
        dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"],
        optim_state_dict={"state": state["optim"], "param_groups": osd["param_groups"]},
    )
    return meta


def read_rank_state(ckpt: str | os.PathLike, rank: int) -> dict:
    """RNG and loader state that rank ``rank`` saved (``rank-<r>.json``)."""
    rank_file = Path(ckpt) / f"rank-{rank}.json"
    try:
        return json.loads(rank_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{rank_file}: unreadable ({e})") from None


def read_rank_states(ckpt: str | os.PathLike) -> list[dict]:
    """The states of every rank that wrote the checkpoint (to resume on another number of processes)."""
    world = read_meta(ckpt).get("world_size")
    if not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{ckpt}: meta.json has no valid world_size ({world!r})")
    return [read_rank_state(ckpt, r) for r in range(world)]


def load_model_weights(ckpt: str | os.PathLike, model) -> dict:
    """Model weights only, into a plain (unsharded) model, in one process (evaluation, export)."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    sd = model.state_dict()
    state = {"model": sd}
    with _quiet_single_process():
        dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)), planner=_partial_planner())
    model.load_state_dict(state["model"])
    return meta


def _partial_planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    # the optimizer state in the same files is not wanted here
    return DefaultLoadPlanner(allow_partial_load=True)
