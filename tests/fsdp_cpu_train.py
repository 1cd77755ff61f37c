"""Test-only entry: `accelerate launch --config_file launch/fsdp.yaml --num_processes 2 tests/fsdp_cpu_train.py <overrides>`.

Accelerate ignores its FSDP plugin without GPUs (INFRA.md; normscale refuses that launch). This entry starts the
processes as a CPU data-parallel launch (ACCELERATE_USE_CPU, gloo), wraps normscale's real make_accelerator and
switches the Accelerator it returns to accelerate's FSDP2 path, with the plugin the launch file configured, before
normscale.train's real loop prepares the model. Never for use outside tests.
"""
import os

from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import normscale.train
from normscale.dist.accel import make_accelerator


def make_fsdp_accelerator(config):
    accelerator = make_accelerator(config)
    assert accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.MULTI_CPU, \
        (accelerator.num_processes, accelerator.distributed_type)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch file's FSDP_* variables
    return accelerator


os.environ["ACCELERATE_USE_CPU"] = "true"  # a CPU process group (gloo) as launch/cpu.sh gets, then FSDP on top
normscale.train.make_accelerator = make_fsdp_accelerator
normscale.train.main()
