"""MixtureDataset: the D training tasks under their task prior, step-indexed, and the saved eval splits.

Batch i is a pure function of (data seed, i): it is drawn from its own counter-based stream, so a resumed run,
every width of a sweep and the HDF5 shards all see the same batch at step i without replaying earlier steps.
What a task and a sequence are is the setting's (normscale.settings): this module only mixes and splits.
"""
from __future__ import annotations

import numpy as np
import torch

from normscale.data.priors import constant_freq_task_ids, task_prior_weights
from normscale.data.seeds import numpy_generator, torch_generator
from normscale.settings.base import Setting


def draw_task_pools(setting: Setting, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """The D training tasks and the OOD tasks, from independent streams of the data seed."""
    task = setting.task
    return {"train": setting.draw_tasks(task.num_tasks, numpy_generator(seed, "tasks")),
            "ood": setting.draw_tasks(task.num_ood_tasks, numpy_generator(seed, "ood_tasks"))}


class MixtureDataset:
    """Sequences from a pool of tasks mixed by a task prior; `batch(step)` is the global batch of that step."""

    def __init__(self, setting: Setting, tasks: dict[str, np.ndarray], prior: str, batch_size: int, seed: int,
                 device: str | torch.device = "cpu"):
        self.setting, self.prior, self.batch_size, self.seed = setting, prior, batch_size, seed
        self.device = torch.device(device)
        self.tasks = {k: torch.as_tensor(v, device=self.device) for k, v in tasks.items()}
        self.num_tasks = len(next(iter(tasks.values())))
        self.weights = torch.as_tensor(task_prior_weights(prior, self.num_tasks, setting.task.prior_exponent),
                                       device=self.device)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        generator = torch_generator(self.seed, "train", step, device=self.device)
        if self.prior == "constant_freq":
            ids = constant_freq_task_ids(step * self.batch_size, self.batch_size, self.num_tasks, self.seed, self.device)
        else:
            ids = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=generator)
        return self.setting.sample(self.tasks, ids, generator, self.weights)

    def sample(self, num: int, stream: str, exclude_query: bool = False) -> dict[str, torch.Tensor]:
        """`num` sequences with task ids drawn from the prior's marginal weights, from their own named stream."""
        generator = torch_generator(self.seed, stream, device=self.device)
        ids = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        return self.setting.sample(self.tasks, ids, generator, self.weights, exclude_query)

    def with_task_params(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` and its sequences' task parameters (the setting's sequence_task_params)."""
        ids = batch["task_ids"]
        return batch | {name: self.tasks[source][ids] for name, source in self.setting.sequence_task_params.items()}


def make_eval_splits(setting: Setting, pools: dict[str, dict[str, np.ndarray]], size: int, seed: int,
                     block: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Block `block` of the setting's eval splits, `size` sequences each: id (the D tasks under the task prior), ood
    (fresh tasks, uniform), and iwl (the query's task kept out of the context) where the setting has it. Each split
    carries its sequences' task parameters. Every block has its own stream (seed, split, block): block 0 is the eval
    set datasets always had, and block b does not depend on how many blocks are made."""
    splits = {}
    for split in setting.eval_splits:
        pool, prior = (pools["ood"], "uniform") if split == "ood" else (pools["train"], setting.task.prior)
        dataset = MixtureDataset(setting, pool, prior, batch_size=size, seed=seed)
        stream = f"eval/{split}" if block == 0 else f"eval/{split}/block-{block}"
        batch = dataset.sample(size, stream, exclude_query=split == "iwl")
        splits[split] = {k: v.numpy() for k, v in dataset.with_task_params(batch).items()}
    return splits


def make_single_task_split(setting: Setting, pools: dict[str, dict[str, np.ndarray]], per_task: int,
                           seed: int) -> dict[str, np.ndarray]:
    """`per_task` sequences of each of the D training tasks in turn (task k's rows are k*per_task ...), for
    single_task evaluation; with its sequences' task parameters, like the other eval splits."""
    pool = pools["train"]
    D = len(next(iter(pool.values())))
    dataset = MixtureDataset(setting, pool, setting.task.prior, batch_size=per_task, seed=seed)
    ids = torch.arange(D).repeat_interleave(per_task)
    generator = torch_generator(seed, f"eval/single_task/{per_task}")
    batch = setting.sample(dataset.tasks, ids, generator, dataset.weights)
    return {k: v.numpy() for k, v in dataset.with_task_params(batch).items()}
