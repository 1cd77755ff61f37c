"""Linear regression (SPEC A2, B2, C): each task is a weight vector w; a sequence is C pairs (x, w.x + noise).

Batch: xs (B, C, d) float32, ys (B, C) float32, task_ids (B,). Tasks: w (D, d).
A network reads the pairs and predicts y_t from (x_i, y_i)_{i<t} and x_t, (B, C); its objective, `loss` and
predictions coincide: squared error of the predicted y. The task metric `mse_per_dim` is that error over d.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from normscale.settings.bayes import BayesPredictor, exclusive_cumsum
from normscale.settings.network_io import NetworkIO
from normscale.settings.base import Setting, require


class LinearRegression(Setting):
    name = "linear_regression"
    batch_arrays = {"xs": (np.float32, torch.float32), "ys": (np.float32, torch.float32),
                    "task_ids": (np.int32, torch.int64)}
    sequence_task_params = {"w": "w"}
    metric = "mse_per_dim"
    strategy_measure = "squared_error/(2 sigma2)"

    def batch_shapes(self, batch_size):
        B, C, d = batch_size, self.task.context_length, self.task.num_dims
        return {"xs": (B, C, d), "ys": (B, C), "task_ids": (B,)}

    def task_shapes(self, num):
        return {"w": (num, self.task.num_dims)}

    def draw_tasks(self, num, rng):
        return {"w": rng.normal(0.0, math.sqrt(self.task.weight_variance), size=(num, self.task.num_dims))}

    def sample(self, tasks, task_ids, generator, context_weights, exclude_query=False):
        B, C, d = len(task_ids), self.task.context_length, self.task.num_dims
        g = {"generator": generator, "device": task_ids.device}
        xs = torch.randn(B, C, d, **g)
        noise = torch.randn(B, C, **g) * math.sqrt(self.task.sigma2)
        ys = torch.einsum("bcd,bd->bc", xs, tasks["w"][task_ids].float()) + noise
        return {"xs": xs, "ys": ys, "task_ids": task_ids}

    @property
    def tokens_per_sequence(self):
        return 2 * self.task.context_length

    @property
    def network_io(self):
        return NetworkIO(inputs="pairs", input_size=self.task.num_dims, context_length=self.task.context_length,
                         output_size=1, predicts="every", read=lambda batch: (batch["xs"], batch["ys"]))

    def objective(self, outputs, batch):
        return (outputs.float() - batch["ys"]).pow(2).mean(1)

    def pointwise(self, predictions, batch):
        squared = (predictions - batch["ys"].float()).pow(2)
        return {"loss": squared, "mse_per_dim": squared / batch["xs"].shape[-1]}

    def distance(self, a, b):
        return (a - b).pow(2)

    def mixture(self, m, g, w_m):
        return w_m * m + (1 - w_m) * g

    def labels(self, batch):
        return batch["ys"]

    def strategy_loss(self, pointwise, batch):
        return pointwise["loss"] / (2 * self.task.sigma2)

    def predictor(self, kind, tasks=None, log_prior=None, dtype=torch.float64, chunk_elements=None):
        return RegressionPredictor(self, kind, tasks, log_prior, dtype, chunk_elements)


class RegressionPredictor(BayesPredictor):
    """(B, C) predictions of y_t from (x_i, y_i)_{i<t} and x_t (G at t = 0: the prior mean 0). M is chunked over
    sequences ((b, C, D) blocks), G's ridge over sequences ((b, C, d, d) blocks, always float64).
    `predictive_log_variance(batch)` gives G's and Const's exact Gaussian predictive log-variance."""

    def register_tasks(self, params):
        self.register_buffer("w", params["w"].to(self.dtype))

    def forward(self, batch):
        xs, ys = self.inputs(batch)
        if self.kind == "memorizing":
            return self.chunked(self._dmmse, xs.shape[0], xs.shape[1] * len(self.w), xs, ys)
        if self.kind == "generalizing":
            return self._ridge(xs, ys)[0].to(self.dtype)
        return xs.new_zeros(xs.shape[:2], dtype=self.dtype)

    def predictive_log_variance(self, batch) -> torch.Tensor:
        """(B, C) log of the exact Gaussian predictive variance of y_t. G: sigma^2 (1 + x_t^T (X^T X + lambda I)^-1
        x_t) over pairs i < t; Const (the prior): sigma^2 + tau^2 |x_t|^2."""
        if self.kind == "memorizing":
            raise ValueError("predictive_log_variance is defined for linear_regression generalizing and const "
                             "(Gaussian predictives), not memorizing")
        xs, ys = self.inputs(batch)
        if self.kind == "generalizing":
            return self._ridge(xs, ys)[1].to(self.dtype)
        xs = xs.to(self.dtype)
        return torch.log(self.task.sigma2 + self.task.weight_variance * xs.pow(2).sum(-1))

    def inputs(self, batch):
        xs = require(batch, "xs", 3, "(B, C, d) float", self.setting.name)
        ys = require(batch, "ys", 2, "(B, C) float", self.setting.name)
        if xs.shape[2] != self.dims or ys.shape != xs.shape[:2]:
            raise ValueError(
                f"xs {tuple(xs.shape)} and ys {tuple(ys.shape)} do not match (B, C, d={self.dims}) and (B, C)")
        return xs, ys

    def _dmmse(self, xs, ys):
        xs, ys = xs.to(self.w.dtype), ys.to(self.w.dtype)
        preds = xs @ self.w.T  # (b, C, D): x_t . w_k
        sse = exclusive_cumsum((ys[..., None] - preds).pow(2), dim=1)  # residuals of i < t
        posterior = torch.softmax(self.log_prior - sse / (2 * self.task.sigma2), dim=-1)
        return (posterior * preds).sum(-1)  # x_t . sum_k pi_k w_k

    def _ridge(self, xs, ys):
        """Posterior mean and predictive log-variance, float64, chunked over sequences."""
        return self.chunked(self._ridge_chunk, xs.shape[0], xs.shape[1] * self.dims**2, xs, ys)

    def _ridge_chunk(self, xs, ys):
        xs, ys = xs.to(torch.float64), ys.to(torch.float64)
        lam = self.task.sigma2 / self.task.weight_variance
        gram = exclusive_cumsum(xs[..., :, None] * xs[..., None, :], dim=1)  # (b, C, d, d): X^T X over i < t
        gram = gram + lam * torch.eye(self.dims, dtype=xs.dtype, device=xs.device)
        xty = exclusive_cumsum(xs * ys[..., None], dim=1)  # (b, C, d): X^T y over i < t
        solved = torch.cholesky_solve(torch.stack([xty, xs], dim=-1), torch.linalg.cholesky(gram))
        mean = (xs * solved[..., 0]).sum(-1)  # x_t . w^_t (w^_1 = 0)
        log_var = math.log(self.task.sigma2) + torch.log1p((xs * solved[..., 1]).sum(-1))
        return mean, log_var


SETTING = LinearRegression
