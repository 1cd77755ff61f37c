"""The MLP baseline (DESIGN): position t is predicted from the flattened, zero-padded prefix plus a one-hot of t.

The input of position t is the sequence's C position blocks flattened, blocks after t set to zero, then a one-hot
of t (C entries). A block holds the input of that position (normscale.settings.network_io): token ids one-hot (urns:
V+1 entries, start token included, so output t reads tokens[:, :t+1] and predicts tokens[:, t+1]); pairs (x_s, y_s),
d+1 entries, whose y part is zero at and after t itself (prediction t sees x_<=t and y_<t: the transformer's y~
tokens, without their always-zero entries). It knows no setting: its NetworkIO says what it reads and predicts.

The network is num_layers hidden layers of width hidden_size * mlp_expansion_factor (GELU), then a read-out: the
same width the Transformer's MLP has, so mlp_expansion_factor titrates capacity alike and the muP width multiplier
is hidden_size / base_width for both models. The first layer is a Linear over the flattened input; since
block s enters every position t >= s through the same weight columns, all C positions are computed in one pass as a
cumulative sum of per-block contributions, O(B C k W) instead of materialising the (B, C, C k) masked inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normscale.config import ModelConfig
from normscale.model import mup
from normscale.settings.network_io import NetworkIO
from normscale.model.transformer import mlp_width


class PrefixLinear(nn.Linear):
    """The first layer: a Linear over the flattened (C blocks of k entries, then a one-hot of t) input of every t."""

    def __init__(self, context_length: int, block: int, width: int):
        super().__init__(context_length * (block + 1), width)
        self.context_length, self.block = context_length, block
        mup.init_fan_in(self, "input")

    def forward(self, tokens: torch.Tensor, ys: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, C, k) enter positions t >= s, or with ys (B, C): tokens (B, C, k-1) and ys entering t > s.
        Returns the (B, C, W) pre-activations."""
        C, k = self.context_length, self.block
        blocks, positions = self.weight[:, :C * k].view(-1, C, k), self.weight[:, C * k:]
        if ys is None:
            pre = torch.einsum("bsk,wsk->bsw", tokens, blocks).cumsum(1)
        else:
            y_part = torch.einsum("bs,ws->bsw", ys, blocks[..., -1]).cumsum(1)
            pre = torch.einsum("bsk,wsk->bsw", tokens, blocks[..., :-1]).cumsum(1) + F.pad(y_part[:, :-1], (0, 0, 1, 0))
        return pre + positions.T + self.bias


class MLP(nn.Module):
    def __init__(self, io: NetworkIO, model: ModelConfig):
        super().__init__()
        mup.check_parametrization(model)
        self.io = io
        width = mlp_width(model)
        block = io.input_size if io.inputs == "ids" else io.input_size + 1  # a one-hot id, or (x, y)
        self.read_in = PrefixLinear(io.context_length, block, width)
        self.hidden = nn.ModuleList(mup.hidden_linear(width, width) for _ in range(model.num_layers - 1))
        self.read_out = mup.Readout(width, io.output_size, model)
        mup.assign_scales(self, model)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.io.inputs == "ids":
            h = self.read_in(F.one_hot(self.io.read(batch), self.read_in.block).to(self.read_in.weight.dtype))
        else:
            h = self.read_in(*self.io.read(batch))
        if self.io.predicts == "last":
            h = h[:, -1]
        h = F.gelu(h)
        for layer in self.hidden:
            h = F.gelu(layer(h))
        return self.io.squeeze(self.read_out(h))
