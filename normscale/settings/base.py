"""The protocol every setting implements, and the pieces settings share.

A `Setting` is built for one TaskConfig and answers everything that differs between task families:

  data         batch_arrays (name -> stored and torch dtypes; every array has the sequence axis first, and these are
               the HDF5 dataset names), batch_shapes, check (config limits), draw_tasks (numpy, the task prior),
               sample (sequences given task ids, with a torch generator on its device: the HDF5 shards and the
               on-device batches alike), eval_splits, sequence_task_params (per-sequence task parameters saved with
               each eval split), tokens_per_sequence
  networks     network_io: what a trained network reads and predicts (normscale.settings.network_io)
  scoring      objective (the training loss of each sequence), predictions (raw outputs -> the shared convention
               below), pointwise (SPEC C's loss and task metric per sequence and position), distance, mixture,
               labels, strategy_loss (SPEC D's L_s per sequence and position, named by strategy_measure)
  predictors   predictor(kind, ...): the memorizing, generalizing or const Bayes predictor (SPEC B)

Predictions follow one convention for every model (trained, Bayes, LLM): categorical settings give log-probabilities
over their outcomes, regression gives the predicted values; per-position quantities are (N, P), P = 1 where only the
query is predicted. `loss` is always SPEC C's loss of the prediction (a negative log-likelihood or squared error);
the training objective is the network's own (over its raw outputs) and keeps its own name.
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from normscale.config import ConfigError, TaskConfig
from normscale.settings.network_io import NetworkIO


class Setting:
    name: ClassVar[str]
    batch_arrays: ClassVar[dict[str, tuple[type, torch.dtype]]]
    eval_splits: ClassVar[tuple[str, ...]] = ("id", "ood")
    sequence_task_params: ClassVar[dict[str, str]]  # eval-split array name -> task array it is taken from
    metric: ClassVar[str]  # the task metric pointwise() gives besides "loss"
    strategy_measure: ClassVar[str]  # what strategy_loss() measures, in words

    def __init__(self, task: TaskConfig):
        self.task = task

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.task})"

    # ------------------------------------------------------------------ data

    def batch_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def task_shapes(self, num: int) -> dict[str, tuple[int, ...]]:
        """Shapes of `num` tasks' parameter arrays (draw_tasks' keys)."""
        raise NotImplementedError

    def check(self, num_tasks: int) -> None:
        """Raise ConfigError where the TaskConfig cannot be used (before any data is made); the compact storage dtypes
        must hold every value. `num_tasks`: the largest task pool (training or OOD)."""
        if num_tasks >= 2**31:
            raise ConfigError(f"{num_tasks} tasks do not fit int32 task ids")

    def draw_tasks(self, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`num` task parameter sets from the task prior p(theta), float64 (labels int64)."""
        raise NotImplementedError

    def sample(self, tasks: dict[str, torch.Tensor], task_ids: torch.Tensor, generator: torch.Generator,
               context_weights: torch.Tensor, exclude_query: bool = False) -> dict[str, torch.Tensor]:
        """One sequence per entry of `task_ids`, drawn i.i.d. given its task (the torch dtypes of batch_arrays).
        `context_weights` (D,) is the pool's task prior (settings whose context mixes tasks draw from it);
        `exclude_query` keeps the query's task out of the context (settings with an "iwl" split)."""
        raise NotImplementedError

    @property
    def tokens_per_sequence(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ networks

    @property
    def network_io(self) -> NetworkIO:
        raise NotImplementedError

    # ------------------------------------------------------------------ scoring

    def objective(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) the training objective of each sequence, from a network's raw outputs."""
        raise NotImplementedError

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """A network's raw outputs in the shared convention, float32."""
        return outputs.float()

    def pointwise(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss", metric}: (N, P) per sequence and position."""
        raise NotImplementedError

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, P) distance between two predictions."""
        raise NotImplementedError

    def mixture(self, m: torch.Tensor, g: torch.Tensor, w_m: float) -> torch.Tensor:
        """The prediction w_M M + (1 - w_M) G."""
        raise NotImplementedError

    def labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What is predicted (eval_kwargs.return_all saves it beside the predictions)."""
        raise NotImplementedError

    def strategy_loss(self, pointwise: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, P) SPEC D's loss L_s of a strategy's predictions, from their pointwise metrics."""
        raise NotImplementedError

    # ------------------------------------------------------------------ predictors

    def predictor(self, kind: str, tasks: dict | None = None, log_prior: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float64, chunk_elements: int | None = None) -> torch.nn.Module:
        """The `kind` Bayes predictor (normscale.settings.bayes.BayesPredictor); memorizing needs the D training tasks
        and their log prior."""
        raise NotImplementedError


# ---------------------------------------------------------------------- shared by the categorical settings

def categorical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetrised KL 1/2 [KL(a||b) + KL(b||a)] = 1/2 sum (p_a - p_b)(log p_a - log p_b) over the last axis."""
    return 0.5 * ((a.exp() - b.exp()) * (a - b)).sum(-1)


def categorical_mixture(m: torch.Tensor, g: torch.Tensor, w_m: float) -> torch.Tensor:
    """log(w_M p_M + (1 - w_M) p_G) of log-probabilities."""
    if w_m <= 0 or w_m >= 1:
        return (m if w_m >= 1 else g).clone()
    return torch.logaddexp(m + math.log(w_m), g + math.log1p(-w_m))


def require(batch: dict, key: str, ndim: int, layout: str, setting: str) -> torch.Tensor:
    """batch[key], which must exist with `ndim` dimensions (`layout` describes it in the error)."""
    if key not in batch:
        raise ValueError(f"{setting} batch needs {key!r} {layout}; got keys {sorted(batch)}")
    value = batch[key]
    if value.ndim != ndim:
        raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)}, expected {layout}")
    return value
