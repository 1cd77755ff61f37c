"""Collate an experiment's evaluation results into one HDF5 file: `python -m normscale.collate <overrides>`;
`load_eval_results(setting, experiment_name)` returns them as a DataFrame.

Every metrics file written by normscale.eval (beside each checkpoint, or in runs/bayes-<kind>/<dataset>/) goes into
`<experiment>/metrics.h5` (these names and paths: normscale.layout). Incremental: a file already collated (same size
and mtime) is not read again; a re-evaluated one replaces its group. Idempotent: collating twice gives the same
content. A checkpoint without its metrics file yet is skipped and picked up by a later pass (metrics files are
written atomically, so a file is complete or absent). The new file is written beside the old one and renamed over it, under a lock.

Verified: a metrics file is read with normscale.results.load_metrics (its zip members checked against their CRC-32,
then torch.load). A file that does not load, or whose identity_hash differs from the identity of the
config_resolved.yaml beside it (files written before normscale recorded it are not compared), is named in one line
on stderr ("normscale: skipped: ...") and not collated; the rest are, and the command then ends with exit code 1 and
the list (`load_eval_results` warns instead, and returns what was collated). metrics.h5 keeps an earlier collated
version of such a file, if any; the file is tried again on every pass until normscale.eval has evaluated it again.
When the collated rows of one mode were made with different eval settings (normscale.results.eval_settings), collate
says so in one line naming the settings and how many files have each value.

Schema (plain h5py reads it; strings are UTF-8, configs JSON):

  /                                 attrs: schema "normscale.metrics", format 1, setting, experiment
  /runs/<run>/                      one per run; <run> is the run directory's path under runs/ with "/" -> ":"
                                    attrs: run (that path), model, kind ("" for trained models), data_dir, data_key,
                                    config (the run's resolved config, JSON), overrides (JSON list: the run's
                                    command-line overrides, layout.read_overrides)
  /runs/<run>/<entry>/              entry "step-00000200" (a checkpoint) or "final" (a single-shot model)
                                    attrs: step (-1 for "final"), sequences_seen, tokens_seen (-1 when unknown)
  /runs/<run>/<entry>/<mode>/       mode "standard" | "single_task"; attrs: source (metrics file path under the
                                    experiment), source_bytes, source_mtime_ns, eval_kwargs (JSON), eval_hashes (JSON),
                                    identity_hash (of the run that made it; "" when the file predates it),
                                    code_version and provenance (JSON; "" and "{}" when the file predates them)
      <split>/                      attrs: every scalar metric (loss, task metric, d_M, d_G, d_MG, r, w_M,
                                    interp_distance), num_sequences
      <split>/per_position/<name>   float32 (P,)
      <split>/fit_predictions       float16 (fit_size, ...) predictions on the split's leading sequences
      <split>/per_task/<name>       (D,) per training task (single_task mode; task_ids included)
      <split>/predictions, labels, hidden_states    when the evaluation saved them
      strategy_loss/                Bayes predictors: attrs median_of_means, num_sequences, measure; group_means (10,)
  root attrs also: sweep_parameters (JSON list of the config keys the trained runs' command lines set);
  /runs/<run>/ attrs also: sweep_values (JSON {parameter: value}, read from the run's config)
  /table/<column>                   a flat table, one row per (run, entry, mode, split), as equal-length 1-D columns:
                                    run, model, kind, data_dir, step, sequences_seen, mode, split, identity_hash,
                                    code_version (strings / int64; "" where the metrics file predates them),
                                    metric.<name> (float64, NaN where a row lacks it), sweep.<parameter>
                                    (numbers as float64 or int64, anything else as a string, JSON for lists),
                                    eval.<key> for every eval_kwargs key but `run` (the settings the row was evaluated
                                    with, a key missing from an older file at its default; integers int64, booleans
                                    "true"/"false", null as "null")
  pandas without normscale:
      f = h5py.File(path); pd.DataFrame({k: c.asstr()[()] if c.dtype.kind == "O" else c[()]
                                         for k, c in f["table"].items()})
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sys
import warnings
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from normscale.config import Config, EvalConfig, FaultError, NormscaleError, resolve_cache_dir
from normscale.fileio import atomic_path, file_lock
from normscale.layout import (CONFIG_FILE, METRICS_FILES, checkpoint_step, collated_file, experiment_dir,
                              identity_hash, is_sweep_parameter, read_config, read_overrides, runs_dir)
from normscale.results import MetricsError, eval_settings, load_metrics

SCHEMA, FORMAT = "normscale.metrics", 1
MODE_OF_FILE = {name: mode for mode, name in METRICS_FILES.items()}
SINGLE_SHOT_MODELS = ("bayes", "llm")  # no checkpoints; rows with checkpoint None


class SkippedMetricsError(FaultError):
    """Some metrics files could not be collated (each named on its own line); the others were."""


def metrics_files(experiment: Path) -> list[tuple[str, str, str, Path]]:
    """(run, entry, mode, path) of every metrics file of an experiment, sorted. `run` is the run directory's path
    under runs/; entry "step-<step:08d>" for checkpoints (only complete, i.e. renamed, checkpoint directories),
    "final" for single-shot models."""
    runs = runs_dir(experiment)
    found = []
    for config_path in sorted(runs.rglob(CONFIG_FILE)):
        run_dir = config_path.parent
        run = run_dir.relative_to(runs).as_posix()
        for name, mode in MODE_OF_FILE.items():
            if (run_dir / name).exists():
                found.append((run, "final", mode, run_dir / name))
            for checkpoint in run_dir.iterdir():
                step = checkpoint_step(checkpoint.name)
                if step is not None and (checkpoint / name).exists():
                    found.append((run, f"step-{step:08d}", mode, checkpoint / name))
    return sorted(found)


def collate(config: Config) -> Path:
    """Add what is new in the experiment to its metrics.h5; returns its path. Raises SkippedMetricsError (after
    collating the rest) when some metrics files could not be used."""
    experiment = experiment_dir(config)
    target = collated_file(experiment)
    if not runs_dir(experiment).exists():
        raise NormscaleError(f"nothing to collate: {runs_dir(experiment)} does not exist; train and evaluate first")
    skipped: list[str] = []
    with file_lock(target.with_name(f".{target.name}.lock")):
        found = metrics_files(experiment)
        current = {}
        if target.exists():
            with h5py.File(target, "r") as f:
                current = {(run, entry, mode): (g.attrs["source_bytes"], g.attrs["source_mtime_ns"])
                           for run, entry, mode, _ in found
                           if (g := f.get(f"runs/{group_name(run)}/{entry}/{mode}")) is not None}
        new = [(run, entry, mode, path) for run, entry, mode, path in found
               if current.get((run, entry, mode)) != (path.stat().st_size, path.stat().st_mtime_ns)]
        usable = verified_metrics(experiment, new, skipped)
        first = next(usable, None)
        if not new:
            print(f"normscale: {target} is up to date ({len(found)} metrics files)")
        elif first is None:
            print(f"normscale: {target} is unchanged: none of the {len(new)} new metrics file(s) could be used")
        else:
            added = 0
            with atomic_path(target) as tmp:
                if target.exists():
                    shutil.copyfile(target, tmp)
                with h5py.File(tmp, "a") as f:
                    f.attrs.update({"schema": SCHEMA, "format": FORMAT, "setting": config.setting,
                                    "experiment": config.name})
                    for item in itertools.chain([first], usable):
                        add_metrics(f, experiment, *item)
                        added += 1
                    write_sweep_parameters(f)
                    write_table(f)
            print(f"normscale: collated {added} new metrics file(s) of {len(found)} into {target}")
        if target.exists() and (mixed := mixed_eval_settings(target)):
            print(f"normscale: {config.name} mixes eval settings in {target.name}: {mixed}; rows evaluated "
                  "differently may not compare (evaluate again with one set of eval_kwargs and overwrite=true)")
    if skipped:
        rest = f"the rest is collated in {target}" if target.exists() else f"{target} was not written"
        raise SkippedMetricsError(f"{len(skipped)} metrics file(s) of {experiment} were skipped, each named above: "
                                  f"{', '.join(skipped)}; {rest}")
    return target


def verified_metrics(experiment: Path, new: list[tuple[str, str, str, Path]], skipped: list[str]):
    """(run, entry, mode, path, metrics, run config, run overrides) of each new metrics file that loads and belongs to
    its run's saved identity, one at a time; each other file is named in one line on stderr and appended to
    `skipped`."""
    configs, overrides = {}, {}
    for run, entry, mode, path in new:
        run_dir = runs_dir(experiment) / run
        try:
            if run not in configs:
                configs[run], overrides[run] = read_config(run_dir), read_overrides(run_dir)
            metrics = load_metrics(path)
            made_for, identity = metrics.get("identity_hash"), identity_hash(configs[run])
            if made_for is not None and made_for != identity:
                raise MetricsError(f"{path} was evaluated for another run identity ({made_for}) than "
                                   f"{run_dir / CONFIG_FILE} describes ({identity})")
        except NormscaleError as error:  # MetricsError, or its run's config or overrides cannot be read back
            hint = "; python -m normscale.eval evaluates it again" if isinstance(error, MetricsError) else ""
            print(f"normscale: skipped: {error}{hint}", file=sys.stderr,
                  flush=True)
            skipped.append(path.relative_to(experiment).as_posix())
            continue
        yield run, entry, mode, path, metrics, configs[run], overrides[run]


def group_name(run: str) -> str:
    return run.replace("/", ":")


def add_metrics(f: h5py.File, experiment: Path, run: str, entry: str, mode: str, path: Path, metrics: dict,
                run_config: Config, overrides: list[str]) -> None:
    run_group = f.require_group(f"runs/{group_name(run)}")
    run_group.attrs.update({"run": run, "model": metrics["model"], "kind": metrics["kind"] or "",
                            "data_dir": metrics["data_dir"], "data_key": metrics["data_key"],
                            "config": json.dumps(dataclasses.asdict(run_config), sort_keys=True),
                            "overrides": json.dumps(overrides)})
    entry_group = run_group.require_group(entry)
    meta = metrics["checkpoint_meta"] or {}
    entry_group.attrs.update({"step": -1 if metrics["step"] is None else metrics["step"],
                              "sequences_seen": meta.get("sequences_seen", -1),
                              "tokens_seen": meta.get("tokens_seen", -1)})
    if mode in entry_group:
        del entry_group[mode]
    group = entry_group.create_group(mode)
    stat = path.stat()
    group.attrs.update({"source": path.relative_to(experiment).as_posix(), "source_bytes": stat.st_size,
                        "source_mtime_ns": stat.st_mtime_ns, "eval_kwargs": json.dumps(metrics["eval_kwargs"], sort_keys=True),
                        "eval_hashes": json.dumps(metrics["eval_hashes"], sort_keys=True),
                        "identity_hash": metrics.get("identity_hash") or "",
                        "code_version": (metrics.get("provenance") or {}).get("code_version", ""),
                        "provenance": json.dumps(metrics.get("provenance") or {}, sort_keys=True)})
    for split, summary in metrics["splits"].items():
        split_group = group.create_group(split)
        split_group.attrs.update({**summary["scalars"], "num_sequences": summary["num_sequences"]})
        for name, values in summary["per_position"].items():
            _dataset(split_group, f"per_position/{name}", values)
        _dataset(split_group, "fit_predictions", summary["fit_predictions"])
        for name, values in summary.get("per_task", {}).items():
            _dataset(split_group, f"per_task/{name}", values)
        for extra in ("predictions", "labels", "hidden_states"):
            if split in metrics.get(extra, {}):
                _dataset(split_group, extra, metrics[extra][split])
    if "strategy_loss" in metrics:
        loss = metrics["strategy_loss"]
        loss_group = group.create_group("strategy_loss")
        loss_group.attrs.update({k: loss[k] for k in ("median_of_means", "num_sequences", "measure")})
        _dataset(loss_group, "group_means", np.asarray(loss["group_means"]))


def write_sweep_parameters(f: h5py.File) -> None:
    """The sweep parameters of the trained runs (root attribute) and each run's values of them (run attribute)."""
    runs = f["runs"].values()
    parameters = sweep_parameters([json.loads(g.attrs["overrides"]) for g in runs
                                   if g.attrs["model"] not in SINGLE_SHOT_MODELS])
    f.attrs["sweep_parameters"] = json.dumps(parameters)
    for run_group in runs:
        config = json.loads(run_group.attrs["config"])
        run_group.attrs["sweep_values"] = json.dumps({p: config_value(config, p) for p in parameters})


def write_table(f: h5py.File) -> None:
    """/table: one row per (run, entry, mode, split) with its scalar metrics and sweep values, as 1-D columns."""
    parameters = json.loads(f.attrs["sweep_parameters"])
    rows = []
    for run_group in f["runs"].values():
        values = json.loads(run_group.attrs["sweep_values"])
        for entry, entry_group in run_group.items():
            for mode, mode_group in entry_group.items():
                for split, split_group in mode_group.items():
                    if split == "strategy_loss":
                        continue
                    rows.append({"run": run_group.attrs["run"], "model": run_group.attrs["model"],
                                 "kind": run_group.attrs["kind"], "data_dir": run_group.attrs["data_dir"],
                                 "step": int(entry_group.attrs["step"]),
                                 "sequences_seen": int(entry_group.attrs["sequences_seen"]), "mode": mode,
                                 "split": split, "identity_hash": mode_group.attrs.get("identity_hash", ""),
                                 "code_version": mode_group.attrs.get("code_version", ""),
                                 **{f"metric.{k}": float(v) for k, v in split_group.attrs.items()},
                                 **{f"sweep.{p}": values[p] for p in parameters},
                                 **{f"eval.{k}": v for k, v in recorded_eval_kwargs(mode_group).items()}})
    if "table" in f:
        del f["table"]
    table = f.create_group("table")
    for column in sorted({k for row in rows for k in row}, key=lambda k: (k.split(".")[0] != k, k)):
        values = [row.get(column) for row in rows]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            table.create_dataset(column, data=np.asarray(values, dtype=np.int64), track_times=False)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in values):
            table.create_dataset(column, data=np.asarray([np.nan if v is None else v for v in values], dtype=np.float64),
                                 track_times=False)
        else:
            strings = [v if isinstance(v, str) else json.dumps(v) for v in values]
            table.create_dataset(column, data=strings, dtype=h5py.string_dtype(), track_times=False)


def recorded_eval_kwargs(mode_group: h5py.Group) -> dict:
    """The eval_kwargs a collated metrics file was made with, read through the schema (a key missing from an
    older file at its default), without `run` (it only selected the runs)."""
    recorded = {**dataclasses.asdict(EvalConfig()), **json.loads(mode_group.attrs["eval_kwargs"])}
    recorded.pop("run", None)
    return recorded


def mixed_eval_settings(path: Path) -> str | None:
    """The eval settings that differ between the collated files of one mode, with how many files have each value
    ("standard mode: eval_kwargs.num_eval_batches 4 (10 files), 2 (2 files)"), or None when every mode is uniform."""
    counts: dict[tuple[str, str], Counter] = {}
    with h5py.File(path, "r") as f:
        for run_group in f["runs"].values():
            for entry_group in run_group.values():
                for mode, mode_group in entry_group.items():
                    settings = eval_settings(json.loads(mode_group.attrs["eval_kwargs"]), run_group.attrs["model"])
                    for key, value in settings.items():
                        counts.setdefault((mode, key), Counter())[json.dumps(value)] += 1
    mixed = [f"{mode} mode: eval_kwargs.{key} " + ", ".join(f"{v} ({n} files)" for v, n in counter.most_common())
             for (mode, key), counter in sorted(counts.items()) if len(counter) > 1]
    return "; ".join(mixed) or None


def _dataset(group: h5py.Group, name: str, values) -> None:
    array = values.numpy() if hasattr(values, "numpy") else np.asarray(values)  # a CPU tensor, or a list
    group.create_dataset(name, data=array, track_times=False,
                         **({"compression": "lzf"} if array.size > 4096 else {}))


# ---------------------------------------------------------------- reading


def sweep_parameters(overrides_per_run: list[list[str]]) -> list[str]:
    """Config keys set on the command line of any trained run (what a sweep varies), in sorted order: the keys
    that define run directories, and the seed."""
    keys = set()
    for overrides in overrides_per_run:
        for override in overrides:
            key = override.lstrip("+~").partition("=")[0]
            if is_sweep_parameter(key):
                keys.add(key)
    return sorted(keys)


def config_value(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_results(path: Path, with_arrays: bool = False):
    """metrics.h5 -> a DataFrame, one row per (run, checkpoint) (one per single-shot model): columns run, model,
    kind, data_dir (the dataset's directory name), checkpoint (the step; None for Bayes and LLM rows), config (Config), metrics ({split: {scalar: value,
    "per_position": {name: array}}}, plus "single_task" {split: ..., "per_task"} and "strategy_loss" when present),
    h5_group (the entry's path in the file) and one column per sweep parameter, read from each run's config.
    `with_arrays` adds fit_predictions (and saved predictions/labels) to the metrics dicts."""
    import pandas as pd

    rows = []
    with h5py.File(path, "r") as f:
        runs = f["runs"]
        trained_overrides = [json.loads(g.attrs["overrides"]) for g in runs.values()
                             if g.attrs["model"] not in SINGLE_SHOT_MODELS]
        parameters = sweep_parameters(trained_overrides)
        for run_group in runs.values():
            raw_config = json.loads(run_group.attrs["config"])
            config = Config.from_dict(raw_config)
            for entry, entry_group in sorted(run_group.items()):
                metrics = {}
                for mode, mode_group in entry_group.items():
                    target = metrics if mode == "standard" else metrics.setdefault(mode, {})
                    for split, split_group in mode_group.items():
                        if split == "strategy_loss":
                            metrics["strategy_loss"] = {**_attrs(split_group),
                                                        "group_means": split_group["group_means"][()]}
                            continue
                        target[split] = _read_split(split_group, with_arrays)
                step = int(entry_group.attrs["step"])
                rows.append({"run": run_group.attrs["run"], "model": run_group.attrs["model"],
                             "data_dir": run_group.attrs["data_dir"],
                             "kind": run_group.attrs["kind"] or None, "checkpoint": None if step < 0 else step,
                             "config": config, "metrics": metrics, "h5_group": entry_group.name,
                             **{p: config_value(raw_config, p) for p in parameters}})
    rows.sort(key=lambda row: (row["run"], -1 if row["checkpoint"] is None else row["checkpoint"]))
    frame = pd.DataFrame(rows, columns=["config", "metrics", "checkpoint", "run", "model", "kind", "data_dir", "h5_group",
                                        *parameters])
    for column in ("checkpoint", "kind"):  # None stays None (not NaN) for Bayes and LLM rows
        frame[column] = pd.Series([row[column] for row in rows], dtype=object)
    return frame


def _attrs(group: h5py.Group) -> dict:
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in group.attrs.items()}


def _read_split(group: h5py.Group, with_arrays: bool) -> dict:
    split = _attrs(group)
    for name in ("per_position", "per_task"):
        if name in group:
            split[name] = {k: v[()] for k, v in group[name].items()}
    if with_arrays:
        split |= {k: group[k][()] for k in ("fit_predictions", "predictions", "labels", "hidden_states") if k in group}
    return split


def load_eval_results(setting: str, experiment_name: str, cache_dir: str | None = None, update: bool = True,
                      with_arrays: bool = False):
    """The predecessor's notebook API: a DataFrame with columns config, metrics, checkpoint (None for Bayes and
    LLM rows) and one per sweep parameter (plus run, model, kind, h5_group). With `update` (the default), what was
    evaluated since the last collation is collated first; metrics files that cannot be used are named on stderr and
    in a warning, and the frame holds the rest."""
    config = Config(setting=setting, name=experiment_name, cache_dir=str(resolve_cache_dir(cache_dir)))
    path = collated_file(experiment_dir(config))
    if update:
        try:
            collate(config)
        except SkippedMetricsError as error:  # a notebook still gets what could be collated, with a warning
            if not path.exists():
                raise
            warnings.warn(f"normscale: {error}", stacklevel=2)
    elif not path.exists():
        raise NormscaleError(f"{path} does not exist: run `python -m normscale.collate setting={setting} "
                             f"name={experiment_name}`, or call with update=True")
    return read_results(path, with_arrays)


def main() -> None:
    from normscale.cli import hydra_main

    hydra_main(collate)


if __name__ == "__main__":
    main()
