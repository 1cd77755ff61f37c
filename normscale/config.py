"""Typed schemas for every config group, validation, and checkpoint schedules. Standard library only.

Hydra composes a plain dict at the entry points; `Config.from_dict` turns it into these dataclasses and
rejects unknown keys and bad values with one `ConfigError` naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from normscale import registry

TASK_PRIORS = ("uniform", "power_law", "constant_freq")
SCHEDULES = ("sqrt_schedule", "linear_schedule", "end_only")
MODELS = ("transformer", "mlp", "hf_gpt_neox", "bayes", "llm")
LLM_SHARDING = ("none", "device_map", "fsdp")
LLM_DTYPES = ("float32", "bfloat16", "float16")
COLOUR_MAPPINGS = ("random", "fixed")
BAYES_KINDS = ("memorizing", "generalizing", "const")
DATA_SOURCES = ("shards", "generate")
LR_SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16")
PARAMETRIZATIONS = ("sp", "mup")
EVAL_MODES = ("standard", "single_task")
FIT_FROM = ("all", "interpolation_threshold")
MAX_LEARNING_RATE = 1e30


class NormscaleError(Exception):
    """An error whose message names the problem and the fix; entry points print it as one line and exit with
    `exit_code` (docs/RELIABILITY.md): 2 bad input (nothing written), 1 a fault met while running, 3 the run
    failed (non-finite loss), 75 another process holds the run, 130 interrupted."""

    exit_code = 2


class ConfigError(NormscaleError, ValueError):
    """A configuration value or key that cannot be used; the message names the key and the fix."""


class RunRefusedError(ConfigError):
    """A run directory this config must not train: another identity, a failed run, a max_steps the schedule cannot
    follow. In a `-m` sweep the point is skipped and the others go on."""


class FaultError(NormscaleError):
    """A fault met while running (a damaged file found mid-way, a full disk): what was kept is named."""

    exit_code = 1


class RunFailedError(NormscaleError):
    """The run diverged (non-finite loss); it is recorded as failed in its directory."""

    exit_code = 3


class RunHeldError(NormscaleError):
    """Another live process holds the run's lock."""

    exit_code = 75


class InterruptedRunError(NormscaleError):
    """Ctrl-C: the resume state was saved."""

    exit_code = 130


def _choice(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _at_least(key: str, value, low, what: str = "") -> None:
    if value < low:
        raise ConfigError(f"{key}={value!r} must be >= {low}{what}")


@dataclass(frozen=True)
class TaskConfig:
    num_tasks: int = 64  # D, the number of training tasks
    num_dims: int = 8  # V colours (balls_and_urns) or input dimension d
    context_length: int = 128  # C draws / pairs / items incl. the query
    prior: str = "uniform"  # task prior over the D tasks
    prior_exponent: float = 1.0  # power_law: weight of task k proportional to (k+1)^-a
    num_ood_tasks: int = 500
    dirichlet_alpha: float = 1.0  # balls_and_urns: theta ~ Dirichlet(alpha 1_V)
    weight_variance: float = 1.0  # linear_regression: tau^2
    noise_variance: float | None = None  # linear_regression: sigma^2; None means num_dims/256 (RI)
    exemplar_noise: float = 0.5  # classification: w

    def check(self, key: str) -> None:
        _at_least(f"{key}.num_tasks", self.num_tasks, 1, " (D is the number of training tasks)")
        _at_least(f"{key}.num_dims", self.num_dims, 1)
        _at_least(f"{key}.context_length", self.context_length, 1)
        _at_least(f"{key}.num_ood_tasks", self.num_ood_tasks, 1)
        _choice(f"{key}.prior", self.prior, TASK_PRIORS)
        _at_least(f"{key}.prior_exponent", self.prior_exponent, 0, " (a = 0 is uniform; weights decrease with k)")
        for name in ("dirichlet_alpha", "weight_variance", "exemplar_noise"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)!r} must be > 0")
        if self.noise_variance is not None and self.noise_variance <= 0:
            raise ConfigError(f"{key}.noise_variance={self.noise_variance!r} must be > 0 (or null for num_dims/256)")

    @property
    def sigma2(self) -> float:
        return self.num_dims / 256 if self.noise_variance is None else self.noise_variance


@dataclass(frozen=True)
class DataConfig:
    source: str = "shards"  # shards: pre-batched HDF5; generate: on-device counter-based batches
    eval_size: int = 2048  # sequences per eval split in each saved eval block (block 0 is the set data always had)
    max_storage_gb: float = 10.0  # refuse to write shards larger than this (suggesting source=generate)
    shard_mb: float = 64.0  # target size of one train shard file

    def check(self, key: str) -> None:
        _choice(f"{key}.source", self.source, DATA_SOURCES)
        _at_least(f"{key}.eval_size", self.eval_size, 1)
        if self.max_storage_gb <= 0 or self.shard_mb <= 0:
            raise ConfigError(f"{key}.max_storage_gb and {key}.shard_mb must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 64
    num_layers: int = 1
    num_heads: int = 1
    mlp_expansion_factor: float = 4.0
    parametrization: str = "sp"
    base_width: int = 128  # muP base width
    kind: str = "memorizing"  # model=bayes: which predictor
    # model=llm: a pretrained causal LM (SPEC F)
    model_path: str | None = None  # a local directory or a hub id
    dtype: str = "bfloat16"
    sharding: str = "none"  # none | device_map (Accelerate's dispatch) | fsdp (each rank holds 1/world, under accelerate launch)
    max_memory: str | None = None  # device_map: budget per device, cpu included ("70GiB", "500KB"); the rest goes to offload_folder
    offload_folder: str | None = None
    trust_remote_code: bool = False
    colour_mapping: str = "random"  # random (per sequence) | fixed
    vocab_chunk: int = 8192  # rows of the output embedding per step of the chunked log-normaliser

    def check(self, key: str) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "base_width"):
            _at_least(f"{key}.{name}", getattr(self, name), 1)
        if self.mlp_expansion_factor <= 0:
            raise ConfigError(f"{key}.mlp_expansion_factor={self.mlp_expansion_factor!r} must be > 0")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{key}.hidden_size={self.hidden_size} must be divisible by {key}.num_heads={self.num_heads}")
        _choice(f"{key}.parametrization", self.parametrization, PARAMETRIZATIONS)
        _choice(f"{key}.kind", self.kind, BAYES_KINDS)
        _choice(f"{key}.sharding", self.sharding, LLM_SHARDING)
        _choice(f"{key}.dtype", self.dtype, LLM_DTYPES)
        _choice(f"{key}.colour_mapping", self.colour_mapping, COLOUR_MAPPINGS)
        _at_least(f"{key}.vocab_chunk", self.vocab_chunk, 1)


@dataclass(frozen=True)
class SaveSteps:
    schedule: str = "sqrt_schedule"
    num_checkpoints: int = 100  # n
    first_step: int = 20  # s0

    def check(self, key: str) -> None:
        _choice(f"{key}.schedule", self.schedule, SCHEDULES)
        if self.schedule != "end_only":
            _at_least(f"{key}.num_checkpoints", self.num_checkpoints, 2, f" for {self.schedule} (use end_only for one)")
            _at_least(f"{key}.first_step", self.first_step, 1)


@dataclass(frozen=True)
class TrainingConfig:
    learning_rate: float = 5e-4
    batch_size: int = 64  # global: split across ranks
    max_steps: int = 100_000
    warmup_steps: int = 5_000
    lr_schedule: str = "constant"  # after warmup
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    gradient_accumulation_steps: int = 1
    compile: bool = False
    eval_every: int = 1000
    log_every: int = 100
    save_steps: SaveSteps = field(default_factory=SaveSteps)

    def check(self, key: str) -> None:
        if not 0 < self.learning_rate <= MAX_LEARNING_RATE:
            raise ConfigError(f"{key}.learning_rate={self.learning_rate!r} must be > 0 and <= {MAX_LEARNING_RATE:g} "
                              "(beyond it AdamW's float32 step size overflows)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}={getattr(self, name)!r} must be in [0, 1)")
        for name in ("weight_decay", "adam_eps"):
            _at_least(f"{key}.{name}", getattr(self, name), 0)
        if self.max_grad_norm <= 0:
            raise ConfigError(f"{key}.max_grad_norm={self.max_grad_norm!r} must be > 0 (the gradient-clipping norm)")
        for name in ("batch_size", "max_steps", "gradient_accumulation_steps", "eval_every", "log_every"):
            _at_least(f"{key}.{name}", getattr(self, name), 1)
        _at_least(f"{key}.warmup_steps", self.warmup_steps, 0)
        _choice(f"{key}.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice(f"{key}.precision", self.precision, PRECISIONS)
        self.save_steps.check(f"{key}.save_steps")
        if self.save_steps.schedule != "end_only" and self.save_steps.first_step > self.max_steps:
            raise ConfigError(
                f"{key}.save_steps.first_step={self.save_steps.first_step} exceeds {key}.max_steps={self.max_steps}; "
                f"lower {key}.save_steps.first_step or use {key}.save_steps.schedule=end_only")


@dataclass(frozen=True)
class EvalConfig:
    mode: str = "standard"
    batch_size: int = 128
    num_eval_batches: int = 16  # a prefix of the eval sets, extended by further saved blocks beyond eval_size
    return_all: bool = False  # also save predictions and labels of every evaluated sequence
    save_hidden_states: bool = False  # also save the final hidden states on the fit subset
    run: str | None = None  # evaluate only this run directory (its name under runs/); None: every run
    fit_size: int = 256  # leading sequences of each split whose predictions are saved (float16) for the fit
    sequences_per_task: int = 8  # single_task mode: sequences of each training task
    strategy_loss_sequences: int = 10_000  # model=bayes: fresh ID sequences for L_s (median of 10 means)

    def check(self, key: str) -> None:
        _choice(f"{key}.mode", self.mode, EVAL_MODES)
        _at_least(f"{key}.batch_size", self.batch_size, 1)
        _at_least(f"{key}.num_eval_batches", self.num_eval_batches, 1)
        _at_least(f"{key}.fit_size", self.fit_size, 0)
        _at_least(f"{key}.sequences_per_task", self.sequences_per_task, 1)
        _at_least(f"{key}.strategy_loss_sequences", self.strategy_loss_sequences, 10, " (10 groups for the median of means)")


@dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = True
    project: str = "normscale"

    def check(self, key: str) -> None:
        pass


# Hydra key of each section -> its schema.
SECTIONS: dict[str, type] = {
    "task_kwargs": TaskConfig,
    "data_kwargs": DataConfig,
    "model_kwargs": ModelConfig,
    "training_kwargs": TrainingConfig,
    "eval_kwargs": EvalConfig,
    "logging": LoggingConfig,
}


PACK_EXECUTIONS = ("auto", "stacked", "in_turn")


@dataclass(frozen=True)
class Config:
    name: str = "default"
    setting: str = "balls_and_urns"
    model: str = "transformer"
    seed: int = 0
    overwrite: bool = False
    cache_dir: str = "./cache"
    pack: int | str = 1  # runs of one shape trained together (normscale.pack); 1: solo; auto: as many as fit a GPU
    pack_execution: str = "auto"  # stacked | in_turn | auto (stacked on a GPU, in turn on a CPU: bench/bench_pack.py)
    fit_from: str = "all"  # checkpoints the normative fit uses: all | interpolation_threshold (RI's filter)
    task_kwargs: TaskConfig = field(default_factory=TaskConfig)
    data_kwargs: DataConfig = field(default_factory=DataConfig)
    model_kwargs: ModelConfig = field(default_factory=ModelConfig)
    training_kwargs: TrainingConfig = field(default_factory=TrainingConfig)
    eval_kwargs: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def packed(self) -> bool:
        """Whether a sweep's runs train in packs (pack=N > 1, or auto)."""
        return self.pack == "auto" or self.pack > 1

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        config = _build(cls, raw, "")
        config.check()
        return config

    def check(self) -> None:
        _choice("setting", self.setting, registry.names())
        _choice("model", self.model, MODELS)
        if self.model == "hf_gpt_neox" and self.model_kwargs.parametrization == "mup":
            raise ConfigError("model=hf_gpt_neox trains transformers' GPTNeoX as the predecessor did (sp only); "
                              "use model=transformer for model_kwargs.parametrization=mup")
        if not self.name or "/" in self.name:
            raise ConfigError(f"name={self.name!r} must be a non-empty name without '/'")
        _at_least("seed", self.seed, 0)
        if self.pack != "auto":
            if not isinstance(self.pack, int):
                raise ConfigError(f"pack={self.pack!r} must be a number of runs or auto")
            _at_least("pack", self.pack, 1, " (runs per pack; 1 trains each run alone)")
        _choice("pack_execution", self.pack_execution, PACK_EXECUTIONS)
        _choice("fit_from", self.fit_from, FIT_FROM)
        for key in SECTIONS:
            getattr(self, key).check(key)

    @property
    def checkpoint_steps(self) -> list[int]:
        s = self.training_kwargs.save_steps
        return checkpoint_schedule(s.schedule, self.training_kwargs.max_steps, s.num_checkpoints, s.first_step)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The learning-rate multiplier at `step` (LambdaLR's factor): linear warmup over `warmup` steps, then constant,
    linear decay to 0, or cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def checkpoint_schedule(schedule: str, max_steps: int, num_checkpoints: int = 100, first_step: int = 20) -> list[int]:
    """Checkpoint steps (SPEC E): sqrt and linear spacing from first_step to max_steps, or the end only."""
    _choice("training_kwargs.save_steps.schedule", schedule, SCHEDULES)
    T, n, s0 = max_steps, num_checkpoints, first_step
    if schedule == "end_only":
        return [T]
    if schedule == "sqrt_schedule":
        lo, hi = math.sqrt(s0), math.sqrt(T)
        steps = [math.floor((lo + i * (hi - lo) / (n - 1)) ** 2) for i in range(n)]
    else:
        steps = [math.floor(s0 + i * (T - s0) / (n - 1)) for i in range(n)]
    return sorted(set(steps + [T]))


def flat_config(config: Config) -> dict:
    """{dotted key: value} of every leaf of a config ("training_kwargs.save_steps.schedule": ...)."""
    def flatten(tree: dict, prefix: str) -> dict:
        flat = {}
        for key, value in tree.items():
            flat |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        return flat

    return flatten(dataclasses.asdict(config), "")


def schema_keys(schema: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a schema accepts (sections expanded), for error messages and override checks."""
    keys = []
    for name, annotation in typing.get_type_hints(schema).items():
        nested = dataclasses.is_dataclass(annotation)
        keys += schema_keys(annotation, f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return keys


def _build(schema: type, raw, key: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed keys{' in ' + key if key else ''}: {', '.join(names)}")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{key}.{name}" if key else name)
    return schema(**values)


def _coerce(annotation, value, key: str):
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if union and type(None) in typing.get_args(annotation):
        if value is None:
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    elif union:  # int | str: a value of either type, as given
        options = typing.get_args(annotation)
        if isinstance(value, options) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be of type {' or '.join(o.__name__ for o in options)}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if annotation is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # 1e5 from YAML
    if not isinstance(value, annotation) or (annotation is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r} must be of type {annotation.__name__}")
    return value


def resolve_cache_dir(value: str | None = None) -> Path:
    """CACHE_DIR: an explicit value, else the environment (after .env), else ./cache; made absolute."""
    return Path(value or os.environ.get("CACHE_DIR") or "./cache").expanduser().resolve()
