"""Evaluate models on an experiment's saved eval sets: `python -m normscale.eval <overrides>` (also `-m`, and under
`accelerate launch`, where ranks split the eval batches and gather the results).

  model=transformer | mlp | hf_gpt_neox (the default)   every checkpoint of every trained run of the experiment
      (or one run: `"eval_kwargs.run='<run directory name>'"`, quoted for Hydra since names hold = and ,);
      results beside each checkpoint
  model=bayes model_kwargs.kind=memorizing | generalizing | const   the Bayes predictor as a model, on every dataset
      the experiment's runs were trained on (or the config's own dataset when nothing is trained yet), its results in
      runs/bayes-<kind>/<dataset>/, with the strategy loss L_s of SPEC D

A trained model, a Bayes predictor and (later) an LLM go through the same `ModelEvaluator` on the same saved
sequences, compared with M and G on exactly those sequences (SPEC C). Results go to `metrics.pt`
(`metrics-single_task.pt` in single_task mode), written atomically, loadable with torch.load(..., weights_only=True):

  format, setting, model, kind, run, step (None for single-shot models), mode, data_dir, data_key, eval_kwargs,
  identity_hash (the run's identity, normscale.layout.identity_hash of its config_resolved.yaml; for a Bayes
  predictor or an LLM that of the dataset config it was scored with), provenance {code_version, libraries}
  (normscale.provenance: what made the file), checkpoint_meta (step, sequences and tokens seen),
  eval_hashes {data file: sha256} of the files scored (tasks.h5 and the eval blocks, or the single_task file),
  splits: {split: {scalars {name: float}, per_position {name: (P,) float32}, num_sequences,
                   batches_by_rank {rank: [batch indices]}, fit_predictions (fit_size, ...) float16,
                   [per_task {task_ids, name: (D,)}  (single_task mode)]}},
  [predictions, labels {split: tensor}  (eval_kwargs.return_all)], [hidden_states {split: float16}],
  [strategy_loss {median_of_means, group_means, num_sequences, measure}  (Bayes predictors)]

Scalars: loss and the task metric (urns nll `loss` and `kl`; regression `loss` = MSE and `mse_per_dim`;
classification `loss` = CE and `accuracy`), d_M, d_G, d_MG, r, w_M, interp_distance (normscale.metrics.summarize).

Verified inputs. A checkpoint's weights are checked against the sizes and sha256 in its meta.json when loaded
(normscale.checkpoints), and a checkpoint must belong to its run: one whose meta.json identity_hash differs from the
identity of the run's config_resolved.yaml is not evaluated (checkpoints written before normscale recorded it are).
A checkpoint that fails either check is named in one line on stderr ("normscale: skipped: ...") and skipped; the
other checkpoints are evaluated, and the command then ends with exit code 1 and the list of skipped checkpoints.

What counts as done. An existing metrics file is done when it loads (`load_metrics`: every member of its zip archive
matches the CRC-32 torch recorded when writing it, then torch.load) and was made with the same eval settings
(`eval_settings`: eval_kwargs without `run`, which only selects, and without the keys its mode and model do not read:
sequences_per_task outside single_task mode, num_eval_batches in it, strategy_loss_sequences except for model=bayes;
a key missing from an older file counts as its default). Otherwise:
  no file, or overwrite=true          evaluated
  the file does not load, or its      evaluated again, with one line naming the file and why; the identity compared
  identity_hash is not its run's      is that of the config_resolved.yaml beside it (runs/<run>/, runs/bayes-.../...)
  made with other eval settings       kept, with one line per run (per file for Bayes/LLM) naming the settings that
                                      differ and saying that overwrite=true re-evaluates them
  done                                skipped (Bayes/LLM: one line, "... exists; overwrite=true evaluates it again")
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from normscale.checkpoints import CheckpointError, load_checkpoint
from normscale.config import Config, FaultError, NormscaleError
from normscale.data import load_eval_splits, load_single_task_split, load_task_pools, plan_data, prepare_data
from normscale.data.dataset import MixtureDataset
from normscale.data.priors import task_prior_weights
from normscale.data.store import DataPlan, check_budget, eval_block_names, read_manifest, single_task_name, to_torch
from normscale.layout import (CONFIG_FILE, METRICS_FILES, bayes_label, checkpoint_dir, experiment_dir, identity_hash,
                              list_checkpoints, llm_label, read_config, runs_dir, single_shot_dir, trained_run_dirs,
                              write_config)
from normscale.metrics import predict, summarize
from normscale.model import TRAINABLE, build_model
from normscale.provenance import provenance
from normscale.results import eval_settings, existing_result, save_metrics
from normscale.settings import get as get_setting

# normscale.dist (and with it accelerate) is imported where it is used, so that importing this module for its
# metrics-file helpers (normscale.collate, a notebook) stays light.

FORMAT = 1
REFERENCE_KINDS = ("memorizing", "generalizing")
STRATEGY_LOSS_GROUPS = 10


class ModelEvaluator:
    """Scores models on one dataset's saved eval sets (standard: the ID/OOD(/IWL) splits, a prefix of
    num_eval_batches x batch_size sequences, from as many eval blocks as it needs, saved first where missing;
    single_task: sequences_per_task of every training task), batch by batch, against the memorizing and generalizing
    predictors on the same sequences (computed once, then reused). `plan`: the command's plan_data(config), when it
    has one already."""

    def __init__(self, config: Config, accelerator=None, plan: DataPlan | None = None):
        self.config, self.accelerator = config, accelerator
        self.rank, self.world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        self.device = accelerator.device if accelerator else torch.device("cpu")
        ev, plan = config.eval_kwargs, plan or plan_data(config)
        self.setting = get_setting(config.setting, config.task_kwargs)
        self.directory, self.data_key = plan.directory, plan.key
        if read_manifest(plan.directory) is None:
            raise NormscaleError(f"no data in {plan.directory}: train the run first, or generate its data with "
                                 f"`python -m normscale.data` and the run's overrides")
        if ev.mode == "standard":
            n = ev.batch_size * ev.num_eval_batches
            check_budget(config, plan, train_shards=False)  # the eval blocks this set needs fit the storage budget
            arrays = load_eval_splits(plan.directory, n)
            self.data_files = ["tasks.h5", *eval_block_names(config.data_kwargs.eval_size, n)]
        else:
            arrays = {"single_task": load_single_task_split(config, ev.sequences_per_task, plan)}
            self.data_files = ["tasks.h5", single_task_name(ev.sequences_per_task)]
        self.splits = {s: to_torch(a, self.setting) for s, a in arrays.items()}
        for split in self.splits.values():  # a row's identity, whatever batch or rank scores it (LLM colour mappings)
            split["sequence_index"] = torch.arange(len(split["task_ids"]))
        pools = load_task_pools(plan.directory)
        self.train_tasks = pools["train"]
        self.log_prior = torch.from_numpy(np.log(task_prior_weights(
            config.task_kwargs.prior, config.task_kwargs.num_tasks, config.task_kwargs.prior_exponent)))
        self._references: dict[str, dict[str, torch.Tensor]] = {}

    def predictor(self, kind: str) -> torch.nn.Module:
        return self.setting.predictor(kind, self.train_tasks, self.log_prior).to(self.device)

    def references(self, split: str) -> dict[str, torch.Tensor]:
        """M's and G's predictions on a split (computed on first use, split across ranks like any model)."""
        if split not in self._references:
            self._references[split] = {kind: self.predict(self.predictor(kind), split)[0] for kind in REFERENCE_KINDS}
        return self._references[split]

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, split: str, collective: bool = False
                ) -> tuple[torch.Tensor, dict[int, list[int]], torch.Tensor | None]:
        """(N, ...) float32 predictions of `model` (already on its devices) on a split, on CPU: rank r scores batches
        r, r + world, ...; the results are gathered in batch order. Also {rank: batch indices it scored} and, for
        models that report it after each call (LLMs), the (N, P) `coverage`. `collective`: the model's forward is a
        collective (FSDP), so every rank runs the same number of forwards, repeating batch 0 where it has none."""
        arrays, size = self.splits[split], self.config.eval_kwargs.batch_size
        total = len(next(iter(arrays.values())))
        count = math.ceil(total / size)
        model.eval()
        mine = {}
        rounds = math.ceil(count / self.world) if collective else 0
        for b in (range(self.rank, rounds * self.world, self.world) if collective else range(self.rank, count, self.world)):
            batch = {k: v[(b if b < count else 0) * size:((b if b < count else 0) + 1) * size].to(self.device)
                     for k, v in arrays.items()}
            predictions = predict(self.setting, model, batch).cpu()
            coverage = getattr(model, "coverage", None)
            if b < count:
                mine[b] = (self.rank, predictions, None if coverage is None else coverage.float().cpu())
        parts = mine
        if self.accelerator:
            from normscale.dist.accel import gather_indexed

            parts = gather_indexed(self.accelerator, mine)
        if sorted(parts) != list(range(count)):
            raise NormscaleError(f"gathered eval batches {sorted(parts)} of {count}: some are missing")
        by_rank = {}
        for b in range(count):
            by_rank.setdefault(parts[b][0], []).append(b)
        coverage = None if parts[0][2] is None else torch.cat([parts[b][2] for b in range(count)])
        return torch.cat([parts[b][1] for b in range(count)]), by_rank, coverage

    def evaluate(self, model: torch.nn.Module, collective: bool = False) -> dict:
        """Every split: SPEC C scalars and per-position arrays, the fit subset's predictions, and what
        eval_kwargs asks for besides (per-task metrics in single_task mode, predictions and labels, hidden states);
        for LLMs the candidate coverage (scalar `coverage` and per position)."""
        ev, setting = self.config.eval_kwargs, self.setting
        results = {"splits": {}}
        for split, arrays in self.splits.items():
            predictions, by_rank, coverage = self.predict(model, split, collective)
            refs = self.references(split)
            summary = summarize(setting, predictions, refs["memorizing"], refs["generalizing"], arrays)
            summary |= {"num_sequences": len(predictions), "batches_by_rank": by_rank,
                        "fit_predictions": predictions[:ev.fit_size].half()}
            if coverage is not None:
                summary["scalars"]["coverage"] = coverage.double().mean().item()
                summary["per_position"]["coverage"] = coverage.double().mean(0).float()
            if ev.mode == "single_task":
                summary["per_task"] = self._per_task(predictions, refs, arrays)
            results["splits"][split] = summary
            if ev.return_all:
                results.setdefault("predictions", {})[split] = predictions
                results.setdefault("labels", {})[split] = setting.labels(arrays)
            if ev.save_hidden_states:
                results.setdefault("hidden_states", {})[split] = self._hidden_states(model, arrays)
        return results

    def _per_task(self, predictions: torch.Tensor, refs: dict, arrays: dict) -> dict[str, torch.Tensor]:
        """Scalars of each training task over its own sequences (rows k*n ... (k+1)*n - 1), as (D,) arrays."""
        n, D = self.config.eval_kwargs.sequences_per_task, self.config.task_kwargs.num_tasks
        per_task = {"task_ids": torch.arange(D)}
        for k in range(D):
            rows = slice(k * n, (k + 1) * n)
            scalars = summarize(self.setting, predictions[rows], refs["memorizing"][rows],
                                refs["generalizing"][rows], {a: v[rows] for a, v in arrays.items()})["scalars"]
            for name, value in scalars.items():
                per_task.setdefault(name, torch.empty(D, dtype=torch.float64))[k] = value
        if not torch.equal(arrays["task_ids"][::n].long(), per_task["task_ids"]):
            raise NormscaleError("single_task rows are not grouped by task: regenerate the single_task file")
        return per_task

    @torch.no_grad()
    def _hidden_states(self, model: torch.nn.Module, arrays: dict) -> torch.Tensor:
        if not hasattr(model, "hidden_states"):
            raise NormscaleError(f"eval_kwargs.save_hidden_states=true: {type(model).__name__} has no hidden states; "
                                 "use it with model=transformer, or set it false")
        batch = {k: v[:self.config.eval_kwargs.fit_size].to(self.device) for k, v in arrays.items()}
        return model.hidden_states(batch).half().cpu()

    @torch.no_grad()
    def strategy_loss(self, predictor: torch.nn.Module) -> dict:
        """SPEC D's L_s: the in-distribution loss of a predictor, median of the means of 10 groups of fresh
        sequences from the D training tasks (the setting's strategy_loss: urns KL(theta||q), regression
        (y - y^)^2 / (2 sigma^2), classification CE), each group from its own named stream; groups are split across
        ranks."""
        config, setting = self.config, self.setting
        size = config.eval_kwargs.strategy_loss_sequences // STRATEGY_LOSS_GROUPS
        dataset = MixtureDataset(setting, self.train_tasks, config.task_kwargs.prior, batch_size=size, seed=config.seed)
        means = {}
        for g in range(self.rank, STRATEGY_LOSS_GROUPS, self.world):
            batch = dataset.with_task_params(dataset.sample(size, f"strategy_loss/{g}"))
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss = setting.strategy_loss(setting.pointwise(predict(setting, predictor, batch), batch), batch)
            means[g] = loss.double().mean().item()
        if self.accelerator:
            from normscale.dist.accel import gather_indexed

            means = gather_indexed(self.accelerator, means)
        group_means = [means[g] for g in range(STRATEGY_LOSS_GROUPS)]
        return {"median_of_means": float(np.median(group_means)), "group_means": group_means,
                "num_sequences": size * STRATEGY_LOSS_GROUPS, "measure": setting.strategy_measure}

    def header(self) -> dict:
        manifest = read_manifest(self.directory)
        return {"format": FORMAT, "setting": self.config.setting, "mode": self.config.eval_kwargs.mode,
                "data_dir": self.directory.name, "data_key": self.data_key,
                "eval_hashes": {name: manifest["files"][name]["sha256"] for name in self.data_files},
                "eval_kwargs": dataclasses.asdict(self.config.eval_kwargs)}


def trained_runs(config: Config) -> list[Path]:
    """Run directories of the experiment holding a trained model (a saved config), sorted by name; only
    eval_kwargs.run when it is set."""
    runs = trained_run_dirs(experiment_dir(config))
    wanted = config.eval_kwargs.run
    if wanted is None:
        return runs
    chosen = [p for p in runs if p.name == wanted]
    if not chosen:
        names = ", ".join(p.name for p in runs) or "none"
        raise NormscaleError(f"eval_kwargs.run={wanted!r} is not a trained run of {runs_dir(experiment_dir(config))}; "
                             f"runs: {names}")
    return chosen


def saved_configs(runs: list[Path], say: Callable[[str], None]) -> tuple[dict[Path, Config], list[str]]:
    """({run: its saved config}, names of the runs whose config_resolved.yaml cannot be read back: each is named
    through `say` and left out, so one damaged run does not stop the experiment's evaluation)."""
    configs, unreadable = {}, []
    for run in runs:
        try:
            configs[run] = read_config(run)
        except NormscaleError as error:
            say(f"normscale: skipped: {error}")
            unreadable.append(run.name)
    return configs, unreadable


def with_eval_kwargs(run_config: Config, config: Config, **changes) -> Config:
    """A run's own config (task, data, model) with the evaluation settings and the CACHE_DIR of this command (an
    experiment directory may have moved since training)."""
    combined = dataclasses.replace(run_config, eval_kwargs=config.eval_kwargs, overwrite=config.overwrite,
                                   cache_dir=config.cache_dir, **changes)
    combined.check()
    return combined


def evaluate_checkpoints(config: Config, accelerator) -> list[Path]:
    """Every checkpoint of the trained runs that is not done (module docstring), each verified before it is scored;
    a damaged checkpoint or one of another run identity is named and skipped, and the command then ends with a
    FaultError (exit 1) listing them."""
    from normscale.dist.accel import broadcast_from_main

    runs = trained_runs(config)
    if not runs:
        raise NormscaleError(f"no trained runs in {runs_dir(experiment_dir(config))}: train first "
                             f"(python -m normscale.train name={config.name} ...), or evaluate a Bayes predictor "
                             "with model=bayes")
    filename = METRICS_FILES[config.eval_kwargs.mode]
    wanted = eval_settings(dataclasses.asdict(config.eval_kwargs), config.model)
    saved, unreadable = saved_configs(runs, lambda line: accelerator.is_main_process and print(line, file=sys.stderr))
    runs = list(saved)
    identities = {run: identity_hash(saved[run]) for run in runs}
    todo = None
    if accelerator.is_main_process:  # decided once: checkpoints may appear while a run is still training
        todo = []
        for run in runs:
            other, differing = 0, set()
            for step, path in list_checkpoints(run):
                status, detail = ("missing", "") if config.overwrite else existing_result(
                    path / filename, wanted, config.model, identities[run])
                if status == "redo":
                    print(f"normscale: {detail}; evaluating it again", flush=True)
                if status == "other":
                    other += 1
                    differing.update(detail.split(", "))
                elif status != "done":
                    todo.append((run, step))
            if other:
                print(f"normscale: {other} checkpoint(s) of {run.name} were evaluated with other eval settings "
                      f"({', '.join(sorted(differing))}); kept, overwrite=true re-evaluates them", flush=True)
    todo = broadcast_from_main(accelerator, todo)
    accelerator.print(f"normscale: evaluating {len(todo)} checkpoint(s) of {len(runs)} run(s) "
                      f"({config.eval_kwargs.mode} mode)")
    evaluator, written, skipped, run_configs = None, [], list(unreadable), {}
    for run, step in todo:
        if run not in run_configs:
            run_config = with_eval_kwargs(saved[run], config)
            run_configs[run] = (run_config, plan_data(run_config))
        run_config, plan = run_configs[run]
        checkpoint = checkpoint_dir(run, step)
        loaded, problem = None, None
        if accelerator.is_main_process:  # verified once; the other ranks follow the main process's verdict
            try:
                loaded = verified_checkpoint(checkpoint, identities[run])
            except CheckpointError as error:
                problem = str(error)
        problem = broadcast_from_main(accelerator, problem)
        if problem:
            if accelerator.is_main_process:
                print(f"normscale: skipped: {problem}", file=sys.stderr, flush=True)
            skipped.append(f"{run.name}/{checkpoint.name}")
            continue
        weights, meta = loaded or load_checkpoint(checkpoint)
        if evaluator is None or evaluator.directory != plan.directory:
            evaluator = ModelEvaluator(run_config, accelerator, plan)
        model = build_model(run_config)
        model.load_state_dict(weights)
        results = evaluator.evaluate(model.to(accelerator.device))
        path = checkpoint / filename
        if accelerator.is_main_process:
            save_metrics(path, {**evaluator.header(), "model": run_config.model, "kind": None, "run": run.name,
                                "step": step, "identity_hash": identities[run], "provenance": provenance(),
                                "checkpoint_meta": meta, **results})
            id_split = results["splits"].get("id") or results["splits"]["single_task"]
            accelerator.print(f"normscale: {run.name} step {step}: loss {id_split['scalars']['loss']:.4f}, "
                              f"w_M {id_split['scalars']['w_M']:.3f} -> {path}")
        written.append(path)
    accelerator.wait_for_everyone()
    if skipped:
        raise FaultError(f"{len(skipped)} checkpoint(s) of {runs_dir(experiment_dir(config))} were skipped, each named "
                         f"above: {', '.join(skipped)}; the other {len(written)} were evaluated")
    return written


def verified_checkpoint(path: Path, identity: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, meta) of a checkpoint whose files match their recorded hashes and whose recorded identity (when it
    has one: older checkpoints do not) is its run's; raises CheckpointError otherwise."""
    weights, meta = load_checkpoint(path)
    recorded = meta.get("identity_hash")
    if recorded is not None and recorded != identity:
        raise CheckpointError(f"checkpoint {path} was trained as another run (identity {recorded}) than its run's "
                              f"{CONFIG_FILE} describes ({identity}); delete the checkpoint, or train the run again "
                              "with overwrite=true")
    return weights, meta


def experiment_datasets(config: Config, **changes) -> list[tuple[DataPlan, Config]]:
    """Every dataset the experiment's trained runs used (the config's own when nothing is trained): its data plan and
    a config for it (the run's task and data, this command's eval_kwargs, CACHE_DIR and `changes`), by directory."""
    sources = list(saved_configs(trained_runs(config), lambda line: print(line, file=sys.stderr))[0].values()) or [config]
    datasets: dict[Path, tuple[DataPlan, Config]] = {}
    for source in sources:
        plan = plan_data(source)
        datasets.setdefault(plan.directory, (plan, with_eval_kwargs(source, config, **changes)))
    return [datasets[directory] for directory in sorted(datasets)]


def evaluate_single_shot(config: Config, accelerator, label: str, kind: str | None, changes: dict,
                         overrides: list[str], score: Callable[[ModelEvaluator], dict]) -> list[Path]:
    """A model without checkpoints (a Bayes predictor, an LLM) on every dataset of the experiment: results in
    runs/<label>/<dataset>/ with the config used; existing results that are done (module docstring) are kept unless
    overwrite=true."""
    from normscale.dist.accel import broadcast_from_main

    filename = METRICS_FILES[config.eval_kwargs.mode]
    wanted = eval_settings(dataclasses.asdict(config.eval_kwargs), config.model)
    datasets = [(plan, dataset_config, single_shot_dir(experiment_dir(config), label, plan.directory.name))
                for plan, dataset_config in experiment_datasets(config, **changes)]
    chosen = None
    if accelerator.is_main_process:  # decided once, like the checkpoints
        chosen = []
        for i, (_, _, out) in enumerate(datasets):
            saved = identity_hash(read_config(out)) if (out / CONFIG_FILE).exists() else None
            status, detail = ("missing", "") if config.overwrite else existing_result(out / filename, wanted,
                                                                                      config.model, saved)
            if status == "done":
                print(f"normscale: {out / filename} exists; overwrite=true evaluates it again", flush=True)
            elif status == "other":
                print(f"normscale: {out / filename} was evaluated with other eval settings ({detail}); kept, "
                      "overwrite=true re-evaluates it", flush=True)
            else:
                if status == "redo":
                    print(f"normscale: {detail}; evaluating it again", flush=True)
                chosen.append(i)
    todo = [datasets[i] for i in broadcast_from_main(accelerator, chosen)]
    written = []
    for plan, dataset_config, out in todo:
        if accelerator.is_main_process:
            prepare_data(dataset_config, plan, train_shards=False)
        accelerator.wait_for_everyone()
        evaluator = ModelEvaluator(dataset_config, accelerator, plan)
        results = score(evaluator)
        if accelerator.is_main_process:
            write_config(out, dataset_config, overrides)
            save_metrics(out / filename, {**evaluator.header(), "model": dataset_config.model, "kind": kind,
                                          "run": f"{label}/{plan.directory.name}", "step": None,
                                          "identity_hash": identity_hash(dataset_config), "provenance": provenance(),
                                          "checkpoint_meta": None, **results})
            summary = ", ".join(f"{split} w_M {r['scalars']['w_M']:.3f}" for split, r in results["splits"].items())
            accelerator.print(f"normscale: {label} on {plan.directory.name}: {summary} -> {out / filename}")
        written.append(out / filename)
    accelerator.wait_for_everyone()
    return written


def evaluate_bayes(config: Config, accelerator) -> list[Path]:
    kind = config.model_kwargs.kind

    def score(evaluator: ModelEvaluator) -> dict:
        predictor = evaluator.predictor(kind)
        return {**evaluator.evaluate(predictor), "strategy_loss": evaluator.strategy_loss(predictor)}

    changes = {"model": "bayes", "model_kwargs": dataclasses.replace(config.model_kwargs, kind=kind)}
    return evaluate_single_shot(config, accelerator, bayes_label(kind), kind, changes,
                                ["model=bayes", f"model_kwargs.kind={kind}"], score)


def evaluate_llm(config: Config, accelerator) -> list[Path]:
    """A pretrained causal LM on the experiment's urn sequences (SPEC F), loaded once, scored on every dataset."""
    from normscale.cli import check_llm_path; check_llm_path(config)  # noqa: E702 (first: before any work)
    from normscale.dist.llm import load_llm, parameter_bytes
    from normscale.model.llm import COLOUR_WORDS, LLMScorer

    kwargs = config.model_kwargs
    if config.setting != "balls_and_urns":
        raise NormscaleError(f"model=llm evaluates balls_and_urns sequences (SPEC F), not setting={config.setting}")
    if config.task_kwargs.num_dims > len(COLOUR_WORDS):
        raise NormscaleError(f"task_kwargs.num_dims={config.task_kwargs.num_dims} colours, but only "
                             f"{len(COLOUR_WORDS)} colour words are defined (normscale.model.llm.COLOUR_WORDS)")
    if not kwargs.model_path:
        raise NormscaleError("model=llm needs model_kwargs.model_path=<local directory or hub id>")
    label = llm_label(kwargs.model_path)
    loaded = {}

    def held(model, what: str) -> tuple[int, int]:
        local, total = parameter_bytes(model)
        print(f"normscale: rank {accelerator.process_index} holds {local / 2**20:.3f} of {total / 2**20:.3f} MiB "
              f"{what}", flush=True)
        return local, total

    def score(evaluator: ModelEvaluator) -> dict:
        if not loaded:  # only when some dataset still needs it
            model, tokenizer = load_llm(config, accelerator)
            local, total = held(model, f"of {kwargs.model_path} ({kwargs.sharding})")
            loaded["scorer"] = LLMScorer(model, tokenizer, config.task_kwargs.num_dims, mapping=kwargs.colour_mapping,
                                         seed=config.seed, vocab_chunk=kwargs.vocab_chunk)
            loaded["bytes"] = {"rank": accelerator.process_index, "local": local, "total": total}
        results = evaluator.evaluate(loaded["scorer"], collective=kwargs.sharding == "fsdp")
        local, _ = held(loaded["scorer"].model, "after scoring")  # FSDP: still sharded between forwards
        return {**results, "parameter_bytes": {**loaded["bytes"], "local_after_scoring": local}}

    changes = {"model": "llm", "model_kwargs": kwargs}
    return evaluate_single_shot(config, accelerator, label, None, changes,
                                ["model=llm", f"model_kwargs.model_path={kwargs.model_path}"], score)


def evaluate(config: Config) -> list[Path]:
    from normscale.dist.accel import make_accelerator

    accelerator = make_accelerator(config)
    if config.model == "bayes":
        return evaluate_bayes(config, accelerator)
    if config.model == "llm":
        return evaluate_llm(config, accelerator)
    if config.model in TRAINABLE:
        return evaluate_checkpoints(config, accelerator)
    raise NormscaleError(f"model={config.model!r} cannot be evaluated; choose one of: {', '.join(TRAINABLE)}, bayes, llm")


def main() -> None:
    from normscale.cli import hydra_main
    from normscale.dist.accel import finish_process

    hydra_main(evaluate)
    finish_process()


if __name__ == "__main__":
    main()
