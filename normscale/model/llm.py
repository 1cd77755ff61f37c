"""Pretrained causal LMs as urn predictors (SPEC F): `LLMScorer` scores normscale's saved urn sequences with a base
model (no chat template) behind the forward contract every normscale model follows.

Prompt: `header_text(words)` naming the V colour words, then the draws as colour words, each " word" one token, so
the input is the header's token ids (with the tokenizer's BOS if it adds one) followed by one token per draw, and
position arithmetic is exact. Colour c of normscale is word `mapping[c]` of the first V words: a permutation drawn per
sequence from (seed, sequence_index) (mapping="random"), or the identity (mapping="fixed").

One teacher-forced pass per batch. At each of the C prediction positions (the last header token and the first C - 1
draws) only the V candidate logits and the full-vocabulary log-normaliser are computed, the latter by a logsumexp
over chunks of `vocab_chunk` rows of the output embedding, so no (positions x vocabulary) logits are ever held:
`coverage` is the candidates' total probability under the full softmax, and the output is the candidates' log-probs
renormalised over the V colours. Imports torch only (transformers objects are passed in).
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from normscale.config import NormscaleError

COLOUR_WORDS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray",
                "silver", "gold", "violet", "navy", "olive")
MAPPINGS = ("random", "fixed")


class LLMError(NormscaleError):
    """A pretrained LM or its tokenizer that cannot score urn sequences as asked; the message names the fix."""


def header_text(words) -> str:
    """The prompt's header naming the colours; the draws follow as " word" tokens."""
    return (f"An urn contains balls of {len(words)} colours: {', '.join(words)}. "
            "Balls are drawn one at a time with replacement, and their colours are:")


def colour_token_ids(tokenizer, words) -> list[int]:
    """The single token id of " " + word for each word (encoded without special tokens); LLMError naming every word
    that is several tokens (with its pieces) or the unknown token."""
    encoded = {w: tokenizer.encode(" " + w, add_special_tokens=False) for w in words}
    unk = getattr(tokenizer, "unk_token_id", None)
    bad = {w: ids for w, ids in encoded.items() if len(ids) != 1 or ids[0] == unk}
    if bad:
        pieces = "; ".join(f"{' ' + w!r} -> {tokenizer.convert_ids_to_tokens(ids)}" for w, ids in bad.items())
        raise LLMError(f"colour words must each be one token (with their leading space) in this model's tokenizer, "
                       f"but {', '.join(map(repr, bad))} are not ({pieces}); pass colour words that are single "
                       f"tokens (LLMScorer(words=...))")
    ids = [ids[0] for ids in encoded.values()]
    if len(set(ids)) != len(ids):
        raise LLMError(f"colour words {list(words)} share token ids {ids}; pass distinct single-token colour words")
    return ids


def sequence_permutation(seed: int, index: int, num_colours: int) -> torch.Tensor:
    """(V,) word index of each colour for the sequence at row `index` of its split: a function of (seed, index)
    only, from its own generator (the global RNG is untouched)."""
    digest = hashlib.sha256(f"normscale-llm-colours:{seed}:{index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randperm(num_colours, generator=generator)


def output_weight(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding's full (vocabulary, hidden) weight and its bias (None if it has none).

    An FSDP2-sharded weight (a DTensor) is all-gathered with `.full_tensor()`: a collective, so every rank must call
    forward equally often (as the sharded model's own forward needs anyway). A weight that Accelerate's dispatch
    offloaded (on the meta device, its values in the module's hook) is loaded onto the hook's execution device.
    """
    hook = getattr(head, "_hf_hook", None)

    def full(name: str) -> torch.Tensor | None:
        tensor = getattr(head, name, None)
        if tensor is None:
            return None
        if hasattr(tensor, "full_tensor"):
            return tensor.full_tensor()
        if tensor.is_meta and hook is not None and getattr(hook, "weights_map", None) is not None:
            return hook.weights_map[name].to(hook.execution_device)
        return tensor

    weight = full("weight")
    if weight.is_meta:
        raise LLMError("the output embedding's weight is on the meta device and no offload hook holds its values; "
                       "load the model with its weights (from_pretrained)")
    return weight, full("bias")


def chunked_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      chunk: int) -> torch.Tensor:
    """logsumexp over the vocabulary of hidden @ weight.T + bias, (N,) float32, `chunk` rows of weight at a time:
    logits in the weight's dtype, accumulated in float32; at most (N, chunk) logits exist at once."""
    total = hidden.new_full(hidden.shape[:1], -torch.inf, dtype=torch.float32)
    for start in range(0, weight.shape[0], chunk):
        logits = hidden @ weight[start:start + chunk].T
        if bias is not None:
            logits = logits + bias[start:start + chunk]
        total = torch.logaddexp(total, logits.float().logsumexp(-1))
        del logits  # freed before the next chunk's are made
    return total


class LLMScorer(nn.Module):
    """A causal LM (transformers `...ForCausalLM`: `base_model` returns the final-norm hidden states,
    `get_output_embeddings()` the head) as a balls_and_urns predictor.

    forward(batch) takes `tokens` (B, C+1) (tokens[:, 0] the start token, then C draws, colours 0..V-1) and, for
    mapping="random", `sequence_index` (B,) (each sequence's row in its split); returns (B, C, V) float32
    log-probabilities over the V colours in normscale's order, output t predicting draw t+1 from draws 1..t
    (t = 0: right after the header). `coverage` holds the last call's (B, C) candidate probability mass.
    """

    def __init__(self, model: nn.Module, tokenizer, num_colours: int, mapping: str = "random", seed: int = 0,
                 words=COLOUR_WORDS, vocab_chunk: int = 8192):
        super().__init__()
        if mapping not in MAPPINGS:
            raise LLMError(f"colour mapping {mapping!r} is not allowed; choose one of: {', '.join(MAPPINGS)}")
        if not 2 <= num_colours <= len(words):
            raise LLMError(f"num_colours={num_colours} needs 2..{len(words)} colour words; {len(words)} given "
                           f"({', '.join(words)}): pass more single-token colour words")
        if vocab_chunk < 1:
            raise LLMError(f"vocab_chunk={vocab_chunk} must be >= 1")
        self.model, self.num_colours, self.mapping, self.seed, self.vocab_chunk = \
            model, num_colours, mapping, seed, vocab_chunk
        self.words = tuple(words[:num_colours])
        self.colour_ids = torch.tensor(colour_token_ids(tokenizer, self.words))
        header = header_text(self.words)
        self.header_ids = torch.tensor(tokenizer.encode(header, add_special_tokens=True))
        # Teacher forcing appends draw ids to the header's ids: they must be what the whole text encodes to.
        draws = [*range(num_colours), 0]
        whole = tokenizer.encode(header + "".join(" " + self.words[k] for k in draws), add_special_tokens=True)
        if whole != [*self.header_ids.tolist(), *self.colour_ids[draws].tolist()]:
            raise LLMError(f"this tokenizer encodes the header followed by colour words {list(self.words)} "
                           f"differently from the header's tokens then one token per word; pass other colour words")
        self.coverage: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"num_colours={self.num_colours}, mapping={self.mapping}, seed={self.seed}, words={self.words}"

    def permutations(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, V) index into `words` of each colour, per sequence."""
        size = batch["tokens"].shape[0]
        if self.mapping == "fixed":
            return torch.arange(self.num_colours).expand(size, -1)
        if "sequence_index" not in batch:
            raise LLMError("mapping='random' draws each sequence's colour words from its `sequence_index` (its row in "
                           "the split); the batch has none: add it, or use mapping='fixed'")
        return torch.stack([sequence_permutation(self.seed, int(i), self.num_colours)
                            for i in batch["sequence_index"].tolist()])

    def last_hidden_state(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) final-norm hidden states from one pass through the whole model (so that wrappers' forward
        hooks, FSDP2's unsharding or Accelerate's placement, run as usual), kept by a hook on the base model; the head
        runs on the last position only (logits_to_keep=1)."""
        kept = {}
        handle = self.model.base_model.register_forward_hook(lambda module, args, out: kept.update(h=out[0]))
        try:
            self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        finally:
            handle.remove()
        return kept["h"]

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = batch["tokens"]
        size, context = tokens.shape[0], tokens.shape[1] - 1
        device = tokens.device
        candidates = self.colour_ids[self.permutations(batch)].to(device)  # (B, V): token id of colour c per sequence
        draws = candidates.gather(1, tokens[:, 1:])  # (B, C)
        header = self.header_ids.to(device).expand(size, -1)
        input_ids = torch.cat([header, draws[:, :-1]], dim=1)  # the last draw is only predicted
        weight, bias = output_weight(self.model.get_output_embeddings())
        hidden = self.last_hidden_state(input_ids)[:, header.shape[1] - 1:].to(weight.device, weight.dtype)
        candidates = candidates.to(weight.device)
        logits = torch.einsum("bch,bvh->bcv", hidden, weight[candidates])
        if bias is not None:
            logits = logits + bias[candidates][:, None, :]
        logits = logits.float()  # (B, C, V)
        normaliser = chunked_logsumexp(hidden.flatten(0, 1), weight, bias, self.vocab_chunk).view(size, context)
        candidate_mass = logits.logsumexp(-1)
        self.coverage = (candidate_mass - normaliser).exp().to(device)
        return (logits - candidate_mass[..., None]).to(device)
