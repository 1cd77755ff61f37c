"""Which runs can train together as one pack, and the packs a sweep forms (issue 13). Standard library only: the
sweep planner forms packs on a login node.

A pack is one model whose parameters carry a leading run axis, so its runs must agree on everything that sets a
tensor's shape or the step's structure (SHAPE_KEYS); they may differ in everything else: the tasks (D, prior,
exponent, seed, their hyperparameters), the optimiser's numbers (learning rate, schedule, warmup, betas, eps, weight
decay, clipping norm), max_steps and the checkpoint schedule. `pack` is not part of a run's identity, name or sweep
parameters: a packed run writes the run directory its solo run would.
"""
from __future__ import annotations

from normscale.config import Config, flat_config

# Dotted config keys on which the runs of one pack must agree, with why.
SHAPE_KEYS = {
    "setting": "the batch layout and the network's read-in and read-out",
    "model": "the architecture",
    "task_kwargs.num_dims": "input and output sizes",
    "task_kwargs.context_length": "sequence length",
    "model_kwargs.hidden_size": "width",
    "model_kwargs.num_layers": "depth",
    "model_kwargs.num_heads": "attention heads",
    "model_kwargs.mlp_expansion_factor": "MLP width",
    "model_kwargs.parametrization": "initialisation and the muP scales",
    "model_kwargs.base_width": "the muP width multiplier (a forward multiplier)",
    "training_kwargs.batch_size": "the batch axis",
    "training_kwargs.gradient_accumulation_steps": "the step's micro-batches",
    "training_kwargs.precision": "the dtype",
    "training_kwargs.compile": "one compiled graph",
    "data_kwargs.source": "how batches are read",
    "pack_execution": "how the pack steps",
}


def stacked(execution: str, device_type: str) -> bool:
    """Whether a pack steps as one stacked model: pack_execution=stacked, or auto on a GPU (on a CPU a step is
    compute-bound and its runs in turn are faster: bench/bench_pack.py, docs/BENCHMARKS.md)."""
    return execution == "stacked" or (execution == "auto" and device_type == "cuda")


def shape_key(config: Config) -> tuple:
    """The values of SHAPE_KEYS: runs with equal keys can share a pack."""
    flat = flat_config(config)
    return tuple(flat[key] for key in SHAPE_KEYS)


def why_apart(a: Config, b: Config) -> list[str]:
    """Why two runs cannot share a pack: 'key a != b (what it sets)' for each shape key they differ in."""
    fa, fb = flat_config(a), flat_config(b)
    return [f"{key} {fa[key]!r} != {fb[key]!r} ({why})" for key, why in SHAPE_KEYS.items() if fa[key] != fb[key]]


def form_packs(configs: list[Config], size: int) -> list[list[int]]:
    """Indices of `configs` grouped into packs of at most `size` runs of one shape, in sweep order: each shape's runs
    in order of appearance, cut into consecutive packs (so runs of similar max_steps tend to share one when the sweep
    lists them together)."""
    if size < 1:
        raise ValueError(f"pack={size} must be >= 1")
    by_shape: dict[tuple, list[int]] = {}
    for i, config in enumerate(configs):
        by_shape.setdefault(shape_key(config), []).append(i)
    return [members[j:j + size] for members in by_shape.values() for j in range(0, len(members), size)]

