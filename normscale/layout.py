"""The on-disk layout (every directory and file name normscale reads or writes), a run's identity and the records a
run directory keeps about its own life. Standard library only.

    <cache_dir>/experiments/<setting>/<name>/       experiment_dir(config)
      data/<dataset>/manifest.json, ...             data_root(config); the files of a dataset are normscale.data.store's
      runs/<run_name>/                              runs_dir, run_directory(config, overrides), trained_run_dirs
        config_resolved.yaml, overrides.json        write_config, read_config, read_overrides
        checkpoint-<step>/                          checkpoint_dir, checkpoint_step, list_checkpoints
          model.safetensors, meta.json, metrics.pt  (weights and meta: normscale.checkpoints; METRICS_FILES by mode)
        resume -> .resume-<step>/state.json         RESUME_LINK, resume_state_dir, resume_states, resume_step
        .pack-<id>.json, .resume-<step>/pack.json    PACK_JOURNAL_PREFIX, PACK_POINTER (a pack's save: checkpoints)
        train_metrics.jsonl, eval_metrics.jsonl     TRAIN_METRICS, EVAL_METRICS
        failed.json, lock.json                      FAILED_FILE (read_failure), LOCK_FILE (normscale.runlock)
      runs/bayes-<kind>/<dataset>/, runs/llm-<model>/<dataset>/    single_shot_dir, bayes_label, llm_label
      sweeps/<stamp>-<hash>.json, sweeps/logs/<job>_<task>.out    sweep_manifest, latest_sweep_manifest, sweep_log
      metrics.h5                                    collated_file
      analysis/                                     analysis_dir

Every other module takes these names from here (tests/test_layout.py renames them and runs train, eval, collate and
sweep status). Functions read the names when called, so a name changed before the entry points are imported holds
everywhere.

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

from normscale.config import Config, FaultError, flat_config
from normscale.fileio import atomic_path, write_json

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

EXPERIMENTS_DIR = "experiments"  # under the cache directory: <setting>/<name>/ per experiment
DATA_DIR, DATA_MANIFEST = "data", "manifest.json"  # data/<dataset>/manifest.json
RUNS_DIR = "runs"
SWEEPS_DIR, SWEEP_LOGS_DIR = "sweeps", "logs"  # sweeps/<manifest>.json, sweeps/logs/<job>_<task>.out
COLLATED_FILE, ANALYSIS_DIR = "metrics.h5", "analysis"  # collated metrics; the figures and fit made from them
CONFIG_FILE = "config_resolved.yaml"  # the run's Config
OVERRIDES_FILE = "overrides.json"  # {"overrides": [the command line's overrides]}: the record of sweep parameters
LEGACY_OVERRIDES_PREFIX = "# overrides:"  # where runs written before OVERRIDES_FILE keep them: CONFIG_FILE's 1st line
LOCK_FILE = "lock.json"  # the run's one writer (normscale.runlock)
RESUME_LINK, RESUME_RECORD = "resume", "state.json"  # resume -> .resume-<step>/, whose state.json records it
RESUME_PREFIX = ".resume-"
PACK_JOURNAL_PREFIX = ".pack-"  # .pack-<id>.json in a pack's first run: the commit record of one save of the pack
PACK_POINTER = "pack.json"  # in a staged resume state of a packed run: {"journal": path of the pack's journal}
FAILED_FILE = "failed.json"  # a run that diverged: {"step", "reason"}; training it again needs overwrite=true
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-<step>/
TRAIN_METRICS, EVAL_METRICS = "train_metrics.jsonl", "eval_metrics.jsonl"  # records written while training
METRICS_FILES = {"standard": "metrics.pt", "single_task": "metrics-single_task.pt"}  # by eval mode
BAYES_PREFIX, LLM_PREFIX = "bayes-", "llm-"  # runs/<prefix><kind or model>/<dataset>/: models without checkpoints


def identity(config: Config) -> dict:
    """{dotted key: value} of the keys that define what a run trains (nested sections flattened)."""
    return {k: v for k, v in sorted(flat_config(config).items()) if is_identity_key(k)}


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
    """The run's records of what it is: the overrides it was started with (OVERRIDES_FILE), then the whole Config
    (CONFIG_FILE), each written atomically; the config last, since a run directory with a config is a run."""
    import yaml

    write_json(Path(run_dir) / OVERRIDES_FILE, {"overrides": list(overrides)})
    with atomic_path(Path(run_dir) / CONFIG_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides a run was started with (its sweep parameters among them), from its OVERRIDES_FILE.
    Runs written before that record existed keep them in the first line of their CONFIG_FILE
    (`# overrides: a=1 b=2`): this is the one reader of that older form."""
    run_dir = Path(run_dir)
    path = run_dir / OVERRIDES_FILE
    if path.exists():
        try:
            record = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("overrides"), list)):
            raise FaultError(f"{path} is damaged; the run's sweep parameters are unknown: train it again with "
                             "overwrite=true")
        return record["overrides"]
    first = (run_dir / CONFIG_FILE).read_text().partition("\n")[0]
    if not first.startswith(LEGACY_OVERRIDES_PREFIX):
        raise FaultError(f"{run_dir} has no {OVERRIDES_FILE}, so its sweep parameters are unknown: train it again "
                         "with overwrite=true")
    return first.removeprefix(LEGACY_OVERRIDES_PREFIX).split()


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


def resume_state_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{RESUME_PREFIX}{step}"


def resume_states(run_dir: Path) -> list[Path]:
    """The run's resume state directories, newest first (the `resume` link points at the newest complete one)."""
    return sorted(Path(run_dir).glob(f"{RESUME_PREFIX}*"), key=lambda p: int(p.name.removeprefix(RESUME_PREFIX)),
                  reverse=True)


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
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(name: str) -> int | None:
    """The step of a complete checkpoint directory called `name` (None: `name` is not one)."""
    step = name.removeprefix(CHECKPOINT_PREFIX)
    return int(step) if step != name and step.isdigit() else None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, by step."""
    found = [(step, p) for p in Path(run_dir).iterdir() if (step := checkpoint_step(p.name)) is not None]
    return sorted(found)


# ---------------------------------------------------------------- where experiments, runs and sweeps live


def experiments_root(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / EXPERIMENTS_DIR


def experiment_dir(config: Config) -> Path:
    return experiments_root(config.cache_dir) / config.setting / config.name


def find_experiments(cache_dir: str | Path, name: str) -> list[Path]:
    """The directories of experiments called `name` in any setting, sorted."""
    return sorted(p for p in experiments_root(cache_dir).glob(f"*/{name}") if p.is_dir())


def data_root(config: Config) -> Path:
    """Where the experiment's datasets live, one directory each (normscale.data.store names them)."""
    return experiment_dir(config) / DATA_DIR


def dataset_location(directory: Path) -> dict | None:
    """{cache_dir, setting, name} of the experiment a dataset directory belongs to, read from its path; None when
    the path is not <cache_dir>/experiments/<setting>/<name>/data/<dataset>."""
    up = Path(directory).parents
    if len(up) < 5 or up[0].name != DATA_DIR or up[3].name != EXPERIMENTS_DIR:
        return None
    return {"cache_dir": str(up[4]), "setting": up[2].name, "name": up[1].name}


def runs_dir(experiment: Path) -> Path:
    return Path(experiment) / RUNS_DIR


def run_directory(config: Config, overrides: list[str]) -> Path:
    """The run directory a command line trains: named from its overrides (`run_name`), so a requeued or resumed
    job finds its own."""
    return runs_dir(experiment_dir(config)) / run_name(overrides, config.seed)


def bayes_label(kind: str) -> str:
    return f"{BAYES_PREFIX}{kind}"


def llm_label(model_path: str) -> str:
    """llm-<the last component of the local directory or hub id>, made path-safe."""
    return LLM_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", model_path.rstrip("/").split("/")[-1])


def single_shot_dir(experiment: Path, label: str, dataset: str) -> Path:
    """Where a model without checkpoints (`bayes_label`, `llm_label`) keeps its results on one dataset."""
    return runs_dir(experiment) / label / dataset


def trained_run_dirs(experiment: Path) -> list[Path]:
    """The experiment's run directories that hold a trained model (a saved config; not a single-shot model's),
    sorted by name."""
    runs = runs_dir(experiment)
    if not runs.exists():
        return []
    return sorted(p for p in runs.iterdir() if (p / CONFIG_FILE).exists()
                  and not p.name.startswith((BAYES_PREFIX, LLM_PREFIX)))


def collated_file(experiment: Path) -> Path:
    return Path(experiment) / COLLATED_FILE


def analysis_dir(experiment: Path) -> Path:
    return Path(experiment) / ANALYSIS_DIR


def sweeps_dir(experiment: Path) -> Path:
    return Path(experiment) / SWEEPS_DIR


def sweep_manifest(experiment: Path, stamp: str, digest: str) -> Path:
    """A sweep's frozen points and jobs, named by when it was submitted and a hash of its points."""
    return sweeps_dir(experiment) / f"{stamp}-{digest}.json"


def latest_sweep_manifest(experiment: Path) -> Path | None:
    """The experiment's most recently written sweep manifest, or None when no sweep was submitted."""
    sweeps = sweeps_dir(experiment)
    manifests = sorted(sweeps.glob("*.json"), key=lambda p: p.stat().st_mtime) if sweeps.exists() else []
    return manifests[-1] if manifests else None


def sweep_logs_dir(manifest: Path) -> Path:
    return Path(manifest).parent / SWEEP_LOGS_DIR


def sweep_log(manifest: Path, task: str) -> Path:
    """The log of array task `task` ("<job>_<index>", or sbatch's pattern "%A_%a") of the sweep in `manifest`."""
    return sweep_logs_dir(manifest) / f"{task}.out"
