"""Task priors over the D training tasks (SPEC A): how often each task is used."""
from __future__ import annotations

import numpy as np
import torch

from normscale.data.seeds import torch_generator


def task_prior_weights(prior: str, num_tasks: int, exponent: float = 1.0) -> np.ndarray:
    """Marginal probability of each task (float64, sums to 1). power_law: (k+1)^-a, decreasing in k.

    constant_freq is uniform in marginal; its exact per-round counts come from `constant_freq_task_ids`.
    """
    if prior in ("uniform", "constant_freq"):
        return np.full(num_tasks, 1.0 / num_tasks)
    if prior == "power_law":
        weights = np.arange(1, num_tasks + 1, dtype=np.float64) ** -float(exponent)
        return weights / weights.sum()
    raise ValueError(f"unknown task prior {prior!r}; choose one of: uniform, power_law, constant_freq")


def constant_freq_task_ids(first: int, count: int, num_tasks: int, seed: int, device="cpu") -> torch.Tensor:
    """Task ids of global sequences first..first+count-1 laid out as shuffled rounds of all D tasks.

    Round r covers sequences r*D..(r+1)*D-1 and is a permutation drawn from (seed, r) alone, so any
    window of sequences is reproducible without generating the ones before it.
    """
    rounds = range(first // num_tasks, (first + count - 1) // num_tasks + 1)
    perms = [torch.randperm(num_tasks, generator=torch_generator(seed, "round", r, device=device), device=device)
             for r in rounds]
    offset = first - rounds[0] * num_tasks
    return torch.cat(perms)[offset:offset + count]
