"""How much memory a pack needs, estimated before anything is built, and how many runs fit the device: pack=N is
refused when it does not fit, and pack=auto picks N from it.

One run's step is traced on the meta device (no memory, no arithmetic): the bytes of every tensor autograd saves for
the backward pass are its activations. A stacked pack holds N runs' activations at once; runs in turn hold one
run's. Each run also holds its weights, gradients and AdamW moments in the stack and, synced from it, in its solo
model and optimizer (7 copies of its parameters; in turn: 4). A margin covers the backward's transients.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from normscale.config import Config, ConfigError
from normscale.model import build_model
from normscale.settings import get as get_setting

MARGIN = 1.25
USABLE = 0.9  # of the free memory


@dataclass(frozen=True)
class RunMemory:
    activations: int  # bytes one step keeps for its backward
    parameters: int  # bytes of one copy of the parameters

    def per_run(self, stacked: bool) -> int:
        """Bytes each run of a pack adds: its parameter copies, and its activations when stacked."""
        return (self.activations if stacked else 0) + (7 if stacked else 4) * self.parameters

    def shared(self, stacked: bool) -> int:
        """Bytes a pack needs whatever its size: the one run's activations of runs in turn."""
        return 0 if stacked else self.activations

    def pack(self, num_runs: int, stacked: bool) -> int:
        """Bytes a pack of num_runs needs."""
        return int(MARGIN * (self.shared(stacked) + num_runs * self.per_run(stacked)))


def run_memory(config: Config) -> RunMemory:
    setting = get_setting(config.setting, config.task_kwargs)
    with torch.device("meta"):
        model = build_model(config)
        used = setting.batch_arrays
        batch = {name: torch.zeros(shape, dtype=used[name][1] if name in used else torch.int64)
                 for name, shape in setting.batch_shapes(config.training_kwargs.batch_size).items()}
    saved = []

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        setting.objective(model(batch), batch).mean()
    return RunMemory(sum(saved), sum(p.numel() * p.element_size() for p in model.parameters()))


def free_bytes(device: torch.device) -> int:
    """Free memory of a GPU, or the memory available to this machine's processes."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gib(num_bytes: int) -> str:
    return f"{num_bytes / 2 ** 30:.2f} GiB"


def largest_fitting(memory: RunMemory, stacked: bool, free: int) -> int:
    """The most runs whose pack fits USABLE of `free` bytes (0: not even one): RunMemory.pack solved for N."""
    return max(0, int((USABLE * free / MARGIN - memory.shared(stacked)) // memory.per_run(stacked)))


def check_fits(config: Config, num_runs: int, stacked: bool, device: torch.device) -> None:
    """Refuse (ConfigError) a pack of num_runs runs shaped like `config` that would not fit the device."""
    memory, free = run_memory(config), free_bytes(device)
    need = memory.pack(num_runs, stacked)
    if need > USABLE * free:
        fits = largest_fitting(memory, stacked, free)
        raise ConfigError(
            f"pack={config.pack}: {num_runs} run(s) {'stacked' if stacked else 'in turn'} need about {gib(need)} "
            f"(per run: {gib(memory.activations)} of activations, {gib(memory.parameters)} of parameters, held "
            f"{7 if stacked else 4} times) but {device.type} has {gib(free)} free; use pack={max(fits, 1)}"
            + ("" if fits else " (one run alone does not fit either: a smaller batch_size or model)") + " or pack=auto")


def auto_size(config: Config, num_runs: int, device: torch.device) -> int:
    """pack=auto: 1 on a CPU (its runs in turn, or as parallel processes, are faster there: bench/bench_pack.py);
    on a GPU, as many of the num_runs runs as fit stacked."""
    if device.type != "cuda":
        return 1
    return max(1, min(num_runs, largest_fitting(run_memory(config), True, free_bytes(device))))
