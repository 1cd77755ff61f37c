"""A GPT-NeoX-like Transformer: hidden states to hidden states, between the read-in and read-out its NetworkIO
asks for (SPEC A, the training contract). It knows no setting.

Architecture as the predecessor's GPT-NeoX (transformers' GPTNeoXConfig with use_parallel_residual=False,
attention_bias=False): pre-LayerNorm blocks h += attn(LN(h)); h += mlp(LN(h)), rotary position embedding on the
first quarter of each head's dimensions (GPT-NeoX's rotary_pct 0.25, rotate-half convention), causal attention
through scaled_dot_product_attention, a GELU MLP of width hidden_size * mlp_expansion_factor, a final LayerNorm.
No dropout. Parameter names and the fused per-head [q | k | v] layout match GPT-NeoX's, so weights map one to one.

Read-in (normscale.settings.network_io): token ids -> an embedding; pairs -> a linear read-in of the interleaved tokens
x_1, y~_1, ..., x_C. Read-out: a linear layer at the predicted positions (every position, the x positions, or the
last one).
Initialisation and muP scaling are functions of shapes (normscale.model.mup).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normscale.config import ModelConfig
from normscale.model import mup
from normscale.settings.network_io import NetworkIO, interleave

ROTARY_FRACTION = 0.25  # GPT-NeoX's rotary_pct
ROTARY_BASE = 10_000.0
LAYER_NORM_EPS = 1e-5


def mlp_width(model: ModelConfig) -> int:
    width = round(model.hidden_size * model.mlp_expansion_factor)
    if width < 1:
        raise ValueError(f"model_kwargs.mlp_expansion_factor={model.mlp_expansion_factor} times hidden_size="
                         f"{model.hidden_size} gives an MLP of width {width}; it must be >= 1")
    return width


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


def check_heads(model: ModelConfig) -> None:
    if model.hidden_size % model.num_heads:
        raise ValueError(f"model_kwargs.hidden_size={model.hidden_size} must be divisible by "
                         f"model_kwargs.num_heads={model.num_heads}")


def sequence_read_in(io: NetworkIO, width: int) -> nn.Module:
    """The read-in of a sequence model: an embedding of token ids, or a linear map of the interleaved pair tokens."""
    return mup.embedding(io.input_size, width) if io.inputs == "ids" else mup.input_linear(io.input_size, width)


def sequence_tokens(io: NetworkIO, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a sequence model's read-in takes: (B, C) ids, or the (B, 2C-1, d) interleaved pair tokens."""
    return io.read(batch) if io.inputs == "ids" else interleave(*io.read(batch))


class Transformer(nn.Module):
    def __init__(self, io: NetworkIO, model: ModelConfig):
        super().__init__()
        mup.check_parametrization(model)
        check_heads(model)
        self.io = io
        H = model.hidden_size
        self.read_in = sequence_read_in(io, H)
        self.layers = nn.ModuleList(Layer(model) for _ in range(model.num_layers))
        self.final_layer_norm = nn.LayerNorm(H, eps=LAYER_NORM_EPS)
        self.read_out = mup.Readout(H, io.output_size, model)
        mup.assign_scales(self, model)

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.read_in(sequence_tokens(self.io, batch))
        for layer in self.layers:
            h = layer(h)
        return self.final_layer_norm(h)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.io.squeeze(self.read_out(self.io.sequence_positions(self.hidden_states(batch))))
