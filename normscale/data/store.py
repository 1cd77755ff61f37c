"""The on-disk data of an experiment: task pools, eval sets and pre-batched, step-indexed HDF5 train shards.

    ${CACHE_DIR}/experiments/${setting}/${name}/data/<dataset>/
      manifest.json          spec, key, shard layout, and per file: bytes, sha256, arrays (shape, dtype)
      tasks.h5               train/ (the D tasks), ood/ (the OOD tasks)
      eval.h5                eval block 0: one group per split (id, ood, iwl) of eval_size sequences, each with a
                             content hash attribute
      eval/block-00001.h5    eval block 1, ... (same layout): saved when an evaluation asks for more sequences
      train/shard-00000.h5   steps [0, S), arrays (S, B, ...); shard j holds steps [jS, (j+1)S)

<dataset> is named by a hash of everything that determines the data (DESIGN, data identity), so runs that
differ only in model or optimiser share it and different data never do. Every file is written to a temporary
name and renamed; writers hold an flock on the dataset's lock file, so concurrent requests leave one copy.

An eval set of n sequences per split is the first n of a sequence of eval blocks of eval_size sequences each, block b
drawn from its own stream (data seed, split, b): `load_eval_splits(directory, n)` saves the blocks it lacks first, so
sets of any size agree on their common prefix, and block 0 (eval.h5) is the eval set of datasets made before blocks.

Generation is deterministic (batch i is a function of (seed, i) alone), so a damaged file can be restored
byte-identically: `prepare_data(config, verify=True)` (the data command) regenerates exactly the files that are
missing, truncated or altered (checked against the manifest's size and sha256) and installs one only when its sha256
equals the manifest's; a damaged or missing manifest is rebuilt from the files, each compared with a fresh
generation. Every error that gives advice names the data command that repairs (`data_command`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from normscale.config import Config, ConfigError, DataConfig, EvalConfig, NormscaleError, TaskConfig, TrainingConfig
from normscale import settings
from normscale.data.dataset import MixtureDataset, draw_task_pools, make_eval_splits, make_single_task_split
from normscale.fileio import atomic_path, file_lock, sha256_bytes, write_json
from normscale.layout import DATA_MANIFEST, data_root, dataset_location

FORMAT_VERSION = 1
MANIFEST = DATA_MANIFEST
MAX_STEPS_PER_SHARD = 4096  # small batches: a short run generates at most this many steps beyond its own


class DataIntegrityError(NormscaleError, RuntimeError):
    """A data file is missing, truncated or altered; the message names the file and how to regenerate it."""


@dataclass(frozen=True)
class DataPlan:
    """Where an experiment's data live and how big they are, known before anything is written."""
    directory: Path
    key: str
    spec: dict
    steps_per_shard: int
    num_shards: int  # shards needed to cover max_steps
    bytes_per_step: int  # uncompressed
    train_bytes: int  # uncompressed, num_shards * steps_per_shard * bytes_per_step
    eval_bytes: int

    def shard_name(self, index: int) -> str:
        return f"train/shard-{index:05d}.h5"


def plan_data(config: Config) -> DataPlan:
    task, training, data = config.task_kwargs, config.training_kwargs, config.data_kwargs
    setting = settings.get(config.setting, task)
    setting.check(max(task.num_tasks, task.num_ood_tasks))
    bytes_per_step = _bytes_per_step(setting, training.batch_size)
    steps_per_shard = _steps_per_shard(data.shard_mb, bytes_per_step)
    spec = {"format": FORMAT_VERSION, "setting": config.setting, "task_kwargs": dataclasses.asdict(task),
            "sigma2": task.sigma2, "seed": config.seed, "batch_size": training.batch_size,
            "eval_size": data.eval_size, "steps_per_shard": steps_per_shard}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    name = f"D{task.num_tasks}-{task.prior}-b{training.batch_size}-seed{config.seed}-{key}"
    num_shards = math.ceil(training.max_steps / steps_per_shard)
    eval_bytes = len(setting.eval_splits) * _bytes_per_step(setting, data.eval_size)
    return DataPlan(data_root(config) / name, key, spec, steps_per_shard, num_shards, bytes_per_step,
                    num_shards * steps_per_shard * bytes_per_step, eval_bytes)


def _bytes_per_step(setting, batch_size: int) -> int:
    """Uncompressed bytes of one stored batch of `batch_size` sequences."""
    shapes = setting.batch_shapes(batch_size)
    stored = setting.batch_arrays
    return sum(math.prod(shapes[n]) * np.dtype(stored[n][0]).itemsize for n in shapes)


def _steps_per_shard(shard_mb: float, bytes_per_step: int) -> int:
    return min(MAX_STEPS_PER_SHARD, max(1, int(shard_mb * 2**20) // bytes_per_step))


def check_budget(config: Config, plan: DataPlan, train_shards: bool = True) -> None:
    """Refuse, before writing anything, data that exceed data_kwargs.max_storage_gb (the train shards, when they are
    stored, and the eval blocks the config's evaluation reads); say what to do instead."""
    budget = config.data_kwargs.max_storage_gb * 2**30
    ev = config.eval_kwargs
    blocks = len(eval_block_names(config.data_kwargs.eval_size, ev.batch_size * ev.num_eval_batches))
    if blocks > 1 and blocks * plan.eval_bytes > budget:  # block 0 is every dataset's; more are asked for
        raise ConfigError(
            f"eval_kwargs.num_eval_batches={ev.num_eval_batches} x eval_kwargs.batch_size={ev.batch_size} sequences per "
            f"split need {blocks} eval blocks of data_kwargs.eval_size={config.data_kwargs.eval_size}, "
            f"{format_bytes(blocks * plan.eval_bytes)}, over data_kwargs.max_storage_gb="
            f"{config.data_kwargs.max_storage_gb:g}: lower eval_kwargs.num_eval_batches, or raise "
            "data_kwargs.max_storage_gb")
    if train_shards and config.data_kwargs.source == "shards" and plan.train_bytes > budget:
        raise ConfigError(
            f"training data for this config need {format_bytes(plan.train_bytes)} of HDF5 shards "
            f"({config.training_kwargs.max_steps} steps x {format_bytes(plan.bytes_per_step)} per batch), over "
            f"data_kwargs.max_storage_gb={config.data_kwargs.max_storage_gb:g}. Use data_kwargs.source=generate "
            f"(each step's batch is made on the device from (data seed, step): deterministic, nothing stored), "
            f"or raise data_kwargs.max_storage_gb, or lower training_kwargs.max_steps.")


@dataclass
class PreparedData:
    plan: DataPlan
    manifest: dict
    generated: list[str]  # files this call wrote that did not exist (empty when everything already existed)
    verified: list[str]  # files whose hash this call checked
    repaired: dict[str, str] = field(default_factory=dict)  # file (or manifest.json) -> what was wrong, what was done


def prepare_data(config: Config, plan: DataPlan | None = None, verify: bool = False,
                 train_shards: bool = True) -> PreparedData:
    """Make sure the task pools, eval sets and (source=shards and `train_shards`) the train shards up to max_steps
    exist.

    Complete files are reused (sizes always checked, hashes too with `verify`); missing ones are generated by
    exactly one process while others wait on the lock and then reuse them. Without `verify` a missing, truncated or
    altered file, or a damaged manifest, raises DataIntegrityError naming it and the data command that repairs it.
    With `verify` (the data command) every file the manifest lists is checked by sha256, and the damaged ones are
    regenerated under the lock, each installed only if its sha256 equals the manifest's (byte-identical to the
    original), then verified; a damaged or missing manifest is rebuilt from the files, each compared with a fresh
    generation. `repaired` says what was done, one entry per file. `plan`: the command's plan_data(config), when it
    has one already.
    """
    plan = plan or plan_data(config)
    check_budget(config, plan, train_shards)
    directory = plan.directory
    shards = config.data_kwargs.source == "shards" and train_shards
    needed = ["tasks.h5", "eval.h5"] + ([plan.shard_name(j) for j in range(plan.num_shards)] if shards else [])
    command = _config_command(config, plan, shards)
    statuses: dict[str, str] = {}
    repaired: dict[str, str] = {}
    manifest, damaged = _read_plan_manifest(plan)
    if damaged and not verify:
        raise DataIntegrityError(_damaged_message(directory, damaged, command))
    if damaged or manifest is None or any(name not in manifest["files"] for name in needed):
        with file_lock(directory / ".lock"):
            manifest, damaged = _read_plan_manifest(plan)
            if damaged and not verify:
                raise DataIntegrityError(_damaged_message(directory, damaged, command))
            if damaged or manifest is None:  # (re)build the manifest; files already there are kept when identical
                on_disk = [n for n in _dataset_files(directory) if n not in needed] if verify else []
                manifest = _new_manifest(plan)
                statuses = _generate(directory, plan.spec, needed + on_disk, manifest)
                repaired.update(_rebuild_report(statuses, damaged))
            else:
                statuses = _generate(directory, plan.spec, [n for n in needed if n not in manifest["files"]], manifest)
    checked = [n for n in needed if n not in statuses]
    if verify:
        checked += [n for n in manifest["files"] if n not in statuses and n not in needed]
    problems = {}
    for name in checked:
        problem, _ = _file_problem(directory, name, manifest["files"][name], full=verify)
        if problem and not verify:
            raise DataIntegrityError(f"data file {directory / name} {problem}; run {_run(command)} to regenerate it "
                                     f"(it repairs exactly the missing or damaged files)")
        if problem:
            problems[name] = problem
    if problems:
        repaired.update(_restore(plan, problems, command))
    generated = [n for n, status in statuses.items() if status == "new"]
    verified = [n for n in manifest["files"] if n not in generated] if verify else []
    return PreparedData(plan, manifest, generated, verified, repaired)


def _config_command(config: Config, plan: DataPlan, shards: bool = False) -> str | None:
    """The data command for `config`'s dataset, with the config's own shard values (`shards`) or source=generate."""
    data = config.data_kwargs
    if shards:
        return data_command(plan.directory, plan.spec, config.training_kwargs.max_steps, data.shard_mb,
                            data.max_storage_gb)
    return data_command(plan.directory, plan.spec, None, data.shard_mb)


def _read_plan_manifest(plan: DataPlan) -> tuple[dict | None, str | None]:
    """(the manifest, None), (None, None) when there is none, or (None, what is wrong) when it cannot be used."""
    try:
        manifest = read_manifest(plan.directory)
    except DamagedManifestError as error:
        return None, f"is damaged ({error.why})"
    if manifest is not None and (manifest["spec"] != plan.spec or manifest.get("key") != plan.key
                                 or manifest["steps_per_shard"] != plan.steps_per_shard):
        return None, f"is altered: it describes other data than its directory's key {plan.key}"
    return manifest, None


def _run(command: str | None) -> str:
    return f"`{command}`" if command else "`python -m normscale.data` with the overrides of a run that uses it"


def _damaged_message(directory: Path, damaged: str, command: str | None) -> str:
    return (f"{directory / MANIFEST} {damaged}; run {_run(command)}: it rebuilds the manifest from the files (each "
            f"compared with a fresh generation, regenerated where it differs)")


def _new_manifest(plan: DataPlan) -> dict:
    return {"format": FORMAT_VERSION, "key": plan.key, "spec": plan.spec, "steps_per_shard": plan.steps_per_shard,
            "files": {}}


# what a dataset holds
_FILE_NAMES = r"tasks\.h5|eval\.h5|eval/block-\d{5}\.h5|single_task-[1-9]\d*\.h5|train/shard-\d{5}\.h5"


def _dataset_files(directory: Path) -> list[str]:
    """The data files present in a dataset directory (temporary files of writers excluded)."""
    paths = [*directory.glob("*.h5"), *directory.glob("eval/*.h5"), *directory.glob("train/*.h5")]
    return sorted(n for n in (p.relative_to(directory).as_posix() for p in paths) if re.fullmatch(_FILE_NAMES, n))


def _rebuild_report(statuses: dict[str, str], damaged: str | None) -> dict[str, str]:
    """What rebuilding a manifest did, when there were files to rebuild it from."""
    kept = [n for n, status in statuses.items() if status == "kept"]
    replaced = [n for n, status in statuses.items() if status == "replaced"]
    if not (damaged or kept or replaced):
        return {}  # a first generation
    report = {MANIFEST: f"{(damaged or 'is missing').replace('is ', 'was ', 1)}: rebuilt from the files, each compared "
                        f"with a fresh generation: {len(kept)} identical and kept, {len(replaced)} regenerated, "
                        f"{len(statuses) - len(kept) - len(replaced)} generated where missing"}
    for name in replaced:
        report[name] = "differed from a fresh generation (no intact manifest recorded its hash); regenerated"
    return report


def _restore(plan: DataPlan, problems: dict[str, str], command: str | None) -> dict[str, str]:
    """Regenerate the damaged files under the lock, each installed only if byte-identical to what the manifest
    records, then verified. Raises DataIntegrityError for files that a fresh generation does not reproduce."""
    directory = plan.directory
    with file_lock(directory / ".lock"):
        manifest, damaged = _read_plan_manifest(plan)
        if damaged or manifest is None:
            raise DataIntegrityError(f"{directory / MANIFEST} {damaged or 'disappeared'} while its files were being "
                                     f"checked (another process?); run {_run(command)} again")
        still = {n: p for n, p in problems.items()  # another process may have repaired some meanwhile
                 if _file_problem(directory, n, manifest["files"][n], full=True)[0]}
        statuses = _generate(directory, plan.spec, list(still), manifest, restore=True)
    differs = [n for n, status in statuses.items() if status == "differs"]
    if differs:
        listed = ", ".join(str(directory / n) for n in differs)
        raise DataIntegrityError(
            f"cannot restore {listed} byte-identically: a fresh generation differs from the sha256 in {MANIFEST} (the "
            f"data were made by another version of normscale or h5py, or the manifest was altered); delete {directory} "
            f"and run {_run(command)} to generate the whole dataset anew")
    for name in still:
        check_file(directory, name, manifest["files"][name])  # the installed file, read back
    return {n: f"{p.replace('is ', 'was ', 1)}; regenerated, byte-identical to the original (sha256 as in {MANIFEST})"
            for n, p in still.items()}


class _Kept(Exception):
    """An existing file already holds exactly the generated bytes: it is left as it is."""

    def __init__(self, entry: dict):
        self.entry = entry


class _Differs(Exception):
    """A regenerated file's sha256 is not the one its manifest records: it is not installed."""


def _generate(directory: Path, spec: dict, names: list[str], manifest: dict,
              restore: bool = False) -> dict[str, str]:
    """Write `names` (the caller holds the lock) and record them in `manifest`, rewritten after each file, so an
    interrupted run keeps what it made. Status per file: "new", "kept" (an existing file was byte-identical: its
    inode and mtime are untouched), "replaced". With `restore`, each file must reproduce the sha256 that `manifest`
    records ("differs" otherwise, and nothing is installed) and the manifest is left as it is. What a file holds is
    a function of the dataset's `spec` (plan_data) alone."""
    if not names:
        return {}
    task, seed = TaskConfig(**spec["task_kwargs"]), spec["seed"]
    setting = settings.get(spec["setting"], task)
    pools = draw_task_pools(setting, seed)
    dataset = MixtureDataset(setting, pools["train"], task.prior, spec["batch_size"], seed)
    statuses = {}
    for name in names:
        if name == "tasks.h5":
            groups, attrs = pools, {}
        elif name.startswith("single_task-"):
            per_task = int(name.removeprefix("single_task-").removesuffix(".h5"))
            arrays = make_single_task_split(setting, pools, per_task, seed)
            groups, attrs = {"single_task": arrays}, {"single_task": {"content_hash": content_hash(arrays)}}
        elif name == "eval.h5" or name.startswith("eval/"):
            groups = make_eval_splits(setting, pools, spec["eval_size"], seed, _eval_block_index(name))
            attrs = {split: {"content_hash": content_hash(arrays)} for split, arrays in groups.items()}
        else:
            index, steps_per_shard = int(name.removeprefix("train/shard-").removesuffix(".h5")), spec["steps_per_shard"]
            groups = {"": _shard_arrays(dataset, steps_per_shard, index)}
            attrs = {"": {"first_step": index * steps_per_shard}}
        expect = manifest["files"][name]["sha256"] if restore else None
        try:
            entry, statuses[name] = _write_h5(directory / name, groups, attrs, name.startswith("train/"), expect)
        except _Differs:
            statuses[name] = "differs"
            continue
        if not restore:
            manifest["files"][name] = entry
            write_json(directory / MANIFEST, manifest)
    return statuses


def _shard_arrays(dataset: MixtureDataset, steps_per_shard: int, index: int) -> dict[str, np.ndarray]:
    stored = dataset.setting.batch_arrays
    first = index * steps_per_shard
    shapes = dataset.setting.batch_shapes(dataset.batch_size)
    arrays = {n: np.empty((steps_per_shard, *shapes[n]), dtype=stored[n][0]) for n in stored}
    for i in range(steps_per_shard):
        for n, tensor in dataset.batch(first + i).items():
            arrays[n][i] = tensor.numpy()
    return arrays


def _write_h5(path: Path, groups: dict[str, dict[str, np.ndarray]], attrs: dict[str, dict], chunk_leading: bool,
              expect: str | None = None) -> tuple[dict, str]:
    """Write `groups` to `path` atomically; return its manifest entry and "new", "replaced" or "kept" (an existing
    file with the very same bytes is left untouched). With `expect`, raise _Differs (nothing installed) unless the
    written bytes have that sha256."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                for group_name, arrays in groups.items():
                    group = f.require_group(group_name) if group_name else f
                    group.attrs.update(attrs.get(group_name, {}))
                    for n, a in arrays.items():
                        integer = np.issubdtype(a.dtype, np.integer)
                        options = {"compression": "lzf"} if integer and a.size > 4096 else {}
                        if chunk_leading:  # ~1 MiB chunks of whole steps
                            step_bytes = a[0].nbytes
                            options["chunks"] = (max(1, min(len(a), 2**20 // step_bytes)), *a.shape[1:])
                        group.create_dataset(n, data=a, track_times=False, **options)
            data = tmp.read_bytes()
            entry = {"bytes": len(data), "sha256": sha256_bytes(data), "arrays": {}}
            for group_name, arrays in groups.items():
                for n, a in arrays.items():
                    entry["arrays"][f"{group_name}/{n}" if group_name else n] = {"shape": list(a.shape),
                                                                                "dtype": str(a.dtype)}
            if expect is not None and entry["sha256"] != expect:
                raise _Differs(path)
            existed = path.exists()
            if existed and path.stat().st_size == len(data) and path.read_bytes() == data:
                raise _Kept(entry)
    except _Kept as kept:
        return kept.entry, "kept"
    return entry, "replaced" if existed else "new"


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """A hash of the arrays' names, dtypes, shapes and bytes: the identity of an eval split, independent of HDF5."""
    h = hashlib.sha256()
    for n in sorted(arrays):
        a = np.ascontiguousarray(arrays[n])
        h.update(f"{n}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.data)
    return h.hexdigest()


class DamagedManifestError(DataIntegrityError):
    """manifest.json exists but cannot be used (not JSON, not a manifest)."""

    def __init__(self, path: Path, why: str):
        self.path, self.why = Path(path), why
        super().__init__(f"{path} is damaged ({why}); run `python -m normscale.data` with the overrides of a run that "
                         f"uses {Path(path).parent}: it rebuilds the manifest from the files")


def read_manifest(directory: Path) -> dict | None:
    """The dataset's manifest; None when there is none; DamagedManifestError when it is not a readable manifest."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedManifestError(path, f"not valid JSON: {error}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (isinstance(files, dict) and isinstance(manifest.get("spec"), dict)
            and isinstance(manifest.get("steps_per_shard"), int)
            and all(isinstance(e, dict) and {"bytes", "sha256"} <= e.keys() and re.fullmatch(_FILE_NAMES, n)
                    for n, e in files.items())):
        raise DamagedManifestError(path, "valid JSON, but not a normscale data manifest")
    return manifest


# Task keys present in every setting's composed config (conf/). The others exist only in their setting's file, with
# the schema's default there: data_command adds them with ++ where they differ from it (tests compose its commands).
_COMMON_TASK_KEYS = ("num_tasks", "num_dims", "context_length", "prior", "prior_exponent", "num_ood_tasks")


def data_command(directory: Path, spec: dict, max_steps: int | None, shard_mb: float | None = None,
                 max_storage_gb: float | None = None) -> str | None:
    """The `python -m normscale.data <overrides>` that prepares, verifies and repairs the dataset in `directory`
    (shards up to `max_steps`; None: no shards, data_kwargs.source=generate): every value that determines the data,
    read from its spec, where it lives, read from its path, and only what makes the rest of the config valid.
    None when `directory` is not a dataset directory of the layout (normscale.layout.dataset_location)."""
    location = dataset_location(directory)
    if location is None or location["setting"] != spec["setting"]:
        return None
    values = {"cache_dir": location["cache_dir"], "name": location["name"], "setting": spec["setting"],
              "seed": spec["seed"]}
    task_defaults = dataclasses.asdict(TaskConfig())
    for key, value in spec["task_kwargs"].items():
        if key in _COMMON_TASK_KEYS:
            values[f"task_kwargs.{key}"] = value
        elif value != task_defaults.get(key):
            values[f"++task_kwargs.{key}"] = value
    values["training_kwargs.batch_size"] = spec["batch_size"]
    if max_steps:
        values["training_kwargs.max_steps"] = max_steps
        if max_steps < TrainingConfig().save_steps.first_step:  # the checkpoint schedule must fit in max_steps
            values["training_kwargs.save_steps.schedule"] = "end_only"
    values["data_kwargs.eval_size"] = spec["eval_size"]
    steps_per_shard = spec["steps_per_shard"]  # part of the key, also without shards
    bytes_per_step = _bytes_per_step(settings.get(spec["setting"], TaskConfig(**spec["task_kwargs"])), spec["batch_size"])
    values["data_kwargs.shard_mb"] = shard_mb or _shard_mb(steps_per_shard, bytes_per_step)
    if max_steps:
        train_bytes = math.ceil(max_steps / steps_per_shard) * steps_per_shard * bytes_per_step
        if max_storage_gb is None and train_bytes > DataConfig().max_storage_gb * 2**30:
            max_storage_gb = math.ceil(train_bytes / 2**30)
        if max_storage_gb is not None and max_storage_gb != DataConfig().max_storage_gb:
            values["data_kwargs.max_storage_gb"] = max_storage_gb
    else:
        values["data_kwargs.source"] = "generate"
    evaluation = EvalConfig()
    if evaluation.batch_size * evaluation.num_eval_batches > spec["eval_size"]:  # block 0 only: it adds no eval block
        values["eval_kwargs.batch_size"] = min(evaluation.batch_size, spec["eval_size"])
        values["eval_kwargs.num_eval_batches"] = 1
    return "python -m normscale.data " + " ".join(shlex.quote(f"{k}={_override_value(v)}") for k, v in values.items())


def _override_value(value) -> str:
    """`value` as Hydra's override grammar reads it back (strings quoted where they would parse as something else)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    plain = re.fullmatch(r"[\w./-]+", text) and not re.fullmatch(
        r"[-+]?[\d.]+(e[-+]?\d+)?|null|true|false|[-+]?inf|nan", text, re.IGNORECASE)
    return text if plain else "'" + text.replace("'", "\\'") + "'"


def _shard_mb(steps_per_shard: int, bytes_per_step: int) -> float:
    """The shortest data_kwargs.shard_mb that gives `steps_per_shard` steps per shard."""
    exact = steps_per_shard * bytes_per_step / 2**20  # exact in binary: always a valid answer
    for digits in range(1, 17):
        for candidate in (float(f"{exact:.{digits}g}"), float(f"{exact * (1 + 10 ** -digits):.{digits}g}")):
            if candidate > 0 and _steps_per_shard(candidate, bytes_per_step) == steps_per_shard:
                return candidate
    return exact


def _manifest_steps(manifest: dict) -> int | None:
    """Steps covered by the shards a manifest lists (None when it lists none)."""
    shards = [int(n.removeprefix("train/shard-").removesuffix(".h5"))
              for n in manifest["files"] if n.startswith("train/")]
    return (max(shards) + 1) * manifest["steps_per_shard"] if shards else None


def _repair_advice(directory: Path, what: str = "it", max_steps: int | None = None) -> str:
    """'run `<the data command for this dataset>` to regenerate <what> ...', from the manifest of `directory`."""
    try:
        manifest = read_manifest(directory)
    except DataIntegrityError:
        manifest = None
    command = None
    if manifest is not None:
        steps = max(_manifest_steps(manifest) or 0, max_steps or 0) or None
        command = data_command(directory, manifest["spec"], steps)
    return f"run {_run(command)} to regenerate {what} (it repairs exactly the missing or damaged files)"


def _file_problem(directory: Path, name: str, entry: dict, full: bool) -> tuple[str | None, bytes | None]:
    """(what is wrong with a data file, or None; its bytes when `full` and it is intact)."""
    path = Path(directory) / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing", None
    if size != entry["bytes"]:
        return f"is truncated or altered: {size} bytes, the manifest says {entry['bytes']}", None
    if not full:
        return None, None
    data = path.read_bytes()
    if sha256_bytes(data) != entry["sha256"]:
        return "is altered: its sha256 differs from the manifest", None
    return None, data


def check_file(directory: Path, name: str, entry: dict, full: bool = True) -> bytes | None:
    """Check a data file against its manifest entry: size always, sha256 when `full` (then return its bytes)."""
    problem, data = _file_problem(directory, name, entry, full)
    if problem:
        raise DataIntegrityError(f"data file {Path(directory) / name} {problem}; {_repair_advice(directory)}")
    return data


def _listed(directory: Path, manifest: dict, name: str) -> dict:
    """`name`'s manifest entry; DataIntegrityError with the repairing command when the manifest does not list it."""
    if name not in manifest["files"]:
        raise DataIntegrityError(f"{Path(directory) / name} was never generated (not in {MANIFEST}); "
                                 f"{_repair_advice(directory, 'it')}")
    return manifest["files"][name]


def _anew_advice(directory: Path, manifest: dict) -> str:
    """For a file whose sha256 matches the manifest but whose content hash does not: the manifest records an altered
    file, so only a fresh generation of the whole dataset can be trusted."""
    command = data_command(directory, manifest["spec"], _manifest_steps(manifest))
    return (f"{MANIFEST} records the altered file; delete {directory} and run {_run(command)} to generate the whole "
            f"dataset anew")


def _read_groups(directory: Path, name: str, manifest: dict) -> dict[str, dict[str, np.ndarray]]:
    data = check_file(directory, name, _listed(directory, manifest, name))
    with h5py.File(io.BytesIO(data), "r") as f:
        return {g: {n: f[g][n][()] for n in f[g]} for g in f}


def load_task_pools(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """{"train": the D tasks, "ood": the OOD tasks}, each a dict of parameter arrays."""
    directory = Path(directory)
    return _read_groups(directory, "tasks.h5", _require_manifest(directory))


def eval_block_name(block: int) -> str:
    """The file of eval block `block`: block 0 is eval.h5, the eval set of datasets made before blocks existed."""
    return "eval.h5" if block == 0 else f"eval/block-{block:05d}.h5"


def _eval_block_index(name: str) -> int:
    return 0 if name == "eval.h5" else int(name.removeprefix("eval/block-").removesuffix(".h5"))


def eval_block_names(block_size: int, num_sequences: int | None) -> list[str]:
    """The eval blocks that hold the first `num_sequences` sequences of each split (None: block 0 alone)."""
    return [eval_block_name(b) for b in range(1 if num_sequences is None else max(1, -(-num_sequences // block_size)))]


def _missing_eval_blocks(manifest: dict, num_sequences: int) -> list[str]:
    names = eval_block_names(manifest["spec"]["eval_size"], num_sequences)[1:]
    return [n for n in names if n not in manifest["files"]]


def extend_eval_set(directory: Path, num_sequences: int) -> list[str]:
    """Save the eval blocks after block 0 that the first `num_sequences` sequences of each split need and that are
    not saved yet, under the dataset's lock (one process generates, the others wait and reuse them; none is taken
    when nothing is missing); return the names of the blocks this call wrote."""
    directory = Path(directory)
    if not _missing_eval_blocks(_require_manifest(directory), num_sequences):
        return []
    with file_lock(directory / ".lock"):
        manifest = _require_manifest(directory)
        missing = _missing_eval_blocks(manifest, num_sequences)
        _generate(directory, manifest["spec"], missing, manifest)
    return missing


def load_eval_splits(directory: Path, num_sequences: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The first `num_sequences` sequences of every eval split (None: block 0, data_kwargs.eval_size sequences), as
    arrays in their stored dtypes, from the eval blocks, each verified against its manifest sha256 and content
    hashes. Blocks after block 0 that are not saved yet are generated and saved first (extend_eval_set)."""
    directory = Path(directory)
    if num_sequences is not None:
        extend_eval_set(directory, num_sequences)
    manifest = _require_manifest(directory)
    names = eval_block_names(manifest["spec"]["eval_size"], num_sequences)
    blocks = [_read_eval_block(directory, manifest, name) for name in names]
    return {split: {n: np.concatenate([block[split][n] for block in blocks])[:num_sequences] for n in arrays}
            for split, arrays in blocks[0].items()}


def _read_eval_block(directory: Path, manifest: dict, name: str) -> dict[str, dict[str, np.ndarray]]:
    data = check_file(directory, name, _listed(directory, manifest, name))
    with h5py.File(io.BytesIO(data), "r") as f:
        splits = {g: {n: f[g][n][()] for n in f[g]} for g in f}
        for g, arrays in splits.items():
            if content_hash(arrays) != f[g].attrs["content_hash"]:
                raise DataIntegrityError(f"eval split {g} in {directory / name} does not match its content hash; "
                                         f"{_anew_advice(directory, manifest)}")
    return splits


def single_task_name(per_task: int) -> str:
    return f"single_task-{per_task}.h5"


def load_single_task_split(config: Config, per_task: int, plan: DataPlan | None = None) -> dict[str, np.ndarray]:
    """`per_task` sequences of every training task (task k's rows are k*per_task ... (k+1)*per_task - 1), saved in
    the data directory with a content hash the first time they are asked for, verified on every later load.
    `plan`: the command's plan_data(config), when it has one already."""
    if per_task < 1:
        raise ConfigError(f"eval_kwargs.sequences_per_task={per_task} must be >= 1")
    plan, name = plan or plan_data(config), single_task_name(per_task)
    manifest, damaged = _read_plan_manifest(plan)
    if damaged or manifest is None or name not in manifest["files"]:
        with file_lock(plan.directory / ".lock"):
            manifest, damaged = _read_plan_manifest(plan)
            if damaged:
                raise DataIntegrityError(_damaged_message(plan.directory, damaged, _config_command(config, plan)))
            manifest = manifest or _new_manifest(plan)
            _generate(plan.directory, plan.spec, [name] if name not in manifest["files"] else [], manifest)
    data = check_file(plan.directory, name, manifest["files"][name])
    with h5py.File(io.BytesIO(data), "r") as f:
        arrays = {n: f["single_task"][n][()] for n in f["single_task"]}
        if content_hash(arrays) != f["single_task"].attrs["content_hash"]:
            raise DataIntegrityError(f"{plan.directory / name} does not match its content hash; "
                                     f"{_anew_advice(plan.directory, manifest)}")
    return arrays


def _require_manifest(directory: Path) -> dict:
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataIntegrityError(f"no {MANIFEST} in {directory}: the data were never (completely) generated; run "
                                 f"`python -m normscale.data` with the overrides of a run that uses it (files already "
                                 f"there are kept where identical to a fresh generation)")
    return manifest


def to_torch(arrays: dict[str, np.ndarray], setting, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Stored arrays -> the batch tensors models take (dtype conversion after the copy to the device); `setting` is
    a normscale.settings Setting."""
    used = setting.batch_arrays
    return {n: torch.from_numpy(a).to(device, non_blocking=True).to(used[n][1]) if n in used
            else torch.from_numpy(a).to(device) for n, a in arrays.items()}


def rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """Rank r's rows [rB/W, (r+1)B/W) of a global batch of B sequences (batch_size is global)."""
    if batch_size % world_size:
        raise ValueError(f"training_kwargs.batch_size={batch_size} is not divisible by the world size {world_size}; "
                         f"choose a batch size that is a multiple of the number of processes")
    local = batch_size // world_size
    return slice(rank * local, (rank + 1) * local)


class ShardReader:
    """Step-indexed train batches from the HDF5 shards: `batch(step)` is this rank's rows of step's global batch.

    A shard (hash verified) is read whole into memory and the next one is read ahead on a background thread,
    so the training step never waits on the disk. Rank and world size are passed in, never read from the
    environment; rank r gets rows [r*B/W, (r+1)*B/W) of every batch.
    """

    def __init__(self, directory: Path, setting, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", read_ahead: bool = True):
        self.directory, self.setting, self.device = Path(directory), setting, device
        self.manifest = _require_manifest(self.directory)
        self.steps_per_shard = self.manifest["steps_per_shard"]
        self.rows = rank_rows(self.manifest["spec"]["batch_size"], rank, world_size)
        self._index, self._arrays, self._ahead = None, None, None
        self._pool = ThreadPoolExecutor(max_workers=1) if read_ahead else None

    def _load(self, index: int) -> dict[str, np.ndarray]:
        name = f"train/shard-{index:05d}.h5"
        if name not in self.manifest["files"]:
            self.manifest = _require_manifest(self.directory)  # another process may have added shards since
        if name not in self.manifest["files"]:
            advice = _repair_advice(self.directory, "it", (index + 1) * self.steps_per_shard)
            raise DataIntegrityError(f"step {index * self.steps_per_shard} needs {self.directory / name}, which was "
                                     f"never generated; {advice}")
        data = check_file(self.directory, name, self.manifest["files"][name])
        with h5py.File(io.BytesIO(data), "r") as f:
            return {n: f[n][:, self.rows] for n in f}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        index = step // self.steps_per_shard
        if index != self._index:
            ahead = self._ahead[1] if self._ahead and self._ahead[0] == index else None
            self._arrays = ahead.result() if ahead else self._load(index)  # result() re-raises a read-ahead error
            self._index, self._ahead = index, None
            if self._pool and f"train/shard-{index + 1:05d}.h5" in self.manifest["files"]:
                self._ahead = (index + 1, self._pool.submit(self._load, index + 1))
        local = step - index * self.steps_per_shard
        return to_torch({n: a[local] for n, a in self._arrays.items()}, self.setting, self.device)


class GeneratedBatches:
    """data_kwargs.source=generate: the same step-indexed batches made on the device, nothing stored.

    Counter-based: batch(step) is drawn from the stream (data seed, "train", step) on `device`; on CPU it equals
    the shards byte for byte (the shards are a cache of it), on CUDA it is another, equally deterministic stream.
    """

    def __init__(self, config: Config, tasks: dict[str, np.ndarray], rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu"):
        batch_size = config.training_kwargs.batch_size
        self.rows = rank_rows(batch_size, rank, world_size)
        self.dataset = MixtureDataset(settings.get(config.setting, config.task_kwargs), tasks,
                                      config.task_kwargs.prior, batch_size, config.seed, device)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return {n: t[self.rows] for n, t in self.dataset.batch(step).items()}


def format_bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    exponent = min(int(math.log10(n) // 3), 4)
    return f"{n / 1000 ** exponent:.1f} {' KMGT'[exponent]}B"


def open_train_batches(config: Config, prepared: PreparedData, rank: int = 0, world_size: int = 1,
                       device: str | torch.device = "cpu"):
    """The train-batch source the config asks for, with the `batch(step)` interface."""
    if config.data_kwargs.source == "shards":
        return ShardReader(prepared.plan.directory, settings.get(config.setting, config.task_kwargs), rank,
                           world_size, device)
    return GeneratedBatches(config, load_task_pools(prepared.plan.directory)["train"], rank, world_size, device)


__all__ = ["DataIntegrityError", "DataPlan", "PreparedData", "ShardReader", "GeneratedBatches", "plan_data",
           "check_budget", "prepare_data", "load_task_pools", "load_eval_splits", "extend_eval_set", "eval_block_name",
           "eval_block_names", "single_task_name", "content_hash", "to_torch",
           "open_train_batches", "format_bytes", "read_manifest", "check_file", "data_command", "DamagedManifestError"]
