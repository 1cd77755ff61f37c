"""Losses and task metrics (SPEC C) from a model's outputs and its batch; shared by training and evaluation.

Trained models' outputs (normscale.model): balls_and_urns (B, C, V+1) logits, output t predicting tokens[:, t+1];
linear_regression (B, C) predictions; classification (B, 2) logits at the query.
"""
from __future__ import annotations

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
