"""A run's identity and the records a run directory keeps about its own life. Standard library only.

A run's identity is an explicit allow-list of the config keys that define what is trained (task, data, model,
optimisation, seed). Everything else says where or how a run is executed or observed (cache_dir, overwrite,
eval_kwargs, logging, log_every, eval_every, pack, storage limits): it is not identity, not part of run names and
not a sweep parameter. Identities are compared on configs read back through the schema, so a key added to
normscale later with a default compares equal to a config saved before it existed.

`max_steps` is identity with a rule of its own (`max_steps_change`): a run may be continued to more steps only where
the learning-rate schedule does not depend on max_steps (constant after warmup).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from normscale.config import Config, FaultError
from normscale.fileio import atomic_path

# Sections and keys that define what is trained; a whole section is named by itself.
IDENTITY_KEYS = (
    "setting", "model", "seed",
    "task_kwargs",
    "data_kwargs.source", "data_kwargs.eval_size",
    "model_kwargs.hidden_size", "model_kwargs.num_layers", "model_kwargs.num_heads",
    "model_kwargs.mlp_expansion_factor", "model_kwargs.parametrization", "model_kwargs.base_width",
    "training_kwargs.learning_rate", "training_kwargs.batch_size", "training_kwargs.max_steps",
    "training_kwargs.warmup_steps", "training_kwargs.lr_schedule", "training_kwargs.weight_decay",
    "training_kwargs.adam_beta1", "training_kwargs.adam_beta2", "training_kwargs.adam_eps",
    "training_kwargs.max_grad_norm", "training_kwargs.precision", "training_kwargs.gradient_accumulation_steps",
    "training_kwargs.compile", "training_kwargs.save_steps",
)
# Override keys that name a run's directory although they are not config keys of the schema: Hydra group choices.
IDENTITY_GROUPS = ("model", "training")

RUN_NAME_MAX = 200  # file names may have 255 bytes

CONFIG_FILE = "config_resolved.yaml"  # the run's Config; its first line lists the overrides
RESUME_LINK, RESUME_RECORD = "resume", "state.json"  # resume -> .resume-<step>/, whose state.json records it
FAILED_FILE = "failed.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")  # checkpoint-<step>/
TRAIN_METRICS, EVAL_METRICS = "train_metrics.jsonl", "eval_metrics.jsonl"  # records written while training
METRICS_FILES = {"standard": "metrics.pt", "single_task": "metrics-single_task.pt"}  # by eval mode  # a run that diverged: {"step", "reason"}; training it again needs overwrite=true


def identity(config: Config) -> dict:
    """{dotted key: value} of the keys that define what a run trains (nested sections flattened)."""
    flat = _flatten(dataclasses.asdict(config))
    return {k: v for k, v in sorted(flat.items()) if is_identity_key(k)}


def is_identity_key(key: str) -> bool:
    """Whether a dotted config key (or Hydra group) is part of a run's identity."""
    return any(key == k or key.startswith(k + ".") for k in IDENTITY_KEYS) or key in IDENTITY_GROUPS


def identity_hash(config: Config) -> str:
    """A short hash of the identity, recorded in checkpoints, resume states and metrics files. max_steps is left
    out: it may grow (`max_steps_change`), and the checkpoints and states written before stay the run's own."""
    kept = {k: v for k, v in identity(config).items() if k != "training_kwargs.max_steps"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def identity_diff(saved: Config, wanted: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: saved -> wanted` for every identity key whose values differ."""
    a, b = identity(saved), identity(wanted)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k not in ignore and a.get(k) != b.get(k)]


def max_steps_change(saved: Config, wanted: Config, done: int) -> str | None:
    """Why `wanted` cannot continue a run saved as `saved` that has trained `done` steps, as far as max_steps is
    concerned (None: it can). Only a learning-rate schedule that is constant after warmup leaves the steps already
    taken unchanged by another max_steps."""
    old, new = saved.training_kwargs.max_steps, wanted.training_kwargs.max_steps
    if old == new:
        return None
    if saved.training_kwargs.lr_schedule != "constant":
        return (f"training_kwargs.max_steps {old} -> {new}: the {saved.training_kwargs.lr_schedule} learning-rate "
                "schedule depends on max_steps, so the steps already trained would differ")
    if new < done:
        return f"training_kwargs.max_steps {old} -> {new}: the run has already trained {done} steps"
    return None


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_failure(run_dir: Path) -> dict | None:
    """The run's failure record ({"step", "reason", ...}), or None when it has not failed. A damaged record still
    marks the run as failed (only a failing run writes one)."""
    path = Path(run_dir) / FAILED_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        record = {}
    return {"step": "?", "reason": f"{FAILED_FILE} is damaged", **record}


def naming_overrides(overrides: list[str]) -> dict[str, str]:
    """{key: value} of the command-line overrides that name a run directory: identity keys (the last value of a
    repeated key, as Hydra takes it), except `setting` (part of the path) and `seed` (always appended)."""
    values = {}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if is_identity_key(key) and key not in ("setting", "seed"):
            values[key] = value
    return values


def is_sweep_parameter(key: str) -> bool:
    """Whether an override key a run was started with is a sweep parameter: the keys naming runs, and the seed."""
    return key == "seed" or (is_identity_key(key) and key != "setting")


def run_name(overrides: list[str], seed: int) -> str:
    """The run directory's name from the command line's overrides: sorted key=value pairs of the identity keys set
    there, unsafe characters replaced, a long list shortened with a hash of the whole, and the seed always last."""
    pairs = re.sub(r"[^A-Za-z0-9._=,+-]", "_",
                   ",".join(f"{k}={v}" for k, v in sorted(naming_overrides(overrides).items())))
    seed_part = f"seed={seed}"
    if len(pairs) + len(seed_part) + 1 > RUN_NAME_MAX:
        digest = hashlib.sha256(pairs.encode()).hexdigest()[:16]
        pairs = f"{pairs[:RUN_NAME_MAX - len(seed_part) - 18]}-{digest}"
    return f"{pairs},{seed_part}" if pairs else seed_part


def write_config(run_dir: Path, config: Config, overrides: list[str]) -> None:
    """config_resolved.yaml: the overrides as a comment, then the whole Config (written atomically)."""
    import yaml

    text = f"# overrides: {' '.join(overrides)}\n" + yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
    with atomic_path(Path(run_dir) / CONFIG_FILE) as tmp:
        tmp.write_text(text)


def read_config(run_dir: Path) -> Config:
    """A run's saved Config, read back through the schema (keys added to normscale since take their defaults)."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text())
    except (FileNotFoundError, yaml.YAMLError) as error:
        raise FaultError(f"{path} is missing or unreadable ({type(error).__name__}); the run cannot be trusted: "
                         "train it again with overwrite=true") from None
    if not isinstance(raw, dict):
        raise FaultError(f"{path} holds no config (it is empty or damaged); the run cannot be trusted: train it again "
                         "with overwrite=true")
    return Config.from_dict(raw)


def resume_states(run_dir: Path) -> list[Path]:
    """The run's resume state directories, newest first (the `resume` link points at the newest complete one)."""
    return sorted(Path(run_dir).glob(".resume-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)


def resume_step(run_dir: Path) -> int | None:
    """The step of the run's newest resume state with a readable record (files not verified: `choose_resume` does
    that before loading), or None when it has none."""
    for state in resume_states(run_dir):
        try:
            return json.loads((state / RESUME_RECORD).read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError):  # a save that did not finish, or a damaged record
            continue
    return None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, by step."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted(found)
