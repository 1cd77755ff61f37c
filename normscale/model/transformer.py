"""A GPT-NeoX-like Transformer with setting-specific read-in and read-out (SPEC A, the training contract).

Architecture as the predecessor's GPT-NeoX (transformers' GPTNeoXConfig with use_parallel_residual=False,
attention_bias=False): pre-LayerNorm blocks h += attn(LN(h)); h += mlp(LN(h)), rotary position embedding on the
first quarter of each head's dimensions (GPT-NeoX's rotary_pct 0.25, rotate-half convention), causal attention
through scaled_dot_product_attention, a GELU MLP of width hidden_size * mlp_expansion_factor, a final LayerNorm.
No dropout. Parameter names and the fused per-head [q | k | v] layout match GPT-NeoX's, so weights map one to one.

Inputs and outputs per setting:
  balls_and_urns     embedding of tokens[:, :-1] (V+1 ids)               -> (B, C, V+1) logits
  linear_regression  x_1, y~_1, ..., x_C with y~ = (y, 0..0), linear read-in -> (B, C) predictions at the x positions
  classification     x~_1, l_1, ..., x~_{C-1}, l_{C-1}, x~_q with l = (2y-1, 0..0), linear read-in
                                                                        -> (B, 2) logits at the query
Initialisation and muP scaling are functions of shapes (normscale.model.mup).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normscale.config import SETTINGS, ModelConfig, TaskConfig
from normscale.model import mup

ROTARY_FRACTION = 0.25  # GPT-NeoX's rotary_pct
ROTARY_BASE = 10_000.0
LAYER_NORM_EPS = 1e-5


def check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r} is not allowed; choose one of: {', '.join(SETTINGS)}")


def mlp_width(model: ModelConfig) -> int:
    width = round(model.hidden_size * model.mlp_expansion_factor)
    if width < 1:
        raise ValueError(f"model_kwargs.mlp_expansion_factor={model.mlp_expansion_factor} times hidden_size="
                         f"{model.hidden_size} gives an MLP of width {width}; it must be >= 1")
    return width


def output_size(setting: str, task: TaskConfig) -> int:
    return {"balls_and_urns": task.num_dims + 1, "linear_regression": 1, "classification": 2}[setting]


def sequence_length(setting: str, task: TaskConfig) -> int:
    return task.context_length if setting == "balls_and_urns" else 2 * task.context_length - 1


def interleave(setting: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Continuous settings: the (B, 2C-1, d) token sequence x_1, y~_1, ..., x_C (labels l = 2y-1 for classification)."""
    xs = batch["xs"]
    ys = batch["ys"] if setting == "linear_regression" else (2 * batch["labels"] - 1).to(xs.dtype)
    y_tokens = F.pad(ys[..., None], (0, xs.shape[-1] - 1))
    B, C, d = xs.shape
    return torch.stack([xs, y_tokens], dim=2).reshape(B, 2 * C, d)[:, :-1]


def rotary(q: torch.Tensor, k: torch.Tensor, rotary_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-NeoX rotary embedding on the first rotary_dims of each head; q, k are (..., T, head_dim)."""
    T = q.shape[-2]
    inv_freq = ROTARY_BASE ** -(torch.arange(0, rotary_dims, 2, device=q.device, dtype=torch.float32) / rotary_dims)
    angles = torch.arange(T, device=q.device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
    width = angles.shape[-1]

    def rotate(x):
        x_rot, x_pass = x[..., :width], x[..., width:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        return torch.cat([x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin, x_pass], dim=-1)

    return rotate(q), rotate(k)


class Attention(nn.Module):
    def __init__(self, model: ModelConfig):
        super().__init__()
        H = model.hidden_size
        self.num_heads, self.head_dim = model.num_heads, H // model.num_heads
        self.rotary_dims = int(self.head_dim * ROTARY_FRACTION)
        self.scale = mup.attention_scale(model)
        self.query_key_value = mup.hidden_linear(H, 3 * H, bias=False)
        self.dense = mup.hidden_linear(H, H, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, H = h.shape
        qkv = self.query_key_value(h).view(B, T, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = rotary(q, k, self.rotary_dims)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.dense(out.transpose(1, 2).reshape(B, T, H))


class MLPBlock(nn.Module):
    def __init__(self, model: ModelConfig):
        super().__init__()
        width = mlp_width(model)
        self.dense_h_to_4h = mup.hidden_linear(model.hidden_size, width)
        self.dense_4h_to_h = mup.hidden_linear(width, model.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(h)))


class Layer(nn.Module):
    def __init__(self, model: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(model.hidden_size, eps=LAYER_NORM_EPS)
        self.attention = Attention(model)
        self.post_attention_layernorm = nn.LayerNorm(model.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = MLPBlock(model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, setting: str, task: TaskConfig, model: ModelConfig):
        super().__init__()
        check_setting(setting)
        mup.check_parametrization(model)
        if model.hidden_size % model.num_heads:
            raise ValueError(f"model_kwargs.hidden_size={model.hidden_size} must be divisible by "
                             f"model_kwargs.num_heads={model.num_heads}")
        self.setting = setting
        H = model.hidden_size
        if setting == "balls_and_urns":
            self.read_in = mup.embedding(task.num_dims + 1, H)
        else:
            self.read_in = mup.input_linear(task.num_dims, H)
        self.layers = nn.ModuleList(Layer(model) for _ in range(model.num_layers))
        self.final_layer_norm = nn.LayerNorm(H, eps=LAYER_NORM_EPS)
        self.read_out = mup.Readout(H, output_size(setting, task), model)
        mup.assign_scales(self, model)

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.setting == "balls_and_urns":
            h = self.read_in(batch["tokens"][:, :-1])
        else:
            h = self.read_in(interleave(self.setting, batch))
        for layer in self.layers:
            h = layer(h)
        return self.final_layer_norm(h)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.hidden_states(batch)
        if self.setting == "balls_and_urns":
            return self.read_out(h)
        if self.setting == "linear_regression":
            return self.read_out(h[:, ::2]).squeeze(-1)
        return self.read_out(h[:, -1])
