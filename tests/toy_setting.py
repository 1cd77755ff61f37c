"""A fourth setting defined outside normscale, in one module plus its config file (tests/toy_conf/setting/
fixed_pattern.yaml): what docs/ARCHITECTURE.md's "Adding a setting" describes, exercised end to end by
tests/test_settings.py. Registered when imported: NORMSCALE_SETTINGS=toy_setting (with tests/ on PYTHONPATH).

fixed_pattern: each task is a fixed pattern of C symbols out of V; a sequence shows its task's pattern with each
symbol replaced, with probability FLIP, by one of the other V-1 uniformly. Batch: tokens (B, C+1) with the start
token V first, task_ids (B,); tasks: pattern (D, C). A network reads tokens[:, :-1] and predicts the next symbol.
M: the posterior over the D patterns given the symbols seen; G: under the prior (patterns uniform) the symbols are
independent and uniform, so G = Const = 1/V.
"""
from __future__ import annotations

import math

import torch

from normscale import settings
from normscale.settings.bayes import BayesPredictor
from normscale.settings.base import SymbolSequence

FLIP = 0.1


class FixedPattern(SymbolSequence):
    name = "fixed_pattern"
    sequence_task_params = {}
    metric = "accuracy"
    strategy_measure = "nll"

    def task_shapes(self, num):
        return {"pattern": (num, self.task.context_length)}

    def draw_tasks(self, num, rng):
        return {"pattern": rng.integers(0, self.task.num_dims, size=(num, self.task.context_length))}

    def sample(self, tasks, task_ids, generator, context_weights, exclude_query=False):
        V, (B, C) = self.task.num_dims, (len(task_ids), self.task.context_length)
        pattern = tasks["pattern"][task_ids]
        flip = torch.rand(B, C, generator=generator, device=task_ids.device) < FLIP
        other = (pattern + torch.randint(1, V, (B, C), generator=generator, device=task_ids.device)) % V
        start = torch.full((B, 1), V, dtype=torch.int64, device=task_ids.device)
        return {"tokens": torch.cat([start, torch.where(flip, other, pattern)], dim=1), "task_ids": task_ids}

    def pointwise(self, predictions, batch):
        return {"loss": self.next_symbol_nll(predictions, batch),
                "accuracy": (predictions.argmax(-1) == batch["tokens"][:, 1:]).float()}

    def strategy_loss(self, pointwise, batch):
        return pointwise["loss"]

    def predictor(self, kind, tasks=None, log_prior=None, dtype=torch.float64, chunk_elements=None):
        return PatternPredictor(self, kind, tasks, log_prior, dtype, chunk_elements)


class PatternPredictor(BayesPredictor):
    def register_tasks(self, params):
        self.register_buffer("pattern", params["pattern"].long())

    def emission(self, symbols: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        """log p(symbol | pattern symbol)."""
        return torch.where(symbols == pattern, math.log(1 - FLIP), math.log(FLIP / (self.dims - 1)))

    def forward(self, batch):
        draws = batch["tokens"][:, 1:]
        B, C, V = *draws.shape, self.dims
        if self.kind != "memorizing":
            return torch.full((B, C, V), -math.log(V), dtype=self.dtype, device=draws.device)
        seen = self.emission(draws[:, None, :], self.pattern[None, :, :C]).to(self.log_prior.dtype)  # (B, D, C)
        before = torch.cumsum(seen, -1) - seen  # log-likelihood of the symbols before t
        posterior = torch.softmax(self.log_prior[None, :, None] + before, dim=1)  # (B, D, C)
        symbols = torch.arange(V, device=draws.device)
        per_task = self.emission(symbols[None, None, :], self.pattern[:, :C, None]).to(posterior.dtype).exp()  # (D, C, V)
        return torch.einsum("bdc,dcv->bcv", posterior, per_task).log()


SETTING = FixedPattern
settings.register("fixed_pattern", "toy_setting", settings.Facts(
    output="categorical", report_metric="loss", fit_start=(0.2, 0.6, 0.85), prior_numbers=0,
    task_numbers=lambda D, d: 0, task_bits=lambda D: 32 * D))  # C=16 symbols of 2 bits (V=4) per pattern
