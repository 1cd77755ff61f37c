"""The only place that knows ranks, launchers and cluster environment variables (DESIGN: dependency direction).

Everything below this layer (data/, model/) takes rank and world size as arguments.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_info(environ: dict | None = None) -> ProcessInfo:
    """This process's place in the job: torchrun/accelerate (RANK, WORLD_SIZE, LOCAL_RANK), else SLURM's
    srun tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return ProcessInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return ProcessInfo()
