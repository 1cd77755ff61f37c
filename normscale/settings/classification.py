"""Classification (SPEC A3, B3, C): D exemplars x with labels y in {0, 1}; a sequence is C-1 noised context items
with their labels, then a noised query whose label is predicted.

Batch: xs (B, C, d) float32 noised items, the query last; labels (B, C) int64 with labels[:, -1] = -1; query_labels
(B,) int64; exemplar_ids (B, C) int64; task_ids (B,) = the query's exemplar. Tasks: x (D, d), y (D,).
The context exemplars are drawn from the task prior; the query's exemplar sits at a uniformly random context slot,
or (IWL split) is kept out of the context. A network reads the pairs (x~, 2l - 1) and gives (B, 2) logits at the
query; predictions are their log-probabilities, `loss` (and the objective) the query's cross-entropy, the task metric
its `accuracy`; per-position arrays have P = 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from normscale.config import ConfigError
from normscale.settings.bayes import PROB_CLIP, BayesPredictor
from normscale.settings.network_io import NetworkIO
from normscale.settings.base import Setting, categorical_distance, categorical_mixture, require


class Classification(Setting):
    name = "classification"
    batch_arrays = {"xs": (np.float32, torch.float32), "labels": (np.int8, torch.int64),
                    "query_labels": (np.uint8, torch.int64), "exemplar_ids": (np.int32, torch.int64),
                    "task_ids": (np.int32, torch.int64)}
    eval_splits = ("id", "ood", "iwl")
    sequence_task_params = {"query_x": "x", "query_y": "y"}
    metric = "accuracy"
    strategy_measure = "ce"

    def batch_shapes(self, batch_size):
        B, C, d = batch_size, self.task.context_length, self.task.num_dims
        return {"xs": (B, C, d), "labels": (B, C), "query_labels": (B,), "exemplar_ids": (B, C), "task_ids": (B,)}

    def task_shapes(self, num):
        return {"x": (num, self.task.num_dims), "y": (num,)}

    def check(self, num_tasks):
        super().check(num_tasks)
        if self.task.context_length < 2:
            raise ConfigError("task_kwargs.context_length must be >= 2 for classification (context items plus the query)")
        if self.task.num_tasks < 2:
            raise ConfigError("task_kwargs.num_tasks must be >= 2 for classification (the IWL split excludes the "
                              "query's exemplar)")

    def draw_tasks(self, num, rng):
        d = self.task.num_dims
        return {"x": rng.normal(0.0, math.sqrt(1.0 / d), size=(num, d)), "y": rng.integers(0, 2, size=num)}

    def sample(self, tasks, task_ids, generator, context_weights, exclude_query=False):
        device, B, C, d = task_ids.device, len(task_ids), self.task.context_length, self.task.num_dims
        if exclude_query and len(context_weights) < 2:
            raise ValueError("exclude_query (the IWL split) needs at least 2 exemplars: one for the query, one for the context")
        weights = context_weights.to(device=device, dtype=torch.float64).expand(B, -1)
        if exclude_query:
            weights = weights.scatter(1, task_ids[:, None], 0.0)
        context = torch.multinomial(weights, C - 1, replacement=True, generator=generator)
        if not exclude_query:
            slot = torch.randint(0, C - 1, (B, 1), generator=generator, device=device)
            context = context.scatter(1, slot, task_ids[:, None])
        exemplar_ids = torch.cat([context, task_ids[:, None]], dim=1)
        w = self.task.exemplar_noise
        noise = torch.randn(B, C, d, generator=generator, device=device) * math.sqrt(w / d)
        xs = (tasks["x"][exemplar_ids].float() + noise) / math.sqrt(1 + w)
        labels = tasks["y"][exemplar_ids].clone()
        labels[:, -1] = -1
        return {"xs": xs, "labels": labels, "query_labels": tasks["y"][task_ids], "exemplar_ids": exemplar_ids,
                "task_ids": task_ids}

    @property
    def tokens_per_sequence(self):
        return 2 * self.task.context_length - 1

    @property
    def network_io(self):
        return NetworkIO(inputs="pairs", input_size=self.task.num_dims, context_length=self.task.context_length,
                         output_size=2, predicts="last",
                         read=lambda batch: (batch["xs"], (2 * batch["labels"] - 1).to(batch["xs"].dtype)))

    def objective(self, outputs, batch):
        return F.cross_entropy(outputs.float(), batch["query_labels"], reduction="none")

    def predictions(self, outputs):
        return torch.log_softmax(outputs.float(), dim=-1)

    def pointwise(self, predictions, batch):
        labels = batch["query_labels"]
        return {"loss": -predictions.gather(-1, labels[:, None]),
                "accuracy": (predictions.argmax(-1) == labels).float()[:, None]}

    def distance(self, a, b):
        return categorical_distance(a, b)[:, None]

    def mixture(self, m, g, w_m):
        return categorical_mixture(m, g, w_m)

    def labels(self, batch):
        return batch["query_labels"]

    def strategy_loss(self, pointwise, batch):
        return pointwise["loss"]

    def predictor(self, kind, tasks=None, log_prior=None, dtype=torch.float64, chunk_elements=None):
        return ClassificationPredictor(self, kind, tasks, log_prior, dtype, chunk_elements)


class ClassificationPredictor(BayesPredictor):
    """(B, 2) log-probabilities of the query's label, clipped to [1e-5, 1 - 1e-5] before the log. Chunked over
    sequences ((b, D, d) blocks for M, (b, C, d) for G)."""

    def register_tasks(self, params):
        if not ((params["y"] == 0) | (params["y"] == 1)).all():
            raise ValueError("classification task labels y must be 0 or 1")
        self.register_buffer("x", params["x"].to(self.dtype))
        self.register_buffer("y", params["y"].to(self.dtype))

    def forward(self, batch):
        query, context, labels = self.inputs(batch)
        if self.kind == "memorizing":
            p1 = self.chunked(self._memorizing, len(query), len(self.x) * self.dims, query)
        elif self.kind == "generalizing":
            p1 = self.chunked(self._generalizing, len(query), context.shape[1] * self.dims, query, context, labels)
        else:
            p1 = query.new_full((len(query),), 0.5, dtype=self.dtype)
        p1 = p1.clamp(PROB_CLIP, 1 - PROB_CLIP)
        return torch.stack([torch.log1p(-p1), torch.log(p1)], dim=-1)

    def inputs(self, batch):
        xs = require(batch, "xs", 3, "(B, C, d) float, the query last", self.setting.name)
        labels = require(batch, "labels", 2, "(B, C) int with labels[:, -1] = -1", self.setting.name)
        if xs.shape[2] != self.dims or labels.shape != xs.shape[:2] or xs.shape[1] < 2:
            raise ValueError(f"xs {tuple(xs.shape)} and labels {tuple(labels.shape)} must be (B, C, d={self.dims}) "
                             "and (B, C) with C >= 2 (at least one context item before the query)")
        xs = xs.to(self.memorizing_dtype)
        return xs[:, -1], xs[:, :-1], labels[:, :-1].to(self.memorizing_dtype)

    def _memorizing(self, query):
        w = self.task.exemplar_noise
        dist = (math.sqrt(1 + w) * query[:, None, :] - self.x).pow(2).sum(-1)  # (b, D)
        posterior = torch.softmax(self.log_prior - self.dims / (2 * w) * dist, dim=-1)
        return posterior @ self.y

    def _generalizing(self, query, context, labels):
        w = self.task.exemplar_noise
        dist = (query[:, None, :] - context / (1 + w)).pow(2).sum(-1)  # (b, C-1)
        posterior = torch.softmax(-self.dims * (1 + w) ** 2 / (2 * w * (2 + w)) * dist, dim=-1)
        return (posterior * labels).sum(-1)


SETTING = Classification
