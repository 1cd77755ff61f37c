"""Models: trained networks and the Bayes-optimal predictors (SPEC B), built by `build_model(config)`."""
from __future__ import annotations

import torch
from torch import nn

from normscale.config import Config
from normscale.model.bayes import BayesPredictor, build_bayes
from normscale.model.hf import HFGPTNeoX
from normscale.model.mlp import MLP
from normscale.model.mup import optimizer_groups
from normscale.model.transformer import Transformer

TRAINABLE = ("transformer", "mlp", "hf_gpt_neox")
MODEL_NAMES = (*TRAINABLE, "bayes")


def build_model(config: Config, tasks: dict | None = None, log_prior: torch.Tensor | None = None) -> nn.Module:
    """The network or predictor `config.model` names, for `config.setting` and `config.task_kwargs`.

    Trainable models take the batch dict of normscale.data.tasks and return urns (B, C, V+1) logits, regression
    (B, C) predictions, classification (B, 2) logits; initialisation draws from torch's global generator (seed it
    first). model=bayes needs `tasks` and `log_prior` for kind=memorizing (see build_bayes).
    """
    if config.model == "bayes":
        return build_bayes(config.setting, config.model_kwargs.kind, config.task_kwargs, tasks, log_prior)
    if config.model == "transformer":
        return Transformer(config.setting, config.task_kwargs, config.model_kwargs)
    if config.model == "mlp":
        return MLP(config.setting, config.task_kwargs, config.model_kwargs)
    if config.model == "hf_gpt_neox":
        return HFGPTNeoX(config.setting, config.task_kwargs, config.model_kwargs)
    raise ValueError(f"model={config.model!r} is not allowed; choose one of: {', '.join(MODEL_NAMES)}")


__all__ = ["BayesPredictor", "HFGPTNeoX", "MLP", "MODEL_NAMES", "Transformer", "build_bayes", "build_model", "optimizer_groups"]
