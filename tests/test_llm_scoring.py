"""Scoring urn sequences with a pretrained causal LM (SPEC F), on tiny random Llamas saved locally
(tests/llm_fixture.py): candidate-only scoring against the model's full-vocabulary softmax, the per-sequence colour
mapping, the single-token check, sharded (FSDP2) and offloaded (Accelerate) output weights, and peak memory
independent of the vocabulary size (measured in a fresh interpreter: `python tests/test_llm_scoring.py <dir> <dir>`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from llm_fixture import make_tiny_llama, make_tokenizer
from normscale import settings
from normscale.config import TaskConfig
from normscale.dist.accel import make_accelerator
from normscale.dist.llm import load_llm
from normscale.metrics import predict
from normscale.model.llm import COLOUR_WORDS, LLMError, LLMScorer, colour_token_ids, header_text, sequence_permutation

V, C, B = 5, 12, 6
WORDS = COLOUR_WORDS[:V]


def load(directory: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoTokenizer, LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(directory, dtype=dtype).eval(), AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=512, num_shards=4)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load(tiny_dir)


def urn_batch(size: int = B, context: int = C, num_colours: int = V, seed: int = 0) -> dict[str, torch.Tensor]:
    """An eval batch as ModelEvaluator passes it: tokens (start token V, then the draws), task ids, theta, rows."""
    g = torch.Generator().manual_seed(seed)
    gamma = -torch.rand(size, num_colours, generator=g).log()  # Exp(1): theta ~ Dirichlet(1)
    theta = gamma / gamma.sum(1, keepdim=True)
    draws = torch.multinomial(theta, context, replacement=True, generator=g)
    return {"tokens": torch.cat([torch.full((size, 1), num_colours), draws], 1), "task_ids": torch.zeros(size).long(),
            "theta": theta, "sequence_index": torch.arange(size) + 10}


def reference(model, tokenizer, batch, words_per_row) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive computation: each prompt written out as text and tokenised whole, full-vocabulary logits at every
    position, softmax, the colour words' probabilities at the last C positions; (renormalised log-probs, coverage)."""
    prompts = [header_text(WORDS) + "".join(" " + words[x] for x in row[:-1])
               for row, words in zip(batch["tokens"][:, 1:].tolist(), words_per_row, strict=True)]
    ids = torch.tensor([tokenizer.encode(p) for p in prompts])
    log_probs = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[:, -batch["tokens"].shape[1] + 1:]
    candidates = torch.tensor([[tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words]
                               for words in words_per_row])
    picked = log_probs.gather(2, candidates[:, None, :].expand(-1, log_probs.shape[1], -1))
    mass = picked.logsumexp(-1)
    return picked - mass[..., None], mass.exp()


@pytest.mark.parametrize("mapping", ["random", "fixed"])
def test_candidate_scoring_equals_full_vocabulary_softmax(tiny, mapping):
    model, tokenizer = tiny
    batch = urn_batch()
    scorer = LLMScorer(model, tokenizer, V, mapping=mapping, seed=3, vocab_chunk=100)  # 512 rows: 5 full chunks + 12
    out = scorer(batch)
    rows = scorer.permutations(batch).tolist()
    if mapping == "fixed":
        assert rows == [list(range(V))] * B
    want, coverage = reference(model, tokenizer, batch, [[WORDS[k] for k in row] for row in rows])
    assert out.shape == (B, C, V) and out.dtype == torch.float32 and scorer.coverage.shape == (B, C)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scorer.coverage, coverage, rtol=1e-5, atol=1e-7)
    assert (coverage < 0.2).all()  # a random model spreads its mass: the full normaliser matters
    urns = settings.get("balls_and_urns", TaskConfig(num_dims=V, context_length=C))
    torch.testing.assert_close(urns.predictions(out), out)  # as ModelEvaluator reads it
    torch.testing.assert_close(predict(urns, scorer, batch), out)


def test_bfloat16_model_scores_in_float32(tiny_dir):
    model, tokenizer = load(tiny_dir, torch.bfloat16)
    batch = urn_batch()
    scorer = LLMScorer(model, tokenizer, V, mapping="fixed", vocab_chunk=64)
    out = scorer(batch)
    want, coverage = reference(model, tokenizer, batch, [WORDS] * B)
    assert out.dtype == scorer.coverage.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=0.05)
    torch.testing.assert_close(scorer.coverage, coverage, rtol=0.05, atol=0)


@pytest.mark.parametrize("sharding", ["none", "device_map"])
def test_the_loader_loads_the_configured_bfloat16(tiny_dir, sharding):
    """normscale's own loader with conf/model/llm.yaml's dtype (bfloat16; the float32 fixture cast on load): every
    parameter bfloat16, scoring exactly as the model loaded by hand in bfloat16 (device_map: all on the one CPU)."""
    config = compose_config("model=llm", f"model_kwargs.model_path={tiny_dir}", f"model_kwargs.sharding={sharding}")
    assert config.model_kwargs.dtype == "bfloat16"
    model, tokenizer = load_llm(config, make_accelerator(config))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    batch = urn_batch()
    want = LLMScorer(*load(tiny_dir, torch.bfloat16), V, mapping="fixed", vocab_chunk=64)(batch)
    torch.testing.assert_close(LLMScorer(model, tokenizer, V, mapping="fixed", vocab_chunk=64)(batch), want,
                               rtol=0, atol=0)


def test_random_mapping_is_a_function_of_seed_and_sequence_index(tiny):
    model, tokenizer = tiny
    batch = urn_batch()
    scorer = LLMScorer(model, tokenizer, V, mapping="random", seed=1, vocab_chunk=100)
    rng = torch.random.get_rng_state()
    perms = scorer.permutations(batch)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.equal(perms, torch.stack([sequence_permutation(1, i, V) for i in batch["sequence_index"].tolist()]))
    assert len({tuple(p) for p in perms.tolist()}) > 1 and all(sorted(p) == list(range(V)) for p in perms.tolist())
    other_draws = {**urn_batch(seed=5), "sequence_index": batch["sequence_index"]}
    assert torch.equal(scorer.permutations(other_draws), perms)
    assert not torch.equal(LLMScorer(model, tokenizer, V, seed=2).permutations(batch), perms)

    out = scorer(batch)
    reversed_rows = scorer({k: v.flip(0) for k, v in batch.items()})
    halves = [scorer({k: v[part] for k, v in batch.items()}) for part in (slice(0, 2), slice(2, None))]
    torch.testing.assert_close(reversed_rows.flip(0), out)
    torch.testing.assert_close(torch.cat(halves), out)
    assert not torch.allclose(LLMScorer(model, tokenizer, V, mapping="fixed")(batch), out)

    with pytest.raises(LLMError, match="sequence_index"):
        scorer({k: v for k, v in batch.items() if k != "sequence_index"})
    fixed = LLMScorer(model, tokenizer, V, mapping="fixed")({k: v for k, v in batch.items() if k != "sequence_index"})
    assert fixed.shape == (B, C, V)


def test_colour_word_split_by_the_tokenizer_is_named(tiny):
    model, _ = tiny
    tokenizer = make_tokenizer(512, split_word="purple")
    assert colour_token_ids(tokenizer, ["red", "blue"]) == [tokenizer.convert_tokens_to_ids(w) for w in ("red", "blue")]
    with pytest.raises(LLMError) as error:
        LLMScorer(model, tokenizer, V, mapping="fixed")
    message = str(error.value)
    assert "'purple'" in message and "'pur', '##ple'" in message
    assert "pass colour words that are single tokens" in message
    assert "'red'" not in message
    LLMScorer(model, tokenizer, 4, mapping="fixed")  # purple is the 5th word: 4 colours never use it
    with pytest.raises(LLMError, match="num_colours=17"):
        LLMScorer(model, tokenizer, 17)


@pytest.fixture
def gloo_world_of_one():
    import torch.distributed as dist
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_and_offloaded_output_weights(tiny_dir, tiny, gloo_world_of_one):
    """FSDP2 (one gloo rank: parameters are DTensors, the head's gathered by full_tensor()) and Accelerate's CPU
    offload (parameters on the meta device, values in the hooks) score as the plain model does."""
    from accelerate import cpu_offload
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    batch = urn_batch()
    want = LLMScorer(*tiny, V, vocab_chunk=100)(batch)
    offloaded, tokenizer = load(tiny_dir)
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.lm_head.weight.is_meta
    torch.testing.assert_close(LLMScorer(offloaded, tokenizer, V, vocab_chunk=100)(batch), want)

    sharded, tokenizer = load(tiny_dir)
    mesh = init_device_mesh("cpu", (1,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh, reshard_after_forward=True)  # the root too, as accelerate's FSDP2 wraps it
    scorer = LLMScorer(sharded, tokenizer, V, vocab_chunk=100)
    outs = [scorer(batch) for _ in range(2)]
    assert isinstance(sharded.lm_head.weight, DTensor)
    for out in outs:
        torch.testing.assert_close(out, want)


# ---------------------------------------------------------------- peak memory, in a fresh interpreter

MEMORY_B, MEMORY_C, MEMORY_V, MEMORY_CHUNK = 8, 128, 8, 1024  # 1024 positions; chunk logits 4 MiB


def high_water_kib() -> int:
    return int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def peak_growth(run) -> int:
    """Bytes by which resident memory peaks during run() above its level before: the high-water mark VmHWM is reset
    to the current resident size first (Linux clear_refs 5), so earlier peaks in this process do not hide this one."""
    Path("/proc/self/clear_refs").write_text("5")
    before = high_water_kib()
    run()
    return (high_water_kib() - before) * 1024


def measure_one(directory: str) -> dict[str, int]:
    """Load, warm up on a tiny batch, then the peak growth of scoring a (8, 128) batch, and of the control computing
    full-vocabulary logits on the same input ids."""
    model, tokenizer = load(Path(directory))
    scorer = LLMScorer(model, tokenizer, MEMORY_V, mapping="random", vocab_chunk=MEMORY_CHUNK)
    batch = urn_batch(MEMORY_B, MEMORY_C, MEMORY_V)
    scorer(urn_batch(1, 2, MEMORY_V))
    draw_ids = scorer.colour_ids[batch["tokens"][:, 1:-1]]
    input_ids = torch.cat([scorer.header_ids.expand(MEMORY_B, -1), draw_ids], 1)
    with torch.no_grad():
        return {"scoring": peak_growth(lambda: scorer(batch)),
                "full_logits": peak_growth(lambda: model(input_ids=input_ids).logits)}


def measure(directories: list[str]) -> dict[int, dict[str, int]]:
    torch.set_num_threads(1)
    assert peak_growth(lambda: torch.ones(2**25)) > 2**27 > peak_growth(lambda: None), "VmHWM cannot be reset here"
    return {int(json.loads((Path(d) / "config.json").read_text())["vocab_size"]): measure_one(d) for d in directories}


def test_peak_memory_does_not_grow_with_the_vocabulary(tmp_path):
    small, large = 512, 51200
    directories = [str(make_tiny_llama(tmp_path / str(v), vocab_size=v)) for v in (small, large)]
    result = subprocess.run([sys.executable, __file__, *directories], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1"},
                            cwd=Path(__file__).parent, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = {int(v): p for v, p in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    full_logits = MEMORY_B * MEMORY_C * large * 4  # 200 MiB: (positions, vocabulary) float32
    print({v: {k: f"{b / 2**20:.1f} MiB" for k, b in p.items()} for v, p in peaks.items()})
    assert peaks[large]["full_logits"] > full_logits  # the measurement sees a (positions x vocabulary) allocation
    assert peaks[large]["scoring"] < 50 * 2**20 and peaks[large]["scoring"] < full_logits / 8
    assert peaks[large]["scoring"] < peaks[small]["scoring"] + 16 * 2**20


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1:])))
