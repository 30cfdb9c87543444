"""``run.check_devices``: a CPU rehearsal of the device placement an NCCL run needs.

On a GPU every tensor handed to a collective of the default (NCCL) group must be on the GPU: NCCL has no CPU
backend, so a host tensor there fails only on the first multi-GPU run. Gloo, the CPU tests' backend, takes either
and hides the mistake. Under ``device_check`` a CPU run tells the two apart as a GPU run would:

* ``HostTensors`` tags every tensor the project (``flava/``) creates without a device as a host tensor, and
  everything computed from one; ``.to(device)`` makes it a device tensor (what a GPU run's ``.to("cuda")`` does);
* every collective of ``torch.distributed`` is wrapped: a host tensor handed to a group other than the loop's
  host group (``DistInfo.host_group``, gloo on GPU too), or a device tensor handed to that host group, raises
  ``DeviceCheckError`` naming the collective and the tensor's shape.

Costs a Python call per torch op: a debugging and CI switch, off by default.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
              torch.rand, torch.randn, torch.randint, torch.linspace}
# (all_gather_single: FSDP2's all-gather in newer torch; names a torch lacks are skipped)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
               "reduce_scatter", "broadcast", "reduce", "all_to_all_single", "gather", "scatter")
_FLAVA_DIR = os.path.dirname(os.path.abspath(__file__))


class DeviceCheckError(RuntimeError):
    pass


def is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, "_host_tensor", False)


class HostTensors(TorchFunctionMode):
    """Tags host tensors as a GPU run would place them (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            host = kwargs.get("device") is None and sys._getframe(1).f_code.co_filename.startswith(_FLAVA_DIR)
        elif func in (torch.Tensor.to, torch.Tensor.cuda):
            moved = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])
            host = is_host(args[0]) and not moved
        else:
            host = any(is_host(t) for t in pytree.tree_flatten((args, kwargs))[0])
        for t in pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                with contextlib.suppress(AttributeError, RuntimeError):
                    t._host_tensor = host
        return out


def _checked(name, fn, host_groups, seen):
    def wrapper(*args, **kwargs):
        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        on_host = group is not None and any(group is g for g in host_groups)
        tensors = [t for t in pytree.tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        seen.append(name)
        wrong = [tuple(t.shape) for t in tensors if is_host(t) != on_host]
        if wrong:
            where = "the host (gloo) group" if on_host else "a device (NCCL on GPU) group"
            kind = "device" if on_host else "host"
            raise DeviceCheckError(f"{kind} tensor(s) of shape {wrong} handed to dist.{name} on {where}")
        return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def device_check(host_groups=(), seen: list | None = None):
    """Tag host tensors and check every collective's tensors against its group while inside; ``seen`` collects
    the names of the collectives called (a test can then tell that the check was exercised)."""
    seen = [] if seen is None else seen
    groups = tuple(g for g in host_groups if g is not None)
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    for name, fn in originals.items():
        setattr(dist, name, _checked(name, fn, groups, seen))
    try:
        with HostTensors():
            yield seen
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
