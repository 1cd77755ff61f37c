"""model=hf_gpt_neox: the predecessor's transformers GPT-NeoX, behind normscale's forward contract.

GPTNeoXConfig as RI built it (use_parallel_residual=False, attention_bias=False, GPT-NeoX's default partial rotary
and 0.02 normal initialisation) with hidden_size, num_layers, num_heads and intermediate size
hidden_size * mlp_expansion_factor from model_kwargs, no dropout, positions covering the sequence. It knows no
setting, only its NetworkIO: token ids go through GPTNeoXForCausalLM (its own embedding and output head, vocabulary
the ids), its logits returned; pairs go through the GPTNeoXModel backbone fed `inputs_embeds` from a linear read-in of
the interleaved tokens, with a Linear read-out at the predicted positions (PyTorch's default Linear
initialisation, as RI), and without the token embedding (SPEC G: RI kept an unused 50k-token one). Standard
parametrisation only.
transformers is imported when a model is built, never at import.
"""
from __future__ import annotations

import torch
from torch import nn

from normscale.config import ModelConfig
from normscale.model import mup
from normscale.settings.network_io import NetworkIO
from normscale.model.transformer import check_heads, mlp_width, sequence_tokens


class HFGPTNeoX(nn.Module):
    def __init__(self, io: NetworkIO, model: ModelConfig):
        super().__init__()
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXModel

        if model.parametrization != "sp":
            raise ValueError(f"model_kwargs.parametrization={model.parametrization!r} is not supported by "
                             "model=hf_gpt_neox (the predecessor's model); use parametrization=sp, or model=transformer "
                             "for muP")
        check_heads(model)
        self.io = io
        ids = io.inputs == "ids"
        config = GPTNeoXConfig(
            vocab_size=io.input_size if ids else 1, hidden_size=model.hidden_size,
            num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
            intermediate_size=mlp_width(model), max_position_embeddings=io.sequence_length,
            use_parallel_residual=False, attention_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
            classifier_dropout=0.0, use_cache=False, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
        if ids:
            if io.output_size != io.input_size or io.predicts != "every":
                raise ValueError("model=hf_gpt_neox reads token ids as a causal LM: it predicts the next id at every "
                                 f"position, not {io.output_size} outputs at {io.predicts!r} positions")
            self.net = GPTNeoXForCausalLM(config)
        else:
            self.read_in = nn.Linear(io.input_size, model.hidden_size)
            self.net = GPTNeoXModel(config)
            self.net.embed_in = None  # inputs_embeds only
            self.read_out = nn.Linear(model.hidden_size, io.output_size)
        mup.assign_scales(self, model)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.io.inputs == "ids":
            return self.net(input_ids=self.io.read(batch)).logits
        h = self.net(inputs_embeds=self.read_in(sequence_tokens(self.io, batch))).last_hidden_state
        return self.io.squeeze(self.read_out(self.io.sequence_positions(h)))
