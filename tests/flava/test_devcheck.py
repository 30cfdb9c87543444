"""``run.check_devices`` (flava.devcheck) on CPU catches what only NCCL would reject: a host tensor planted in a
device group's collective, or a device tensor in the host group's, raises naming the collective; the trainer's own
collectives (the stop flag on the host group, the logged losses on the device group) pass. In-process, a
one-process gloo group standing for both groups' backends (the 2-process run under the check is
tests/flava/test_trainer_step.py::test_every_collective_of_a_run_gets_device_tensors)."""

import datetime

import pytest
import torch
import torch.distributed as dist

from flava import distributed as fd
from flava.devcheck import DeviceCheckError, device_check
from flava.distributed import DistInfo
from flava.metrics import log_record

from tests.ports import free_port


@pytest.fixture(scope="module")
def groups():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=1))
    host = dist.new_group(backend="gloo")
    yield host
    dist.destroy_process_group()


def _info(host_group) -> DistInfo:
    # world_size 2 takes the collective paths; the one-process group answers them
    return DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), host_group=host_group)


def test_the_trainers_collectives_pass(groups):
    info = _info(groups)
    with device_check([groups]) as seen:
        assert fd.any_rank(True, info) is True
        sums = {"loss": torch.ones((), device=info.device) * 2}
        rec = log_record(3, "pairs", sums, 1e-3, torch.ones((), device=info.device), info, info.device)
    assert rec["loss"] == 1.0 and rec["grad_norm"] == 1.0  # mean over the "2 ranks" of a 1-process sum
    assert seen == ["all_reduce", "all_reduce"]


def test_a_host_flag_on_the_device_group_raises(groups):
    """The planted mistake: the stop flag (a host tensor) reduced on the default group, as if no host group
    existed; on GPU that is NCCL, which has no CPU backend."""
    with device_check([groups]), pytest.raises(DeviceCheckError, match=r"host tensor\(s\) of shape \[\(1,\)\] "
                                                                          r"handed to dist.all_reduce"):
        fd.any_rank(True, _info(None))


def test_a_device_tensor_on_the_host_group_raises(groups):
    with device_check([groups]), pytest.raises(DeviceCheckError, match="device tensor.*host \\(gloo\\) group"):
        dist.all_reduce(torch.ones(2).to("cpu"), group=groups)
