"""Process setup for `flava train`: torchrun's environment -> device, process group and ranks; FSDP2 sharding.

Nothing here assumes one node: the device comes from ``LOCAL_RANK`` (the process's index on its machine), data
sharding and "who writes" from the global ``RANK``; the process group is formed from torchrun's rendezvous
(``--standalone`` on one node, ``--rdzv_backend c10d --rdzv_endpoint HOST:PORT`` across nodes).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .model import FlavaForPretraining
from .run_config import ConfigError


@dataclass
class DistInfo:
    rank: int  # global rank: data shard, the one writer (rank 0)
    world_size: int
    local_rank: int  # index on this node: the GPU
    device: torch.device
    # a gloo group beside the default one, for the host-side flags of the loop (the stop request): a flag on the
    # device would cost a device->host sync every step, and NCCL takes no host tensor
    host_group: object = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str = "auto", timeout_minutes: int = 60) -> DistInfo:
    """Reads torchrun's environment; NCCL on GPU, gloo on CPU. A single process needs no process group.
    ``timeout_minutes`` bounds every collective (``run.dist_timeout_minutes``; NCCL's default is 10)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if local_world > 1:  # share the cores instead of oversubscribing them N times
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    host_group = None
    if world > 1:
        host_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world, local_rank, device, host_group)


def launch_local(args: list[str], nproc: int) -> int:
    """``python ARGS`` as ``nproc`` processes on this machine under torchrun (``--standalone``); its exit status.
    Each process gets one OpenMP thread unless OMP_NUM_THREADS says otherwise, and tokenizers no thread pool."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(cmd, env=env)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on one. Asked every step, so on the host: a host tensor in the gloo
    ``host_group`` (a device tensor would make the host wait for the device every step, and NCCL, the default
    group on GPU, takes no host tensor)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.host_group)
    return bool(t.item())


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def require_shared(path: Path, info: DistInfo, what: str) -> None:
    """After rank 0 wrote ``path`` and a barrier: every rank must see it, or the run directory is not on storage
    all nodes share (DCP checkpoints, the tokenizer and resume all rely on that)."""
    if not path.exists():
        raise ConfigError(
            f"rank {info.rank} (local rank {info.local_rank}) cannot see {path}, written by rank 0: {what} must be "
            "on storage that every node sees (a shared filesystem), not a node-local disk"
        )


def shard_model(model: FlavaForPretraining, dtype: torch.dtype, reshard_after_forward: bool = True) -> None:
    """FSDP2: every transformer layer, every encoder (its embeddings and final norm), every head and projection,
    then the root. Under bf16 the root keeps fp32 parameters: all it still holds is ``logit_scale``, whose bf16
    value moves in steps of 1.5-3% of the temperature (the other units compute in bf16, see docs/pretrain.md).
    The codebook is not part of the model, so never sharded or optimised. ``reshard_after_forward=False``
    (``run.reshard_after_forward``) keeps each unit's gathered weights until its backward; with
    ``forward_backward(reshard=False)`` until the step's last backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
    kw = {"mp_policy": mp} if mp is not None else {}
    kw["reshard_after_forward"] = reshard_after_forward
    for layer in model.transformer_layers():
        fully_shard(layer, **kw)
    for enc in model.encoders():
        fully_shard(enc, **kw)
    for head in model.heads():
        fully_shard(head, **kw)
    root_mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(model, mp_policy=root_mp)
