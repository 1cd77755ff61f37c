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
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from normscale.config import ConfigError, TaskConfig
from normscale.settings.network_io import NetworkIO


class Setting(ABC):
    """A task family for one TaskConfig; a subclass sets the class attributes and implements every abstract method
    (instantiating one that misses any fails at once, naming them)."""

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

    @abstractmethod
    def batch_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """Shapes of a batch of `batch_size` sequences (batch_arrays' keys)."""

    @abstractmethod
    def task_shapes(self, num: int) -> dict[str, tuple[int, ...]]:
        """Shapes of `num` tasks' parameter arrays (draw_tasks' keys)."""

    def check(self, num_tasks: int) -> None:
        """Raise ConfigError where the TaskConfig cannot be used (before any data is made); the compact storage dtypes
        must hold every value. `num_tasks`: the largest task pool (training or OOD)."""
        if num_tasks >= 2**31:
            raise ConfigError(f"{num_tasks} tasks do not fit int32 task ids")

    @abstractmethod
    def draw_tasks(self, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`num` task parameter sets from the task prior p(theta), float64 (labels int64)."""

    @abstractmethod
    def sample(self, tasks: dict[str, torch.Tensor], task_ids: torch.Tensor, generator: torch.Generator,
               context_weights: torch.Tensor, exclude_query: bool = False) -> dict[str, torch.Tensor]:
        """One sequence per entry of `task_ids`, drawn i.i.d. given its task (the torch dtypes of batch_arrays).
        `context_weights` (D,) is the pool's task prior (settings whose context mixes tasks draw from it);
        `exclude_query` keeps the query's task out of the context (settings with an "iwl" split)."""

    @property
    @abstractmethod
    def tokens_per_sequence(self) -> int:
        """Tokens a sequence counts for in `tokens_seen`."""

    # ------------------------------------------------------------------ networks

    @property
    @abstractmethod
    def network_io(self) -> NetworkIO:
        """What a trained network of this setting reads and predicts."""

    # ------------------------------------------------------------------ scoring

    @abstractmethod
    def objective(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) the training objective of each sequence, from a network's raw outputs."""

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """A network's raw outputs in the shared convention, float32."""
        return outputs.float()

    @abstractmethod
    def pointwise(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss", metric}: (N, P) per sequence and position."""

    @abstractmethod
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, P) distance between two predictions."""

    @abstractmethod
    def mixture(self, m: torch.Tensor, g: torch.Tensor, w_m: float) -> torch.Tensor:
        """The prediction w_M M + (1 - w_M) G."""

    @abstractmethod
    def labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What is predicted (eval_kwargs.return_all saves it beside the predictions)."""

    @abstractmethod
    def strategy_loss(self, pointwise: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, P) SPEC D's loss L_s of a strategy's predictions, from their pointwise metrics."""

    # ------------------------------------------------------------------ predictors

    @abstractmethod
    def predictor(self, kind: str, tasks: dict | None = None, log_prior: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float64, chunk_elements: int | None = None) -> torch.nn.Module:
        """The `kind` Bayes predictor (normscale.settings.bayes.BayesPredictor); memorizing needs the D training tasks
        and their log prior."""


class SymbolSequence(Setting):
    """Settings whose sequence is a start token (V) then C symbols out of V, each predicted from those before it
    (balls_and_urns; tests/toy_setting.py): the batch layout, what a network reads and predicts (V+1 logits at every
    position), its objective (next-token cross-entropy over the V+1 outputs), the predictions (log-probabilities
    over the V symbols: the start token's class dropped, the rest renormalised) and their comparison. The symbols
    and their tasks are the subclass's."""

    batch_arrays = {"tokens": (np.uint8, torch.int64), "task_ids": (np.int32, torch.int64)}

    def batch_shapes(self, batch_size):
        return {"tokens": (batch_size, self.task.context_length + 1), "task_ids": (batch_size,)}

    def check(self, num_tasks):
        super().check(num_tasks)
        if self.task.num_dims + 1 > 255:
            raise ConfigError(f"task_kwargs.num_dims={self.task.num_dims} symbols do not fit uint8 token storage "
                              "(max 254)")

    @property
    def tokens_per_sequence(self):
        return self.task.context_length + 1

    @property
    def network_io(self):
        V = self.task.num_dims
        return NetworkIO(inputs="ids", input_size=V + 1, context_length=self.task.context_length, output_size=V + 1,
                         predicts="every", read=lambda batch: batch["tokens"][:, :-1])

    def objective(self, outputs, batch):
        return F.cross_entropy(outputs.transpose(1, 2).float(), batch["tokens"][:, 1:], reduction="none").mean(1)

    def predictions(self, outputs):
        return torch.log_softmax(outputs[..., :self.task.num_dims].float(), dim=-1)

    def next_symbol_nll(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, C) negative log-likelihood of each next symbol."""
        return -predictions.gather(-1, batch["tokens"][:, 1:, None]).squeeze(-1)

    def distance(self, a, b):
        return categorical_distance(a, b)

    def mixture(self, m, g, w_m):
        return categorical_mixture(m, g, w_m)

    def labels(self, batch):
        return batch["tokens"][:, 1:]


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
