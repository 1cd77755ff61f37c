"""model=hf_gpt_neox: the predecessor's transformers GPT-NeoX, behind normscale's forward contract.

GPTNeoXConfig as RI built it (use_parallel_residual=False, attention_bias=False, GPT-NeoX's default partial rotary
and 0.02 normal initialisation) with hidden_size, num_layers, num_heads and intermediate size
hidden_size * mlp_expansion_factor from model_kwargs, no dropout, positions covering the sequence.
balls_and_urns: GPTNeoXForCausalLM over V+1 token ids, its logits returned. Continuous settings: the GPTNeoXModel
backbone fed `inputs_embeds` from a linear read-in of the interleaved tokens (normscale.model.transformer.interleave),
with a Linear read-out of the last hidden state (PyTorch's default Linear initialisation, as RI), and without the
token embedding (SPEC G: RI kept an unused 50k-token one). Standard parametrisation only.
transformers is imported when a model is built, never at import.
"""
from __future__ import annotations

import torch
from torch import nn

from normscale.config import ModelConfig, TaskConfig
from normscale.model import mup
from normscale.model.transformer import check_setting, interleave, mlp_width, output_size, sequence_length


class HFGPTNeoX(nn.Module):
    def __init__(self, setting: str, task: TaskConfig, model: ModelConfig):
        super().__init__()
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXModel

        check_setting(setting)
        if model.parametrization != "sp":
            raise ValueError(f"model_kwargs.parametrization={model.parametrization!r} is not supported by "
                             "model=hf_gpt_neox (the predecessor's model); use parametrization=sp, or model=transformer "
                             "for muP")
        if model.hidden_size % model.num_heads:
            raise ValueError(f"model_kwargs.hidden_size={model.hidden_size} must be divisible by "
                             f"model_kwargs.num_heads={model.num_heads}")
        self.setting = setting
        urns = setting == "balls_and_urns"
        config = GPTNeoXConfig(
            vocab_size=task.num_dims + 1 if urns else 1, hidden_size=model.hidden_size,
            num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
            intermediate_size=mlp_width(model), max_position_embeddings=sequence_length(setting, task),
            use_parallel_residual=False, attention_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
            classifier_dropout=0.0, use_cache=False, tie_word_embeddings=False,
            bos_token_id=task.num_dims if urns else None, eos_token_id=None, pad_token_id=None)
        if urns:
            self.net = GPTNeoXForCausalLM(config)
        else:
            self.read_in = nn.Linear(task.num_dims, model.hidden_size)
            self.net = GPTNeoXModel(config)
            self.net.embed_in = None  # inputs_embeds only
            self.read_out = nn.Linear(model.hidden_size, output_size(setting, task))
        mup.assign_scales(self, model)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.setting == "balls_and_urns":
            return self.net(input_ids=batch["tokens"][:, :-1]).logits
        h = self.net(inputs_embeds=self.read_in(interleave(self.setting, batch))).last_hidden_state
        if self.setting == "linear_regression":
            return self.read_out(h[:, ::2]).squeeze(-1)
        return self.read_out(h[:, -1])
