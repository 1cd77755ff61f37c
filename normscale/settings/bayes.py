"""Bayes-optimal predictors (SPEC B): memorizing (M), generalizing (G) and Const. Each setting implements its own
(normscale/settings/<setting>.py) on the `BayesPredictor` base below, which checks the inputs and chunks the work;
`normscale.model.build_bayes` and a setting's `predictor(kind, ...)` build them.

A predictor is called like a trained model: `forward(batch)` takes a batch dict of its setting and returns
predictions in the shared convention (normscale.settings.base). Posteriors over tasks are softmaxes of
log-likelihood + log prior. M's D training tasks and log prior are buffers (`.to(device)` moves them; `.float()` makes
M compute in float32); G and Const compute in `dtype` on the inputs' device. Work is chunked over positions or
sequences so that a chunk's largest block holds at most `chunk_elements` entries, one row or sequence at least.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
from torch import nn

from normscale.config import BAYES_KINDS

CHUNK_ELEMENTS = 2**22  # entries of the largest per-chunk block: ~16 MiB float32, small enough to stay cache-friendly
PROB_CLIP = 1e-5


class BayesPredictor(nn.Module, metaclass=ABCMeta):
    """Base of every setting's predictors: checks kind, chunking and (memorizing) the tasks and prior, which
    `register_tasks` stores as buffers."""

    def __init__(self, setting, kind: str, tasks: dict | None = None, log_prior: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float64, chunk_elements: int | None = None):
        super().__init__()
        chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
        if kind not in BAYES_KINDS:
            raise ValueError(f"unknown Bayes predictor kind {kind!r}; choose one of: {', '.join(BAYES_KINDS)}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements={chunk_elements} must be >= 1")
        self.setting, self.task, self.kind, self.dtype = setting, setting.task, kind, dtype
        self.chunk_elements = chunk_elements
        self.dims = setting.task.num_dims
        if kind == "memorizing":
            self.register_tasks(self._checked_tasks(tasks, log_prior))

    def _checked_tasks(self, tasks: dict | None, log_prior) -> dict[str, torch.Tensor]:
        D = self.task.num_tasks
        shapes = self.setting.task_shapes(D)
        keys = tuple(shapes)
        if tasks is None or log_prior is None:
            raise ValueError(
                "the memorizing predictor needs the D training tasks and their prior: pass "
                f"tasks={{{', '.join(map(repr, keys))}: ...}} (the experiment's saved tasks, or draw_tasks(...)) "
                "and log_prior=log(task_prior_weights(prior, D, exponent))")
        missing = [k for k in keys if k not in tasks]
        if missing:
            raise ValueError(
                f"{self.setting.name} tasks need {', '.join(map(repr, keys))}; missing {missing} in {sorted(tasks)}")
        params = {k: torch.as_tensor(tasks[k]).to(torch.float64) for k in keys}
        log_prior = torch.as_tensor(log_prior).to(torch.float64)
        for name, value in [*params.items(), ("log_prior", log_prior)]:
            want = shapes.get(name, (D,))
            if tuple(value.shape) != want:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {want} from task num_tasks={D}, "
                                 f"num_dims={self.dims}; pass the tasks and prior of this TaskConfig")
        if abs(torch.logsumexp(log_prior, 0).item()) > 1e-6:
            raise ValueError("log_prior must be normalised log-probabilities (logsumexp 0); "
                             "pass log(task_prior_weights(...)), not the weights themselves")
        self.register_buffer("log_prior", log_prior.to(self.dtype))
        return params

    @abstractmethod
    def register_tasks(self, params: dict[str, torch.Tensor]) -> None:
        """Store the checked float64 task parameters as buffers (in `self.dtype`)."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predictions in the setting's convention."""

    @property
    def memorizing_dtype(self) -> torch.dtype:
        """M computes in its buffers' dtype (`.float()` switches it); G and Const in `dtype`."""
        return self.log_prior.dtype if self.kind == "memorizing" else self.dtype

    def extra_repr(self) -> str:
        return f"setting={self.setting.name}, kind={self.kind}, dims={self.dims}"

    def chunked(self, fn, n: int, per_row: int, *tensors: torch.Tensor):
        """fn over row chunks of `tensors` (first axis), each holding at most chunk_elements / per_row rows."""
        step = max(1, self.chunk_elements // per_row)
        outs = [fn(*(t[i:i + step] for t in tensors)) for i in range(0, n, step)]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)


def exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Entry t holds the sum of entries 0..t-1 along `dim` (entry 0 is zero)."""
    shifted = x.narrow(dim, 0, x.shape[dim] - 1)
    return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), shifted], dim=dim).cumsum(dim)
