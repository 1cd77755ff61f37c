"""Models: the setting-free trained networks, and the entry that builds them or a setting's Bayes-optimal predictor
(SPEC B): `build_model(config)`, `build_bayes(...)`."""
from __future__ import annotations

import torch
from torch import nn

from normscale import settings
from normscale.config import Config, TaskConfig
from normscale.model.hf import HFGPTNeoX
from normscale.model.mlp import MLP
from normscale.model.mup import optimizer_groups
from normscale.model.transformer import Transformer
from normscale.settings.bayes import CHUNK_ELEMENTS, BayesPredictor

TRAINABLE = ("transformer", "mlp", "hf_gpt_neox")
MODEL_NAMES = (*TRAINABLE, "bayes")


def build_model(config: Config, tasks: dict | None = None, log_prior: torch.Tensor | None = None) -> nn.Module:
    """The network or predictor `config.model` names, for `config.setting` and `config.task_kwargs`.

    Trainable models take a batch dict of the setting and return the raw outputs its NetworkIO describes
    (normscale.settings.network_io); initialisation draws from torch's global generator (seed it first). model=bayes
    needs `tasks` and `log_prior` for kind=memorizing (see build_bayes).
    """
    setting = settings.get(config.setting, config.task_kwargs)
    if config.model == "bayes":
        return setting.predictor(config.model_kwargs.kind, tasks, log_prior)
    networks = {"transformer": Transformer, "mlp": MLP, "hf_gpt_neox": HFGPTNeoX}
    if config.model in networks:
        return networks[config.model](setting.network_io, config.model_kwargs)
    raise ValueError(f"model={config.model!r} is not allowed; choose one of: {', '.join(MODEL_NAMES)}")


def build_bayes(setting: str, kind: str, task: TaskConfig, tasks: dict | None = None,
                log_prior: torch.Tensor | None = None, dtype: torch.dtype = torch.float64,
                chunk_elements: int = CHUNK_ELEMENTS) -> BayesPredictor:
    """The `kind` predictor ("memorizing", "generalizing", "const") of `setting` (normscale.settings.bayes).

    memorizing needs the D training tasks (`tasks`, as from the setting's draw_tasks: tensors or arrays) and
    `log_prior` (D,), the log of `normscale.data.priors.task_prior_weights(...)`; the others ignore both.
    """
    return settings.get(setting, task).predictor(kind, tasks, log_prior, dtype, chunk_elements)


__all__ = ["BayesPredictor", "HFGPTNeoX", "MLP", "MODEL_NAMES", "Transformer", "build_bayes", "build_model", "optimizer_groups"]
