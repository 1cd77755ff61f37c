"""The three settings' data-generating processes (SPEC A).

`draw_tasks` draws task parameters once (numpy, float64). `sample_sequences` draws sequences given each
sequence's task id, with a torch generator on the generator's device: the same function makes the HDF5
shards (CPU) and the on-device `data_kwargs.source=generate` batches.

Batch layout (every array has the sequence axis first; these names are the HDF5 dataset names too):
  balls_and_urns     tokens (B, C+1) int64, tokens[:, 0] = V is the start token; task_ids (B,)
  linear_regression  xs (B, C, d) float32; ys (B, C) float32; task_ids (B,)
  classification     xs (B, C, d) float32 noised items, the query last; labels (B, C) int64 with labels[:, -1] = -1;
                     query_labels (B,) int64; exemplar_ids (B, C) int64; task_ids (B,) = the query's exemplar
Task parameters: balls_and_urns theta (D, V); linear_regression w (D, d); classification x (D, d), y (D,).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from normscale.config import TaskConfig

# Arrays of a batch per setting, with the dtype they are stored in (compact) and used in (torch).
BATCH_ARRAYS: dict[str, dict[str, tuple[np.dtype, torch.dtype]]] = {
    "balls_and_urns": {"tokens": (np.uint8, torch.int64), "task_ids": (np.int32, torch.int64)},
    "linear_regression": {"xs": (np.float32, torch.float32), "ys": (np.float32, torch.float32),
                          "task_ids": (np.int32, torch.int64)},
    "classification": {"xs": (np.float32, torch.float32), "labels": (np.int8, torch.int64),
                       "query_labels": (np.uint8, torch.int64), "exemplar_ids": (np.int32, torch.int64),
                       "task_ids": (np.int32, torch.int64)},
}
TASK_ARRAYS = {"balls_and_urns": ("theta",), "linear_regression": ("w",), "classification": ("x", "y")}


def batch_shapes(setting: str, task: TaskConfig, batch_size: int) -> dict[str, tuple[int, ...]]:
    B, C, d = batch_size, task.context_length, task.num_dims
    return {
        "balls_and_urns": {"tokens": (B, C + 1), "task_ids": (B,)},
        "linear_regression": {"xs": (B, C, d), "ys": (B, C), "task_ids": (B,)},
        "classification": {"xs": (B, C, d), "labels": (B, C), "query_labels": (B,), "exemplar_ids": (B, C),
                           "task_ids": (B,)},
    }[setting]


def check_storable(setting: str, task: TaskConfig, num_tasks: int) -> None:
    """The compact storage dtypes must hold every value (uint8 tokens, int32 ids)."""
    if setting == "balls_and_urns" and task.num_dims + 1 > 255:
        raise ValueError(f"task_kwargs.num_dims={task.num_dims} colours do not fit uint8 token storage (max 254)")
    if num_tasks >= 2**31:
        raise ValueError(f"{num_tasks} tasks do not fit int32 task ids")


def draw_tasks(setting: str, task: TaskConfig, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`num` task parameter sets from the setting's task prior p(theta), float64 (labels int64)."""
    d = task.num_dims
    if setting == "balls_and_urns":
        return {"theta": rng.dirichlet(np.full(d, task.dirichlet_alpha), size=num)}
    if setting == "linear_regression":
        return {"w": rng.normal(0.0, math.sqrt(task.weight_variance), size=(num, d))}
    if setting == "classification":
        return {"x": rng.normal(0.0, math.sqrt(1.0 / d), size=(num, d)), "y": rng.integers(0, 2, size=num)}
    raise ValueError(f"unknown setting {setting!r}")


def sample_sequences(setting: str, task: TaskConfig, tasks: dict[str, torch.Tensor], task_ids: torch.Tensor,
                     generator: torch.Generator, context_weights: torch.Tensor | None = None,
                     exclude_query: bool = False) -> dict[str, torch.Tensor]:
    """One sequence per entry of `task_ids`, drawn i.i.d. given its task (torch dtypes of BATCH_ARRAYS).

    classification: `context_weights` (D,) is the task prior the C-1 context exemplars are drawn from; the query's
    exemplar (task_ids) is placed at a uniformly random context slot, or excluded from the context
    (`exclude_query`, the IWL split).
    """
    device, B, C, d = task_ids.device, len(task_ids), task.context_length, task.num_dims
    g = {"generator": generator, "device": device}
    if setting == "balls_and_urns":
        draws = torch.multinomial(tasks["theta"][task_ids], C, replacement=True, generator=generator)
        start = torch.full((B, 1), d, dtype=torch.int64, device=device)
        return {"tokens": torch.cat([start, draws], dim=1), "task_ids": task_ids}
    if setting == "linear_regression":
        xs = torch.randn(B, C, d, **g)
        noise = torch.randn(B, C, **g) * math.sqrt(task.sigma2)
        ys = torch.einsum("bcd,bd->bc", xs, tasks["w"][task_ids].float()) + noise
        return {"xs": xs, "ys": ys, "task_ids": task_ids}
    if setting == "classification":
        if context_weights is None:
            raise ValueError("classification needs context_weights: the task prior (D,) the context exemplars are drawn from")
        if exclude_query and len(context_weights) < 2:
            raise ValueError("exclude_query (the IWL split) needs at least 2 exemplars: one for the query, one for the context")
        weights = context_weights.to(device=device, dtype=torch.float64).expand(B, -1)
        if exclude_query:
            weights = weights.scatter(1, task_ids[:, None], 0.0)
        context = torch.multinomial(weights, C - 1, replacement=True, generator=generator)
        if not exclude_query:
            slot = torch.randint(0, C - 1, (B, 1), **g)
            context = context.scatter(1, slot, task_ids[:, None])
        exemplar_ids = torch.cat([context, task_ids[:, None]], dim=1)
        w = task.exemplar_noise
        noise = torch.randn(B, C, d, **g) * math.sqrt(w / d)
        xs = (tasks["x"][exemplar_ids].float() + noise) / math.sqrt(1 + w)
        labels = tasks["y"][exemplar_ids].clone()
        labels[:, -1] = -1
        return {"xs": xs, "labels": labels, "query_labels": tasks["y"][task_ids], "exemplar_ids": exemplar_ids,
                "task_ids": task_ids}
    raise ValueError(f"unknown setting {setting!r}")
