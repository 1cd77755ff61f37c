"""Test-only: a tiny randomly initialised Llama and a local tokenizer, saved like a hub checkpoint (several safetensors
shards), for scoring pretrained-LLM predictions (SPEC F) without a network.

The tokenizer is a WordPiece model over a whitespace/punctuation pre-tokenizer with a BOS post-processor: every word
of the header and of COLOUR_WORDS is one token (so " red" is one token), filler tokens pad the vocabulary to
`vocab_size`, and `split_word` leaves that colour word out of the vocabulary with only its two pieces in, so that it
encodes as several tokens.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from normscale.model.llm import COLOUR_WORDS, header_text

SPECIALS = ("[UNK]", "<s>")


def make_tokenizer(vocab_size: int = 512, split_word: str | None = None) -> PreTrainedTokenizerFast:
    words = set(re.findall(r"\w+|[^\w\s]", header_text(COLOUR_WORDS))) | set(COLOUR_WORDS)
    words |= {str(n) for n in range(1, len(COLOUR_WORDS) + 1)}
    if split_word is not None:
        words = (words - {split_word}) | {split_word[:3], "##" + split_word[3:]}
    vocab = {token: i for i, token in enumerate([*SPECIALS, *sorted(words)])}
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is below the {len(vocab)} tokens the prompts need")
    vocab.update({f"filler{i}": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="[UNK]")


def make_tiny_llama(directory: str | Path, vocab_size: int = 512, num_shards: int = 4, seed: int = 0,
                    split_word: str | None = None) -> Path:
    """Save a tokenizer and a random LlamaForCausalLM (hidden 32, 2 layers, 4 heads, untied head) in `directory`, the
    weights in at least `num_shards` safetensors files; returns the directory."""
    directory = Path(directory)
    tokenizer = make_tokenizer(vocab_size, split_word)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=None,
                         pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # The decoder layers alone fill num_shards shards; the embedding and the head take one (or more) of their own.
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    model.save_pretrained(directory, max_shard_size=layer_bytes // num_shards)
    tokenizer.save_pretrained(directory)
    shards = list(directory.glob("*.safetensors"))
    assert len(shards) >= num_shards, f"{len(shards)} safetensors shards in {directory}, wanted >= {num_shards}"
    return directory
