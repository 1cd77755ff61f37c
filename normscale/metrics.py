"""Losses and task metrics (SPEC C) from a model's outputs and its batch; shared by training and evaluation.

Trained models' outputs (normscale.model): balls_and_urns (B, C, V+1) logits, output t predicting tokens[:, t+1];
linear_regression (B, C) predictions; classification (B, 2) logits at the query.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sequence_losses(setting: str, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of each sequence, (B,): mean next-token cross-entropy (urns), mean squared error over
    positions (regression), cross-entropy of the query's label (classification)."""
    if setting == "balls_and_urns":
        targets = batch["tokens"][:, 1:]
        return F.cross_entropy(outputs.transpose(1, 2).float(), targets, reduction="none").mean(1)
    if setting == "linear_regression":
        return (outputs.float() - batch["ys"]).pow(2).mean(1)
    if setting == "classification":
        return F.cross_entropy(outputs.float(), batch["query_labels"], reduction="none")
    raise ValueError(f"unknown setting {setting!r}")


def colour_log_probs(logits: torch.Tensor, num_colours: int) -> torch.Tensor:
    """(B, C, V) log-probabilities over the V colours: the start-token class dropped and the rest renormalised."""
    return torch.log_softmax(logits[..., :num_colours].float(), dim=-1)


def task_metrics(setting: str, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sequence task metrics of SPEC C, each (B,): urns KL(theta || q) averaged over positions (needs the
    eval split's per-sequence `theta`); regression MSE and MSE/d; classification CE and accuracy."""
    losses = sequence_losses(setting, outputs, batch)
    if setting == "balls_and_urns":
        theta = batch["theta"].float()  # (B, V)
        log_q = colour_log_probs(outputs, theta.shape[1])  # (B, C, V)
        log_theta = torch.where(theta > 0, theta.log(), torch.zeros_like(theta))
        kl = (theta[:, None, :] * (log_theta[:, None, :] - log_q)).sum(-1)
        return {"loss": losses, "kl": kl.mean(1)}
    if setting == "linear_regression":
        return {"loss": losses, "mse": losses, "mse_per_dim": losses / batch["xs"].shape[-1]}
    accuracy = (outputs.argmax(-1) == batch["query_labels"]).float()
    return {"loss": losses, "ce": losses, "accuracy": accuracy}


# ---------------------------------------------------------------- SPEC C: distances to the Bayes predictors and w_M
#
# Predictions follow one convention for every model (trained, Bayes, LLM): balls_and_urns (N, C, V) log-probabilities
# over the colours, linear_regression (N, C) predictions, classification (N, 2) log-probabilities. Per-position
# quantities are (N, P): P = C positions, P = 1 (the query) for classification.

W_M_FLOOR = 1e-6  # d(M, G) below this: M and G agree, w_M is undefined (NaN)


def as_predictions(setting: str, outputs: torch.Tensor, num_dims: int) -> torch.Tensor:
    """A model's raw outputs in the shared convention (float32): urn logits over V+1 ids lose the start token and are
    renormalised; classification logits become log-probabilities; log-probabilities pass through unchanged."""
    if setting == "balls_and_urns":
        return colour_log_probs(outputs, num_dims)
    if setting == "classification":
        return torch.log_softmax(outputs.float(), dim=-1)
    return outputs.float()


def distance(setting: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, P) distance between two predictions: symmetrised KL 1/2 [KL(a||b) + KL(b||a)] = 1/2 sum (p_a - p_b)
    (log p_a - log p_b) for categorical outputs, the squared difference for regression."""
    if setting == "linear_regression":
        return (a - b).pow(2)
    d = 0.5 * ((a.exp() - b.exp()) * (a - b)).sum(-1)
    return d if setting == "balls_and_urns" else d[:, None]


def mixture(setting: str, m: torch.Tensor, g: torch.Tensor, w_m: float) -> torch.Tensor:
    """w_M M + (1 - w_M) G: a mixture of probabilities (categorical) or of predictions (regression)."""
    if setting == "linear_regression":
        return w_m * m + (1 - w_m) * g
    if w_m <= 0 or w_m >= 1:
        return (m if w_m >= 1 else g).clone()
    return torch.logaddexp(m + math.log(w_m), g + math.log1p(-w_m))


def pointwise(setting: str, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(N, P) loss and task metric of each sequence and position: urns next-draw NLL and KL(theta || q); regression
    squared error and its value per dimension; classification query cross-entropy and accuracy."""
    if setting == "balls_and_urns":
        draws = batch["tokens"][:, 1:]
        theta = batch["theta"].float()
        log_theta = torch.where(theta > 0, theta.log(), torch.zeros_like(theta))
        return {"loss": -predictions.gather(-1, draws[..., None]).squeeze(-1),
                "kl": (theta[:, None, :] * (log_theta[:, None, :] - predictions)).sum(-1)}
    if setting == "linear_regression":
        squared = (predictions - batch["ys"].float()).pow(2)
        return {"loss": squared, "mse_per_dim": squared / batch["xs"].shape[-1]}
    labels = batch["query_labels"]
    return {"loss": -predictions.gather(-1, labels[:, None]),
            "accuracy": (predictions.argmax(-1) == labels).float()[:, None]}


def relative_w_m(d_m: torch.Tensor, d_g: torch.Tensor, d_mg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, w_M) from pooled distances: r = (d(T,G) - d(T,M)) / d(M,G) clipped to [-1, 1], w_M = (1 + r) / 2;
    NaN where d(M,G) < W_M_FLOOR."""
    r = ((d_g - d_m) / d_mg).clamp(-1, 1)
    r = torch.where(d_mg < W_M_FLOOR, torch.full_like(r, math.nan), r)
    return r, (1 + r) / 2


def summarize(setting: str, predictions: torch.Tensor, memorizing: torch.Tensor, generalizing: torch.Tensor,
              batch: dict[str, torch.Tensor]) -> dict[str, dict[str, float | torch.Tensor]]:
    """SPEC C metrics of a model's predictions on sequences whose M and G predictions are given.

    scalars: means over sequences and positions of loss and task metric, d_M = d(T,M), d_G, d_MG, and r, w_M from
    those pooled distances, interp_distance = d(T, w_M M + (1-w_M) G); per_position: (P,) means over sequences,
    w_M pooled over sequences only (NaN where d(M,G) < 1e-6), interp_distance with the scalar w_M.
    """
    per = pointwise(setting, predictions, batch)
    per |= {"d_M": distance(setting, predictions, memorizing), "d_G": distance(setting, predictions, generalizing),
            "d_MG": distance(setting, memorizing, generalizing)}
    positions = {name: value.double().mean(0) for name, value in per.items()}
    scalars = {name: value.double().mean() for name, value in per.items()}
    scalars["r"], scalars["w_M"] = relative_w_m(scalars["d_M"], scalars["d_G"], scalars["d_MG"])
    positions["r"], positions["w_M"] = relative_w_m(positions["d_M"], positions["d_G"], positions["d_MG"])
    w_m = scalars["w_M"].item()
    interp = math.nan * torch.ones_like(per["d_M"]) if math.isnan(w_m) else \
        distance(setting, predictions, mixture(setting, memorizing, generalizing, w_m))
    scalars["interp_distance"], positions["interp_distance"] = interp.double().mean(), interp.double().mean(0)
    return {"scalars": {k: v.item() for k, v in scalars.items()},
            "per_position": {k: v.float() for k, v in positions.items()}}
