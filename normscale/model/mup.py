"""Standard (sp) and maximal-update (mup) parametrisation, applied by normscale itself (Yang et al. 2022, muP).

Every width dimension of a model scales with `hidden_size`, so one number describes a model's place in a width
sweep: width_mult = hidden_size / base_width (the MLP's hidden width is hidden_size * mlp_expansion_factor against
base_width * mlp_expansion_factor: the same ratio). Layers are built through the helpers below, which fix their
role and initialisation from their shapes:

  role     built by          init                              Adam lr under mup   forward under mup
  input    input_linear,     N(0, 1/fan_in), embeddings N(0,1)  lr                  as sp
           embedding
  hidden   hidden_linear     N(0, 1/fan_in)                    lr / width_mult     as sp
  readout  Readout           sp: N(0, 1/fan_in); mup: zero     lr                  input x 1/width_mult
  biases, LayerNorms         zero / (1, 0)                     lr                  as sp

plus 1/d_head attention (`attention_scale`). These are mup's MuAdamW rules (hidden weights are its "matrix-like"
parameters, with weight decay times width_mult so that the decoupled decay lr*wd is unchanged; everything else is
"vector-like") with MuReadout's output multiplier, tested against the `mup` package. `assign_scales` runs once at
build time and stores plain {parameter name: (lr scale, weight-decay scale)} on the model, so the rules need no
per-parameter attributes and survive DDP, FSDP, ZeRO-3 and torch.compile wrapping.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from normscale.config import PARAMETRIZATIONS, ModelConfig

WRAPPERS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}  # name parts inserted by wrapping


def width_mult(model: ModelConfig) -> float:
    return model.hidden_size / model.base_width


def check_parametrization(model: ModelConfig) -> None:
    if model.parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"model_kwargs.parametrization={model.parametrization!r} is not allowed; "
                         f"choose one of: {', '.join(PARAMETRIZATIONS)}")


def attention_scale(model: ModelConfig) -> float:
    """sp: 1/sqrt(d_head). mup: 1/d_head, times sqrt(base d_head) so that both agree at the base width."""
    head_dim = model.hidden_size // model.num_heads
    if model.parametrization == "sp":
        return 1 / math.sqrt(head_dim)
    return math.sqrt(model.base_width / model.num_heads) / head_dim


def init_fan_in(layer: nn.Linear, role: str) -> nn.Linear:
    """N(0, 1/fan_in) weights, zero bias, and the layer's muP role ("input", "hidden" or "readout")."""
    nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    layer.mup_role = role
    return layer


def input_linear(fan_in: int, fan_out: int, bias: bool = True) -> nn.Linear:
    """A finite -> width layer (the read-in of continuous tokens)."""
    return init_fan_in(nn.Linear(fan_in, fan_out, bias=bias), "input")


def embedding(num: int, dim: int) -> nn.Embedding:
    layer = nn.Embedding(num, dim)
    nn.init.normal_(layer.weight)
    layer.mup_role = "input"
    return layer


def hidden_linear(fan_in: int, fan_out: int, bias: bool = True) -> nn.Linear:
    """A width -> width layer: mup's matrix-like weight."""
    return init_fan_in(nn.Linear(fan_in, fan_out, bias=bias), "hidden")


class Readout(nn.Linear):
    """A width -> finite output layer; under mup zero-initialised with output multiplier 1/width_mult (MuReadout)."""

    def __init__(self, fan_in: int, fan_out: int, model: ModelConfig):
        super().__init__(fan_in, fan_out)
        self.multiplier = 1 / width_mult(model) if model.parametrization == "mup" else 1.0
        init_fan_in(self, "readout")
        if model.parametrization == "mup":
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.multiplier)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, multiplier={self.multiplier:g}"


def assign_scales(model: nn.Module, config: ModelConfig) -> None:
    """Store model.lr_scales = {name: (lr scale, weight-decay scale)} for every parameter (call after building)."""
    hidden = {id(m.weight) for m in model.modules() if getattr(m, "mup_role", None) == "hidden"}
    mult = width_mult(config) if config.parametrization == "mup" else 1.0
    model.lr_scales = {name: (1 / mult, mult) if id(p) in hidden else (1.0, 1.0)
                       for name, p in model.named_parameters()}


def _clean(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in WRAPPERS)


def optimizer_groups(model: nn.Module, learning_rate: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups with muP's per-parameter lr and weight decay (all equal under sp).

    `model` is a model from build_model, possibly wrapped (DDP, FSDP, torch.compile): the groups come from the
    scales stored at build time. Frozen parameters are left out.
    """
    owner = next((m for m in model.modules() if hasattr(m, "lr_scales")), None)
    if owner is None:
        raise ValueError("model has no lr_scales: build it with normscale.model.build_model")
    groups: dict[tuple[float, float], list] = {}
    for name, param in owner.named_parameters():
        if not param.requires_grad:
            continue
        key = _clean(name)
        if key not in owner.lr_scales:
            raise ValueError(f"parameter {key!r} has no muP scale; parameters added after build_model are not scaled")
        groups.setdefault(owner.lr_scales[key], []).append(param)
    return [{"params": params, "lr": learning_rate * lr_scale, "weight_decay": weight_decay * wd_scale}
            for (lr_scale, wd_scale), params in sorted(groups.items())]
