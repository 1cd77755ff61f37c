"""The on-disk data of an experiment: task pools, eval sets and pre-batched, step-indexed HDF5 train shards.

    ${CACHE_DIR}/experiments/${setting}/${name}/data/<dataset>/
      manifest.json          spec, key, shard layout, and per file: bytes, sha256, arrays (shape, dtype)
      tasks.h5               train/ (the D tasks), ood/ (the OOD tasks)
      eval.h5                one group per split (id, ood, iwl), each with a content hash attribute
      train/shard-00000.h5   steps [0, S), arrays (S, B, ...); shard j holds steps [jS, (j+1)S)

<dataset> is named by a hash of everything that determines the data (DESIGN, data identity), so runs that
differ only in model or optimiser share it and different data never do. Every file is written to a temporary
name and renamed; writers hold an flock on the dataset's lock file, so concurrent requests leave one copy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from normscale.config import Config, ConfigError, NormscaleError
from normscale.data.dataset import (EVAL_SPLITS, MixtureDataset, draw_task_pools, make_eval_splits,
                                    make_single_task_split)
from normscale.data.tasks import BATCH_ARRAYS, batch_shapes, check_storable
from normscale.fileio import atomic_path, file_lock, sha256_bytes, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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
    check_storable(config.setting, task, max(task.num_tasks, task.num_ood_tasks))
    if config.setting == "classification" and task.context_length < 2:
        raise ConfigError("task_kwargs.context_length must be >= 2 for classification (context items plus the query)")
    if config.setting == "classification" and task.num_tasks < 2:
        raise ConfigError("task_kwargs.num_tasks must be >= 2 for classification (the IWL split excludes the query's exemplar)")
    shapes = batch_shapes(config.setting, task, training.batch_size)
    dtypes = {name: np.dtype(stored) for name, (stored, _) in BATCH_ARRAYS[config.setting].items()}
    bytes_per_step = sum(math.prod(shapes[n]) * dtypes[n].itemsize for n in shapes)
    steps_per_shard = min(MAX_STEPS_PER_SHARD, max(1, int(data.shard_mb * 2**20) // bytes_per_step))
    spec = {"format": FORMAT_VERSION, "setting": config.setting, "task_kwargs": dataclasses.asdict(task),
            "sigma2": task.sigma2, "seed": config.seed, "batch_size": training.batch_size,
            "eval_size": data.eval_size, "steps_per_shard": steps_per_shard}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    name = f"D{task.num_tasks}-{task.prior}-b{training.batch_size}-seed{config.seed}-{key}"
    num_shards = math.ceil(training.max_steps / steps_per_shard)
    eval_shapes = batch_shapes(config.setting, task, data.eval_size)
    eval_bytes = len(EVAL_SPLITS[config.setting]) * sum(math.prod(eval_shapes[n]) * dtypes[n].itemsize for n in eval_shapes)
    return DataPlan(config.data_dir / name, key, spec, steps_per_shard, num_shards, bytes_per_step,
                    num_shards * steps_per_shard * bytes_per_step, eval_bytes)


def check_budget(config: Config, plan: DataPlan) -> None:
    """Refuse, before writing anything, shards that exceed data_kwargs.max_storage_gb; say what to do instead."""
    budget = config.data_kwargs.max_storage_gb * 2**30
    if config.data_kwargs.source == "shards" and plan.train_bytes > budget:
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
    generated: list[str]  # files this call wrote (empty when everything already existed)
    verified: list[str]  # files whose hash this call checked


def prepare_data(config: Config, verify: bool = False, train_shards: bool = True) -> PreparedData:
    """Make sure the task pools, eval sets and (source=shards and `train_shards`) the train shards up to max_steps
    exist.

    Complete files are reused (sizes always checked, hashes too with `verify`); missing ones are generated by
    exactly one process while others wait on the lock and then reuse them.
    """
    plan = plan_data(config)
    if train_shards:
        check_budget(config, plan)
    needed = ["tasks.h5", "eval.h5"]
    if config.data_kwargs.source == "shards" and train_shards:
        needed += [plan.shard_name(j) for j in range(plan.num_shards)]
    manifest = read_manifest(plan.directory)
    if manifest is None or any(name not in manifest["files"] for name in needed):
        with file_lock(plan.directory / ".lock"):
            generated = _generate_missing(config, plan, needed)
    else:
        generated = []
    manifest = read_manifest(plan.directory)
    if manifest["spec"] != plan.spec:
        raise DataIntegrityError(f"{plan.directory / MANIFEST} describes other data than this config (key {plan.key}); "
                                 f"delete {plan.directory} to regenerate it")
    checked = [n for n in needed if n not in generated]
    for name in checked:
        check_file(plan.directory, name, manifest["files"][name], full=verify)
    return PreparedData(plan, manifest, generated, checked if verify else [])


def _generate_missing(config: Config, plan: DataPlan, needed: list[str]) -> list[str]:
    manifest = read_manifest(plan.directory) or {"format": FORMAT_VERSION, "key": plan.key, "spec": plan.spec,
                                                  "steps_per_shard": plan.steps_per_shard, "files": {}}
    missing = [n for n in needed if n not in manifest["files"]]
    if not missing:
        return []
    task, seed, setting = config.task_kwargs, config.seed, config.setting
    pools = draw_task_pools(setting, task, seed)
    dataset = MixtureDataset(setting, task, pools["train"], task.prior, config.training_kwargs.batch_size, seed)
    for name in missing:
        if name == "tasks.h5":
            groups, attrs = pools, {}
        elif name.startswith("single_task-"):
            per_task = int(name.removeprefix("single_task-").removesuffix(".h5"))
            arrays = make_single_task_split(setting, task, pools, per_task, seed)
            groups, attrs = {"single_task": arrays}, {"single_task": {"content_hash": content_hash(arrays)}}
        elif name == "eval.h5":
            groups = make_eval_splits(setting, task, pools, config.data_kwargs.eval_size, seed)
            attrs = {split: {"content_hash": content_hash(arrays)} for split, arrays in groups.items()}
        else:
            index = int(name.removeprefix("train/shard-").removesuffix(".h5"))
            groups, attrs = {"": _shard_arrays(dataset, plan, index)}, {"": {"first_step": index * plan.steps_per_shard}}
        manifest["files"][name] = _write_h5(plan.directory / name, groups, attrs, chunk_leading=name.startswith("train/"))
        write_json(plan.directory / MANIFEST, manifest)  # after each file: an interrupted run keeps what it made
    return missing


def _shard_arrays(dataset: MixtureDataset, plan: DataPlan, index: int) -> dict[str, np.ndarray]:
    stored = BATCH_ARRAYS[dataset.setting]
    first = index * plan.steps_per_shard
    shapes = batch_shapes(dataset.setting, dataset.task, dataset.batch_size)
    arrays = {n: np.empty((plan.steps_per_shard, *shapes[n]), dtype=stored[n][0]) for n in stored}
    for i in range(plan.steps_per_shard):
        for n, tensor in dataset.batch(first + i).items():
            arrays[n][i] = tensor.numpy()
    return arrays


def _write_h5(path: Path, groups: dict[str, dict[str, np.ndarray]], attrs: dict[str, dict], chunk_leading: bool) -> dict:
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
            entry["arrays"][f"{group_name}/{n}" if group_name else n] = {"shape": list(a.shape), "dtype": str(a.dtype)}
    return entry


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """A hash of the arrays' names, dtypes, shapes and bytes: the identity of an eval split, independent of HDF5."""
    h = hashlib.sha256()
    for n in sorted(arrays):
        a = np.ascontiguousarray(arrays[n])
        h.update(f"{n}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.data)
    return h.hexdigest()


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _regenerate_hint(directory: Path, name: str) -> str:
    return f"delete {directory / name} and run `python -m normscale.data` with the same overrides to regenerate it"


def check_file(directory: Path, name: str, entry: dict, full: bool = True) -> bytes | None:
    """Check a data file against its manifest entry: size always, sha256 when `full` (then return its bytes)."""
    path = Path(directory) / name
    if not path.exists():
        raise DataIntegrityError(f"data file {path} is missing; {_regenerate_hint(directory, name)}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DataIntegrityError(f"data file {path} is truncated or altered: {size} bytes, the manifest says "
                                 f"{entry['bytes']}; {_regenerate_hint(directory, name)}")
    if not full:
        return None
    data = path.read_bytes()
    if sha256_bytes(data) != entry["sha256"]:
        raise DataIntegrityError(f"data file {path} is altered: its sha256 differs from the manifest; "
                                 f"{_regenerate_hint(directory, name)}")
    return data


def _read_groups(directory: Path, name: str, manifest: dict) -> dict[str, dict[str, np.ndarray]]:
    data = check_file(directory, name, manifest["files"][name])
    with h5py.File(io.BytesIO(data), "r") as f:
        return {g: {n: f[g][n][()] for n in f[g]} for g in f}


def load_task_pools(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """{"train": the D tasks, "ood": the OOD tasks}, each a dict of parameter arrays."""
    directory = Path(directory)
    return _read_groups(directory, "tasks.h5", _require_manifest(directory))


def load_eval_splits(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every saved eval split, its content hash verified, as arrays in their stored dtypes."""
    directory = Path(directory)
    manifest = _require_manifest(directory)
    data = check_file(directory, "eval.h5", manifest["files"]["eval.h5"])
    with h5py.File(io.BytesIO(data), "r") as f:
        splits = {g: {n: f[g][n][()] for n in f[g]} for g in f}
        for g, arrays in splits.items():
            if content_hash(arrays) != f[g].attrs["content_hash"]:
                raise DataIntegrityError(f"eval split {g} in {directory / 'eval.h5'} does not match its content hash; "
                                         f"{_regenerate_hint(directory, 'eval.h5')}")
    return splits


def load_single_task_split(config: Config, per_task: int) -> dict[str, np.ndarray]:
    """`per_task` sequences of every training task (task k's rows are k*per_task ... (k+1)*per_task - 1), saved in
    the data directory with a content hash the first time they are asked for, verified on every later load."""
    if per_task < 1:
        raise ConfigError(f"eval_kwargs.sequences_per_task={per_task} must be >= 1")
    plan, name = plan_data(config), f"single_task-{per_task}.h5"
    if name not in (read_manifest(plan.directory) or {"files": {}})["files"]:
        with file_lock(plan.directory / ".lock"):
            _generate_missing(config, plan, [name])
    manifest = _require_manifest(plan.directory)
    data = check_file(plan.directory, name, manifest["files"][name])
    with h5py.File(io.BytesIO(data), "r") as f:
        arrays = {n: f["single_task"][n][()] for n in f["single_task"]}
        if content_hash(arrays) != f["single_task"].attrs["content_hash"]:
            raise DataIntegrityError(f"{plan.directory / name} does not match its content hash; "
                                     f"{_regenerate_hint(plan.directory, name)}")
    return arrays


def _require_manifest(directory: Path) -> dict:
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataIntegrityError(f"no {MANIFEST} in {directory}: the data were never (completely) generated; "
                                 f"run `python -m normscale.data` with the experiment's overrides")
    return manifest


def to_torch(arrays: dict[str, np.ndarray], setting: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Stored arrays -> the batch tensors models take (dtype conversion after the copy to the device)."""
    used = BATCH_ARRAYS[setting]
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

    def __init__(self, directory: Path, setting: str, rank: int = 0, world_size: int = 1,
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
            raise DataIntegrityError(f"step {index * self.steps_per_shard} needs {self.directory / name}, which was "
                                     f"never generated; run `python -m normscale.data` with the run's max_steps")
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
        self.dataset = MixtureDataset(config.setting, config.task_kwargs, tasks, config.task_kwargs.prior,
                                      batch_size, config.seed, device)

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
        return ShardReader(prepared.plan.directory, config.setting, rank, world_size, device)
    return GeneratedBatches(config, load_task_pools(prepared.plan.directory)["train"], rank, world_size, device)


__all__ = ["DataIntegrityError", "DataPlan", "PreparedData", "ShardReader", "GeneratedBatches", "plan_data",
           "check_budget", "prepare_data", "load_task_pools", "load_eval_splits", "content_hash", "to_torch",
           "open_train_batches", "format_bytes", "read_manifest", "check_file"]
