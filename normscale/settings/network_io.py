"""What a trained network reads and writes: the whole of what the backbones (normscale.model: Transformer, MLP,
GPT-NeoX) know of a setting, which builds it (`Setting.network_io`).

inputs "ids":   `read(batch)` gives (B, C) int64 token ids below `input_size`; a sequence model embeds them.
inputs "pairs": `read(batch)` gives xs (B, C, d = input_size) and ys (B, C); a sequence model reads the interleaved
                tokens x_1, y~_1, ..., x_C with y~ = (y, 0..0) (`interleave`), 2C-1 of them, and predicts at the x
                positions; ys[:, -1] is never read.
predicts "every": an output at each of the C positions, (B, C, output_size); "last": at the last one, (B, output_size).
An output_size of 1 is squeezed: (B, C) or (B,).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

INPUTS = ("ids", "pairs")
PREDICTS = ("every", "last")


@dataclass(frozen=True)
class NetworkIO:
    inputs: str
    input_size: int
    context_length: int
    output_size: int
    predicts: str
    read: Callable[[dict[str, torch.Tensor]], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]

    def __post_init__(self):
        if self.inputs not in INPUTS or self.predicts not in PREDICTS:
            raise ValueError(f"NetworkIO inputs={self.inputs!r}, predicts={self.predicts!r}: expected inputs in "
                             f"{INPUTS} and predicts in {PREDICTS}")

    @property
    def sequence_length(self) -> int:
        """Tokens a sequence model sees: C ids, or 2C-1 interleaved pair tokens."""
        return self.context_length if self.inputs == "ids" else 2 * self.context_length - 1

    def sequence_positions(self, h: torch.Tensor) -> torch.Tensor:
        """The hidden states (B, T, H) of a sequence model at the positions it predicts at."""
        if self.predicts == "last":
            return h[:, -1]
        return h if self.inputs == "ids" else h[:, ::2]

    def squeeze(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.squeeze(-1) if self.output_size == 1 else outputs


def interleave(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The (B, 2C-1, d) token sequence x_1, y~_1, ..., x_C of pairs (xs (B, C, d), ys (B, C))."""
    y_tokens = F.pad(ys[..., None].to(xs.dtype), (0, xs.shape[-1] - 1))
    B, C, d = xs.shape
    return torch.stack([xs, y_tokens], dim=2).reshape(B, 2 * C, d)[:, :-1]
