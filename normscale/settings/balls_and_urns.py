"""Balls and urns (SPEC A1, B1, C): each task is an urn theta over V colours; a sequence is C draws from one urn.

Batch: tokens (B, C+1) int64 with tokens[:, 0] = V the start token, task_ids (B,). Tasks: theta (D, V).
A network reads tokens[:, :-1] (V+1 ids) and gives (B, C, V+1) logits, output t predicting tokens[:, t+1]; its
objective is the next-token cross-entropy over those V+1 outputs. Predictions are (N, C, V) log-probabilities over the
colours (the start token's class dropped, the rest renormalised); `loss` is their next-draw NLL and the task metric
`kl` is KL(theta || q), both per position.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from normscale.settings.bayes import BayesPredictor
from normscale.settings.base import SymbolSequence, require


class BallsAndUrns(SymbolSequence):
    name = "balls_and_urns"
    sequence_task_params = {"theta": "theta"}
    metric = "kl"
    strategy_measure = "kl"

    def task_shapes(self, num):
        return {"theta": (num, self.task.num_dims)}

    def draw_tasks(self, num, rng):
        return {"theta": rng.dirichlet(np.full(self.task.num_dims, self.task.dirichlet_alpha), size=num)}

    def sample(self, tasks, task_ids, generator, context_weights, exclude_query=False):
        B, C, V = len(task_ids), self.task.context_length, self.task.num_dims
        draws = torch.multinomial(tasks["theta"][task_ids], C, replacement=True, generator=generator)
        start = torch.full((B, 1), V, dtype=torch.int64, device=task_ids.device)
        return {"tokens": torch.cat([start, draws], dim=1), "task_ids": task_ids}

    def pointwise(self, predictions, batch):
        theta = batch["theta"].float()
        log_theta = torch.where(theta > 0, theta.log(), torch.zeros_like(theta))
        return {"loss": self.next_symbol_nll(predictions, batch),
                "kl": (theta[:, None, :] * (log_theta[:, None, :] - predictions)).sum(-1)}

    def strategy_loss(self, pointwise, batch):
        return pointwise["kl"]

    def predictor(self, kind, tasks=None, log_prior=None, dtype=torch.float64, chunk_elements=None):
        return UrnPredictor(self, kind, tasks, log_prior, dtype, chunk_elements)


class UrnPredictor(BayesPredictor):
    """(B, C, V) log-probabilities; output t predicts draw x_{t+1} from x_1..x_t (t = 0: no draws). Chunked over the
    B*C positions ((rows, D) blocks); (B, C, D, V) is never formed."""

    def register_tasks(self, params):
        theta = params["theta"]
        if (theta < 0).any() or (theta.sum(1) - 1).abs().max() > 1e-6:
            raise ValueError("theta rows must be probability vectors over the V colours (non-negative, sum 1)")
        self.register_buffer("theta", theta.to(self.dtype))
        # log 0 -> a huge finite negative (not -inf), so that zero counts times log theta stay 0, never NaN.
        self.register_buffer("log_theta", theta.clamp_min(torch.finfo(torch.float64).tiny).log().to(self.dtype))

    def forward(self, batch):
        counts = self.counts(batch)
        return {"memorizing": self.memorizing, "generalizing": self.generalizing, "const": self.const}[self.kind](counts)

    def counts(self, batch) -> torch.Tensor:
        """(B, C, V) colour counts of x_1..x_t at output t (exclusive of x_{t+1})."""
        tokens = require(batch, "tokens", 2, "(B, C+1) int64 with the start token first", self.setting.name)
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}: need the start token and at least one draw")
        draws = tokens[:, 1:]
        if ((draws < 0) | (draws >= self.dims)).any():
            raise ValueError(f"draws (tokens[:, 1:]) must be colours 0..{self.dims - 1} (task num_dims={self.dims})")
        onehot = nn.functional.one_hot(draws, self.dims)
        return (onehot.cumsum(1) - onehot).to(self.memorizing_dtype)

    def memorizing(self, counts):
        B, C, V = counts.shape
        rows = counts.reshape(B * C, V)  # positions are independent given the counts: chunk over (B*C) rows
        return self.chunked(self._memorizing_rows, B * C, len(self.theta), rows).view(B, C, V)

    def _memorizing_rows(self, counts):
        posterior = torch.softmax(counts @ self.log_theta.T + self.log_prior, dim=-1)  # (rows, D)
        probs = (posterior @ self.theta).clamp_min(torch.finfo(counts.dtype).tiny)
        return probs.log() - probs.sum(-1, keepdim=True).log()

    def generalizing(self, counts):
        alpha = self.task.dirichlet_alpha
        seen = torch.arange(counts.shape[1], device=counts.device, dtype=counts.dtype)
        return torch.log(counts + alpha) - torch.log(seen + self.dims * alpha)[:, None]

    def const(self, counts):
        return counts.new_full(counts.shape, -math.log(self.dims))  # alpha / sum(alpha), alpha = alpha 1_V


SETTING = BallsAndUrns
