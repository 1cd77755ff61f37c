"""Bayes-optimal predictors (SPEC B): memorizing (M), generalizing (G) and Const, for the three settings.

A `BayesPredictor` is called like a trained model: `forward(batch)` takes the batch dict of
normscale.data.tasks and returns
  balls_and_urns     (B, C, V) log-probabilities; output t predicts draw x_{t+1} from x_1..x_t (t = 0: no draws)
  linear_regression  (B, C) predictions of y_t from (x_i, y_i)_{i<t} and x_t (G at t = 0: the prior mean 0);
                     `predictive_log_variance(batch)` gives G's (and Const's) exact Gaussian predictive log-variance
  classification     (B, 2) log-probabilities of the query's label, clipped to [1e-5, 1 - 1e-5] before the log
Posteriors over tasks are softmaxes of log-likelihood + log prior. M's D training tasks and log prior are buffers
(`.to(device)` moves them; `.float()` makes M compute in float32); G and Const compute in `dtype` on the inputs'
device. The ridge solve is always float64. Work is chunked over positions or sequences so that a chunk's largest
block ((rows, D) urns, (b, C, D) regression M, (b, C, d, d) ridge, (b, D, d) classification M) holds at most
`chunk_elements` entries, one row or sequence at least; (B, C, D, V) is never formed.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from normscale.config import BAYES_KINDS, SETTINGS, TaskConfig

CHUNK_ELEMENTS = 2**22  # entries of the largest per-chunk block: ~16 MiB float32, small enough to stay cache-friendly
TASK_KEYS = {"balls_and_urns": ("theta",), "linear_regression": ("w",), "classification": ("x", "y")}
PROB_CLIP = 1e-5


def build_bayes(setting: str, kind: str, task: TaskConfig, tasks: dict | None = None,
                log_prior: torch.Tensor | None = None, dtype: torch.dtype = torch.float64,
                chunk_elements: int = CHUNK_ELEMENTS) -> BayesPredictor:
    """The `kind` predictor ("memorizing", "generalizing", "const") of `setting`.

    memorizing needs the D training tasks (`tasks`, as from `draw_tasks`: tensors or arrays) and `log_prior` (D,),
    the log of `normscale.data.priors.task_prior_weights(...)`; the others ignore both.
    """
    return BayesPredictor(setting, kind, task, tasks, log_prior, dtype, chunk_elements)


class BayesPredictor(nn.Module):
    def __init__(self, setting: str, kind: str, task: TaskConfig, tasks: dict | None = None,
                 log_prior: torch.Tensor | None = None, dtype: torch.dtype = torch.float64,
                 chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__()
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
        if kind not in BAYES_KINDS:
            raise ValueError(f"unknown Bayes predictor kind {kind!r}; choose one of: {', '.join(BAYES_KINDS)}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements={chunk_elements} must be >= 1")
        self.setting, self.kind, self.task, self.dtype = setting, kind, task, dtype
        self.chunk_elements = chunk_elements
        self.dims = task.num_dims
        if kind == "memorizing":
            self._register_tasks(tasks, log_prior)

    def _register_tasks(self, tasks: dict | None, log_prior) -> None:
        keys, D = TASK_KEYS[self.setting], self.task.num_tasks
        if tasks is None or log_prior is None:
            raise ValueError(
                "the memorizing predictor needs the D training tasks and their prior: pass "
                f"tasks={{{', '.join(map(repr, keys))}: ...}} (the experiment's saved tasks, or draw_tasks(...)) "
                "and log_prior=log(task_prior_weights(prior, D, exponent))")
        missing = [k for k in keys if k not in tasks]
        if missing:
            raise ValueError(
                f"{self.setting} tasks need {', '.join(map(repr, keys))}; missing {missing} in {sorted(tasks)}")
        shapes = {"theta": (D, self.dims), "w": (D, self.dims), "x": (D, self.dims), "y": (D,)}
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
        if self.setting == "balls_and_urns":
            theta = params["theta"]
            if (theta < 0).any() or (theta.sum(1) - 1).abs().max() > 1e-6:
                raise ValueError("theta rows must be probability vectors over the V colours (non-negative, sum 1)")
            self.register_buffer("theta", theta.to(self.dtype))
            # log 0 -> a huge finite negative (not -inf), so that zero counts times log theta stay 0, never NaN.
            self.register_buffer("log_theta", theta.clamp_min(torch.finfo(torch.float64).tiny).log().to(self.dtype))
        elif self.setting == "linear_regression":
            self.register_buffer("w", params["w"].to(self.dtype))
        else:
            if not ((params["y"] == 0) | (params["y"] == 1)).all():
                raise ValueError("classification task labels y must be 0 or 1")
            self.register_buffer("x", params["x"].to(self.dtype))
            self.register_buffer("y", params["y"].to(self.dtype))

    def extra_repr(self) -> str:
        return f"setting={self.setting}, kind={self.kind}, dims={self.dims}"

    # ------------------------------------------------------------------ entry points

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.setting == "balls_and_urns":
            counts = self._urn_counts(batch)
            predict = {"memorizing": self._urns_m, "generalizing": self._urns_g, "const": self._urns_const}[self.kind]
            return predict(counts)
        if self.setting == "linear_regression":
            xs, ys = self._regression_inputs(batch)
            if self.kind == "memorizing":
                return self._chunked(self._dmmse, xs.shape[0], xs.shape[1] * len(self.w), xs, ys)
            if self.kind == "generalizing":
                return self._ridge(xs, ys)[0].to(self.dtype)
            return xs.new_zeros(xs.shape[:2], dtype=self.dtype)
        query, context, labels = self._classification_inputs(batch)
        if self.kind == "memorizing":
            p1 = self._chunked(self._classification_m, len(query), len(self.x) * self.dims, query)
        elif self.kind == "generalizing":
            p1 = self._chunked(self._classification_g, len(query), context.shape[1] * self.dims, query, context, labels)
        else:
            p1 = query.new_full((len(query),), 0.5, dtype=self.dtype)
        p1 = p1.clamp(PROB_CLIP, 1 - PROB_CLIP)
        return torch.stack([torch.log1p(-p1), torch.log(p1)], dim=-1)

    def predictive_log_variance(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """linear_regression, G and Const: (B, C) log of the exact Gaussian predictive variance of y_t.

        G: sigma^2 (1 + x_t^T (X^T X + lambda I)^-1 x_t) over pairs i < t; Const (the prior): sigma^2 + tau^2 |x_t|^2.
        """
        if self.setting != "linear_regression" or self.kind == "memorizing":
            raise ValueError(f"predictive_log_variance is defined for linear_regression generalizing and const "
                             f"(Gaussian predictives), not {self.setting} {self.kind}")
        xs, ys = self._regression_inputs(batch)
        if self.kind == "generalizing":
            return self._ridge(xs, ys)[1].to(self.dtype)
        xs = xs.to(self.dtype)
        return torch.log(self.task.sigma2 + self.task.weight_variance * xs.pow(2).sum(-1))

    # ------------------------------------------------------------------ inputs

    def _field(self, batch: dict, key: str, ndim: int, layout: str) -> torch.Tensor:
        if key not in batch:
            raise ValueError(f"{self.setting} batch needs {key!r} {layout}; got keys {sorted(batch)}")
        value = batch[key]
        if value.ndim != ndim:
            raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)}, expected {layout}")
        return value

    def _urn_counts(self, batch: dict) -> torch.Tensor:
        """(B, C, V) colour counts of x_1..x_t at output t (exclusive of x_{t+1}), as `self`'s compute dtype."""
        tokens = self._field(batch, "tokens", 2, "(B, C+1) int64 with the start token first")
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}: need the start token and at least one draw")
        draws = tokens[:, 1:]
        if ((draws < 0) | (draws >= self.dims)).any():
            raise ValueError(f"draws (tokens[:, 1:]) must be colours 0..{self.dims - 1} (task num_dims={self.dims})")
        onehot = nn.functional.one_hot(draws, self.dims)
        dtype = self.log_prior.dtype if self.kind == "memorizing" else self.dtype
        return (onehot.cumsum(1) - onehot).to(dtype)

    def _regression_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        xs = self._field(batch, "xs", 3, "(B, C, d) float")
        ys = self._field(batch, "ys", 2, "(B, C) float")
        if xs.shape[2] != self.dims or ys.shape != xs.shape[:2]:
            raise ValueError(
                f"xs {tuple(xs.shape)} and ys {tuple(ys.shape)} do not match (B, C, d={self.dims}) and (B, C)")
        return xs, ys

    def _classification_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs = self._field(batch, "xs", 3, "(B, C, d) float, the query last")
        labels = self._field(batch, "labels", 2, "(B, C) int with labels[:, -1] = -1")
        if xs.shape[2] != self.dims or labels.shape != xs.shape[:2] or xs.shape[1] < 2:
            raise ValueError(f"xs {tuple(xs.shape)} and labels {tuple(labels.shape)} must be (B, C, d={self.dims}) "
                             "and (B, C) with C >= 2 (at least one context item before the query)")
        dtype = self.log_prior.dtype if self.kind == "memorizing" else self.dtype
        xs = xs.to(dtype)
        return xs[:, -1], xs[:, :-1], labels[:, :-1].to(dtype)

    def _chunked(self, fn, n: int, per_row: int, *tensors: torch.Tensor):
        """fn over row chunks of `tensors` (first axis), each holding at most chunk_elements / per_row rows."""
        step = max(1, self.chunk_elements // per_row)
        outs = [fn(*(t[i:i + step] for t in tensors)) for i in range(0, n, step)]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)

    # ------------------------------------------------------------------ balls_and_urns (SPEC B1)

    def _urns_m(self, counts: torch.Tensor) -> torch.Tensor:
        B, C, V = counts.shape
        rows = counts.reshape(B * C, V)  # positions are independent given the counts: chunk over (B*C) rows
        return self._chunked(self._urns_m_rows, B * C, len(self.theta), rows).view(B, C, V)

    def _urns_m_rows(self, counts: torch.Tensor) -> torch.Tensor:
        posterior = torch.softmax(counts @ self.log_theta.T + self.log_prior, dim=-1)  # (rows, D)
        probs = (posterior @ self.theta).clamp_min(torch.finfo(counts.dtype).tiny)
        return probs.log() - probs.sum(-1, keepdim=True).log()

    def _urns_g(self, counts: torch.Tensor) -> torch.Tensor:
        alpha = self.task.dirichlet_alpha
        seen = torch.arange(counts.shape[1], device=counts.device, dtype=counts.dtype)
        return torch.log(counts + alpha) - torch.log(seen + self.dims * alpha)[:, None]

    def _urns_const(self, counts: torch.Tensor) -> torch.Tensor:
        return counts.new_full(counts.shape, -math.log(self.dims))  # alpha / sum(alpha), alpha = alpha 1_V

    # ------------------------------------------------------------------ linear_regression (SPEC B2)

    def _dmmse(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        xs, ys = xs.to(self.w.dtype), ys.to(self.w.dtype)
        preds = xs @ self.w.T  # (b, C, D): x_t . w_k
        sse = _exclusive_cumsum((ys[..., None] - preds).pow(2), dim=1)  # residuals of i < t
        posterior = torch.softmax(self.log_prior - sse / (2 * self.task.sigma2), dim=-1)
        return (posterior * preds).sum(-1)  # x_t . sum_k pi_k w_k

    def _ridge(self, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and predictive log-variance, float64, chunked over sequences."""
        return self._chunked(self._ridge_chunk, xs.shape[0], xs.shape[1] * self.dims**2, xs, ys)

    def _ridge_chunk(self, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = xs.to(torch.float64), ys.to(torch.float64)
        lam = self.task.sigma2 / self.task.weight_variance
        gram = _exclusive_cumsum(xs[..., :, None] * xs[..., None, :], dim=1)  # (b, C, d, d): X^T X over i < t
        gram = gram + lam * torch.eye(self.dims, dtype=xs.dtype, device=xs.device)
        xty = _exclusive_cumsum(xs * ys[..., None], dim=1)  # (b, C, d): X^T y over i < t
        solved = torch.cholesky_solve(torch.stack([xty, xs], dim=-1), torch.linalg.cholesky(gram))
        mean = (xs * solved[..., 0]).sum(-1)  # x_t . w^_t (w^_1 = 0)
        log_var = math.log(self.task.sigma2) + torch.log1p((xs * solved[..., 1]).sum(-1))
        return mean, log_var

    # ------------------------------------------------------------------ classification (SPEC B3)

    def _classification_m(self, query: torch.Tensor) -> torch.Tensor:
        w = self.task.exemplar_noise
        dist = (math.sqrt(1 + w) * query[:, None, :] - self.x).pow(2).sum(-1)  # (b, D)
        posterior = torch.softmax(self.log_prior - self.dims / (2 * w) * dist, dim=-1)
        return posterior @ self.y

    def _classification_g(self, query: torch.Tensor, context: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = self.task.exemplar_noise
        dist = (query[:, None, :] - context / (1 + w)).pow(2).sum(-1)  # (b, C-1)
        posterior = torch.softmax(-self.dims * (1 + w) ** 2 / (2 * w * (2 + w)) * dist, dim=-1)
        return (posterior * labels).sum(-1)


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Entry t holds the sum of entries 0..t-1 along `dim` (entry 0 is zero)."""
    shifted = x.narrow(dim, 0, x.shape[dim] - 1)
    return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), shifted], dim=dim).cumsum(dim)
