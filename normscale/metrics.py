"""Scoring (SPEC C), the same for the in-training evaluation and normscale.eval: a model's outputs become
predictions through its setting (`predict`), and every metric comes from the setting's `pointwise` values of those
predictions, so `loss` and the task metric mean one thing in eval_metrics.jsonl, wandb, metrics.pt and metrics.h5.
`summarize` adds the distances to the Bayes predictors and w_M.
"""
from __future__ import annotations

import math

import torch

W_M_FLOOR = 1e-6  # d(M, G) below this: M and G agree, w_M is undefined (NaN)


def predict(setting, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`model`'s predictions on `batch` in the shared convention (normscale.settings.base), float32. Trained
    networks, Bayes predictors and LLM scorers alike: log-probabilities pass through unchanged."""
    return setting.predictions(model(batch))


def metric_sums(setting, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """({metric: float64 sum over sequences and positions}, number of entries): means of several batches or ranks
    are the summed sums over the summed counts."""
    per = setting.pointwise(predictions, batch)
    return {name: value.double().sum() for name, value in per.items()}, next(iter(per.values())).numel()


def relative_w_m(d_m: torch.Tensor, d_g: torch.Tensor, d_mg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, w_M) from pooled distances: r = (d(T,G) - d(T,M)) / d(M,G) clipped to [-1, 1], w_M = (1 + r) / 2;
    NaN where d(M,G) < W_M_FLOOR."""
    r = ((d_g - d_m) / d_mg).clamp(-1, 1)
    r = torch.where(d_mg < W_M_FLOOR, torch.full_like(r, math.nan), r)
    return r, (1 + r) / 2


def summarize(setting, predictions: torch.Tensor, memorizing: torch.Tensor, generalizing: torch.Tensor,
              batch: dict[str, torch.Tensor]) -> dict[str, dict[str, float | torch.Tensor]]:
    """SPEC C metrics of a model's predictions on sequences whose M and G predictions are given.

    scalars: means over sequences and positions of loss and task metric, d_M = d(T,M), d_G, d_MG, and r, w_M from
    those pooled distances, interp_distance = d(T, w_M M + (1-w_M) G); per_position: (P,) means over sequences,
    w_M pooled over sequences only (NaN where d(M,G) < 1e-6), interp_distance with the scalar w_M.
    """
    per = setting.pointwise(predictions, batch)
    per |= {"d_M": setting.distance(predictions, memorizing), "d_G": setting.distance(predictions, generalizing),
            "d_MG": setting.distance(memorizing, generalizing)}
    positions = {name: value.double().mean(0) for name, value in per.items()}
    scalars = {name: value.double().mean() for name, value in per.items()}
    scalars["r"], scalars["w_M"] = relative_w_m(scalars["d_M"], scalars["d_G"], scalars["d_MG"])
    positions["r"], positions["w_M"] = relative_w_m(positions["d_M"], positions["d_G"], positions["d_MG"])
    w_m = scalars["w_M"].item()
    interp = math.nan * torch.ones_like(per["d_M"]) if math.isnan(w_m) else \
        setting.distance(predictions, setting.mixture(memorizing, generalizing, w_m))
    scalars["interp_distance"], positions["interp_distance"] = interp.double().mean(), interp.double().mean(0)
    return {"scalars": {k: v.item() for k, v in scalars.items()},
            "per_position": {k: v.float() for k, v in positions.items()}}
