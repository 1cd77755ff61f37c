"""Models: trained networks and the Bayes-optimal predictors (SPEC B), built by `build_model(config)`."""
from __future__ import annotations

import torch
from torch import nn

from normscale import settings
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

    Trainable models take a batch dict of the setting and return the raw outputs its NetworkIO describes
    (normscale.model.network_io); initialisation draws from torch's global generator (seed it first). model=bayes
    needs `tasks` and `log_prior` for kind=memorizing (see build_bayes).
    """
    setting = settings.get(config.setting, config.task_kwargs)
    if config.model == "bayes":
        return setting.predictor(config.model_kwargs.kind, tasks, log_prior)
    networks = {"transformer": Transformer, "mlp": MLP, "hf_gpt_neox": HFGPTNeoX}
    if config.model in networks:
        return networks[config.model](setting.network_io, config.model_kwargs)
    raise ValueError(f"model={config.model!r} is not allowed; choose one of: {', '.join(MODEL_NAMES)}")


__all__ = ["BayesPredictor", "HFGPTNeoX", "MLP", "MODEL_NAMES", "Transformer", "build_bayes", "build_model", "optimizer_groups"]
