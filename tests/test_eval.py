"""Evaluation, collation and the analysis entry, as users run them: `python -m normscale.eval | collate | analysis`,
and `launch/cpu.sh 2 -m normscale.eval` for two processes."""
import json
import math
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT, run_module
from test_report_page import check_page
from normscale import settings
from normscale.layout import list_checkpoints, read_config
from normscale.collate import load_eval_results
from normscale.config import TaskConfig, checkpoint_schedule
from normscale.eval import ModelEvaluator
from normscale.analysis import normative
from normscale.results import load_metrics, save_metrics
from normscale.metrics import summarize

SETTING = "balls_and_urns"
ARGS = ["setting=balls_and_urns", "name=ev", "logging.wandb=false", "task_kwargs.num_dims=4",
        "task_kwargs.context_length=12", "task_kwargs.num_ood_tasks=20", "training_kwargs.batch_size=16",
        "training_kwargs.max_steps=120", "training_kwargs.warmup_steps=10", "training_kwargs.eval_every=1000",
        "training_kwargs.save_steps.num_checkpoints=4", "training_kwargs.save_steps.first_step=10",
        "data_kwargs.eval_size=96", "eval_kwargs.batch_size=32",
        "eval_kwargs.num_eval_batches=3", "eval_kwargs.fit_size=16", "eval_kwargs.strategy_loss_sequences=200",
        "eval_kwargs.sequences_per_task=3"]
NUM_TASKS = (2, 64)


def cli(module: str, cache, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    flags = [a for a in args if a == "-m"]  # Hydra's flags go before the overrides
    result = run_module(module, *flags, *ARGS, *[a for a in args if a != "-m"], env={"CACHE_DIR": str(cache)})
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two trained runs (D = 2 and 64) and both Bayes predictors evaluated on their datasets."""
    cache = tmp_path_factory.mktemp("cache")
    cli("normscale.train", cache, "-m", f"task_kwargs.num_tasks={','.join(map(str, NUM_TASKS))}",
        "model_kwargs.hidden_size=32")
    cli("normscale.eval", cache, "-m", "model=bayes", "model_kwargs.kind=memorizing,generalizing")
    return cache


def experiment(cache):
    return cache / "experiments" / SETTING / "ev"


def trained_runs(cache):
    return sorted(p for p in (experiment(cache) / "runs").iterdir() if not p.name.startswith("bayes-"))


def copy_experiment(cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy, symlinks=True)
    return copy


def test_bayes_predictors_scored_as_models_give_w_m_one_and_zero(trained):
    for kind, expected in (("memorizing", 1.0), ("generalizing", 0.0)):
        files = sorted((experiment(trained) / "runs" / f"bayes-{kind}").glob("*/metrics.pt"))
        assert len(files) == len(NUM_TASKS)  # one per dataset the experiment trained on
        for path in files:
            metrics = load_metrics(path)
            assert metrics["step"] is None and metrics["model"] == "bayes" and metrics["kind"] == kind
            for split, summary in metrics["splits"].items():
                assert summary["scalars"]["w_M"] == pytest.approx(expected, abs=1e-6), (path, split)
                own = "d_M" if kind == "memorizing" else "d_G"
                assert summary["scalars"][own] == pytest.approx(0, abs=1e-7)
                assert summary["fit_predictions"].dtype == torch.float16 and len(summary["fit_predictions"]) == 16
    losses = {}
    for kind in ("memorizing", "generalizing"):
        for path in (experiment(trained) / "runs" / f"bayes-{kind}").glob("D2-*/metrics.pt"):
            losses[kind] = load_metrics(path)["strategy_loss"]
    assert losses["memorizing"]["num_sequences"] == 200 and len(losses["memorizing"]["group_means"]) == 10
    assert losses["memorizing"]["median_of_means"] < losses["generalizing"]["median_of_means"]  # D=2: M wins in-dist.


def test_const_predictor_through_the_command_line_and_bayes_results_cached(trained, tmp_path):
    """Const (alpha / sum alpha: uniform over colours here) as a model; a second run skips it, overwrite=true redoes it."""
    cache = copy_experiment(trained, tmp_path)
    cli("normscale.eval", cache, "model=bayes", "model_kwargs.kind=const")
    files = sorted((experiment(cache) / "runs" / "bayes-const").glob("*/metrics.pt"))
    assert len(files) == len(NUM_TASKS)
    for path in files:
        metrics = load_metrics(path)
        assert metrics["kind"] == "const" and metrics["checkpoint_meta"] is None
        generalizing = load_metrics(experiment(cache) / "runs" / "bayes-generalizing" / path.parent.name / "metrics.pt")
        for split, summary in metrics["splits"].items():  # uniform predictions: KL to theta above G's, w_M in [0, 1]
            assert summary["scalars"]["kl"] > generalizing["splits"][split]["scalars"]["kl"]
            assert 0 <= summary["scalars"]["w_M"] <= 1
    mtimes = [p.stat().st_mtime_ns for p in files]
    again = cli("normscale.eval", cache, "model=bayes", "model_kwargs.kind=const")
    assert again.stdout.count("exists; overwrite=true evaluates it again") == len(NUM_TASKS)
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    cli("normscale.eval", cache, "model=bayes", "model_kwargs.kind=const", "overwrite=true")
    assert all(p.stat().st_mtime_ns > m for p, m in zip(files, mtimes))


class Mixture(nn.Module):
    """A 'model' whose colour distribution is w M + (1 - w) G, optionally shifted by one position."""

    def __init__(self, evaluator: ModelEvaluator, w: float, shift: int = 0):
        super().__init__()
        self.m, self.g, self.w, self.shift = evaluator.predictor("memorizing"), evaluator.predictor("generalizing"), w, shift
        self.setting = evaluator.config.setting

    def forward(self, batch):
        m, g = self.m(batch), self.g(batch)
        if self.setting == "linear_regression":
            out = self.w * m + (1 - self.w) * g
        else:
            out = torch.logaddexp(m + math.log(self.w), g + math.log(1 - self.w))
        return torch.roll(out, self.shift, dims=1) if self.shift else out


@pytest.mark.parametrize("setting", ["balls_and_urns", "linear_regression"])
def test_a_known_mixture_of_m_and_g_is_recovered_and_an_off_by_one_is_not(tmp_path, setting):
    """0.3 M + 0.7 G scored through the evaluator is recovered: w_M = 0.3 (exactly for the squared distance of
    regression, to 0.02 for the symmetrised KL of urns, which is not linear in the mixture weight) and the
    interpolation distance d(T, w_M M + (1 - w_M) G) is ~0. The same mixture one position off is not."""
    from conftest import small_config
    from normscale.data import prepare_data

    config = small_config(tmp_path, setting, "task_kwargs.num_tasks=4", "eval_kwargs.num_eval_batches=2")
    prepare_data(config, train_shards=False)
    evaluator = ModelEvaluator(config)
    tolerance = 1e-6 if setting == "linear_regression" else 0.02

    def recovered(scalars):
        return abs(scalars["w_M"] - 0.3) < tolerance and scalars["interp_distance"] < 0.01 * scalars["d_MG"]

    aligned = evaluator.evaluate(Mixture(evaluator, 0.3))["splits"]
    assert all(recovered(s["scalars"]) for s in aligned.values()), {k: s["scalars"] for k, s in aligned.items()}
    shifted = evaluator.evaluate(Mixture(evaluator, 0.3, shift=1))["splits"]
    assert not any(recovered(s["scalars"]) for s in shifted.values()), {k: s["scalars"] for k, s in shifted.items()}


def test_w_m_is_nan_where_m_and_g_agree():
    p = torch.log_softmax(torch.randn(5, 3, 4), -1)
    batch = {"tokens": torch.zeros(5, 4, dtype=torch.long), "theta": torch.full((5, 4), 0.25)}
    urns = settings.get("balls_and_urns", TaskConfig(num_dims=4, context_length=3))
    summary = summarize(urns, p, p.clone(), p.clone(), batch)
    assert math.isnan(summary["scalars"]["w_M"]) and torch.isnan(summary["per_position"]["w_M"]).all()
    assert urns.distance(p, p).abs().max() < 1e-7


def test_checkpoints_are_evaluated_once_and_again_only_with_overwrite(trained, tmp_path):
    cache = copy_experiment(trained, tmp_path)
    first = cli("normscale.eval", cache)
    runs = trained_runs(cache)
    files = [path / "metrics.pt" for run in runs for _, path in list_checkpoints(run)]
    assert len(files) == 2 * 5 and all(f.exists() for f in files)  # steps 0, 4 scheduled incl. 120
    assert "evaluating 10 checkpoint(s) of 2 run(s)" in first.stdout
    stamps = [f.stat().st_mtime_ns for f in files]
    assert "evaluating 0 checkpoint(s)" in cli("normscale.eval", cache).stdout
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert "evaluating 10 checkpoint(s)" in cli("normscale.eval", cache, "overwrite=true").stdout
    metrics = load_metrics(files[-1])
    assert metrics["step"] == 120 and metrics["checkpoint_meta"]["sequences_seen"] == 120 * 16
    assert set(metrics["splits"]) == {"id", "ood"}
    assert metrics["splits"]["id"]["per_position"]["w_M"].shape == (12,)
    assert metrics["splits"]["id"]["num_sequences"] == 96


def test_one_run_with_everything_saved(trained, tmp_path):
    cache = copy_experiment(trained, tmp_path)
    run = trained_runs(cache)[0]
    cli("normscale.eval", cache, f"eval_kwargs.run='{run.name}'", "eval_kwargs.return_all=true",
        "eval_kwargs.save_hidden_states=true")
    assert not any((r / "checkpoint-0" / "metrics.pt").exists() for r in trained_runs(cache)[1:])
    metrics = load_metrics(run / "checkpoint-120" / "metrics.pt")
    assert metrics["predictions"]["id"].shape == (96, 12, 4) and metrics["labels"]["id"].shape == (96, 12)
    assert metrics["hidden_states"]["ood"].shape == (16, 12, 32)
    missing = cli("normscale.eval", cache, "eval_kwargs.run=nope", ok=False)
    assert missing.returncode == 2 and "eval_kwargs.run='nope' is not a trained run" in missing.stderr


def test_single_task_mode_covers_every_task_once(trained, tmp_path):
    cache = copy_experiment(trained, tmp_path)
    cli("normscale.eval", cache, "eval_kwargs.mode=single_task")
    for run in trained_runs(cache):
        D = read_config(run).task_kwargs.num_tasks
        metrics = load_metrics(run / "checkpoint-120" / "metrics-single_task.pt")
        split = metrics["splits"]["single_task"]
        assert split["num_sequences"] == 3 * D
        assert torch.equal(split["per_task"]["task_ids"], torch.arange(D))
        assert split["per_task"]["loss"].shape == (D,) and torch.isfinite(split["per_task"]["loss"]).all()
        assert not (run / "checkpoint-120" / "metrics.pt").exists()  # the standard mode is a separate file
    data = next((experiment(cache) / "data").glob("D64-*"))
    with h5py.File(data / "single_task-3.h5") as f:
        ids = f["single_task/task_ids"][()]
    assert np.array_equal(ids, np.repeat(np.arange(64), 3))


def test_two_processes_evaluate_like_one_with_batches_that_do_not_divide(trained, tmp_path):
    single = copy_experiment(trained, tmp_path / "one")
    double = copy_experiment(trained, tmp_path / "two")
    run = trained_runs(single)[1].name
    cli("normscale.eval", single, f"eval_kwargs.run='{run}'")
    env = {**os.environ, "CACHE_DIR": str(double), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "launch/cpu.sh"), "2", "-m", "normscale.eval", *ARGS,
                             f"eval_kwargs.run='{run}'"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in (0, 120):
        one = load_metrics(experiment(single) / "runs" / run / f"checkpoint-{step}" / "metrics.pt")
        two = load_metrics(experiment(double) / "runs" / run / f"checkpoint-{step}" / "metrics.pt")
        for split in ("id", "ood"):
            assert one["splits"][split]["batches_by_rank"] == {0: [0, 1, 2]}
            assert two["splits"][split]["batches_by_rank"] == {0: [0, 2], 1: [1]}  # 3 batches on 2 ranks
            assert one["splits"][split]["num_sequences"] == two["splits"][split]["num_sequences"] == 96
            for name, value in one["splits"][split]["scalars"].items():
                assert value == pytest.approx(two["splits"][split]["scalars"][name], rel=1e-6, abs=1e-9), name
            assert torch.equal(one["splits"][split]["fit_predictions"], two["splits"][split]["fit_predictions"])


def dump(path) -> dict:
    """Everything in an HDF5 file: attributes and dataset contents by path."""
    content = {}
    with h5py.File(path) as f:
        def visit(name, obj):
            content[name] = ({k: repr(v) for k, v in obj.attrs.items()},
                             None if not isinstance(obj, h5py.Dataset) else
                             repr(obj[()].tolist()) if obj.dtype.kind == "O" else obj[()].tobytes())
        f.visititems(visit)
        content["/"] = {k: repr(v) for k, v in f.attrs.items()}
    return content


def test_collation_is_idempotent_skips_incomplete_checkpoints_and_picks_them_up(trained, tmp_path):
    cache = copy_experiment(trained, tmp_path)
    cli("normscale.eval", cache)
    run = trained_runs(cache)[0]
    pending = run / "checkpoint-500"  # a complete checkpoint not evaluated yet
    shutil.copytree(run / "checkpoint-120", pending)
    (pending / "metrics.pt").unlink()
    staging = run / ".checkpoint-600.tmp-123"  # a checkpoint still being written
    shutil.copytree(run / "checkpoint-120", staging)
    first = cli("normscale.collate", cache)
    assert "collated 14 new metrics file(s) of 14" in first.stdout  # 2 runs x 5 checkpoints + 2 x 2 Bayes
    path = experiment(cache) / "metrics.h5"
    before = dump(path)
    assert "up to date" in cli("normscale.collate", cache).stdout
    assert dump(path) == before
    frame = load_eval_results(SETTING, "ev", cache_dir=str(cache), update=False)
    assert 500 not in set(frame["checkpoint"]) and 600 not in set(frame["checkpoint"])
    cli("normscale.eval", cache)  # evaluates checkpoint-500 only
    assert "collated 1 new metrics file(s)" in cli("normscale.collate", cache).stdout
    after = dump(path)
    unchanged = lambda content: {k: v for k, v in content.items() if "step-00000500" not in k and "table" not in k}
    assert unchanged(after) == unchanged(before)
    table = plain_table(path)
    assert len(table) == 14 * 2 + 2  # every (file, split) once; the new checkpoint's two splits added
    assert len(table[table["step"] == 500]) == 2
    frame = load_eval_results(SETTING, "ev", cache_dir=str(cache), update=False)
    assert 500 in set(frame["checkpoint"]) and 600 not in set(frame["checkpoint"])


def plain_table(path):
    """metrics.h5's flat table read the way the schema tells a user without normscale to read it."""
    import pandas as pd

    with h5py.File(path) as f:
        return pd.DataFrame({k: c.asstr()[()] if c.dtype.kind == "O" else c[()] for k, c in f["table"].items()})


def test_plain_h5py_and_pandas_read_sweep_parameters_and_metrics(trained, tmp_path):
    cache = copy_experiment(trained, tmp_path)
    cli("normscale.eval", cache)
    path = experiment(cache) / "metrics.h5"
    cli("normscale.collate", cache)
    frame = load_eval_results(SETTING, "ev", cache_dir=str(cache), update=False)
    with h5py.File(path) as f:
        parameters = json.loads(f.attrs["sweep_parameters"])  # every key the command lines set, as for the frame
        assert parameters == sorted(c for c in frame.columns if "." in c) and "task_kwargs.num_tasks" in parameters
        for run_group in f["runs"].values():
            config = json.loads(run_group.attrs["config"])
            values = json.loads(run_group.attrs["sweep_values"])
            assert values["task_kwargs.num_tasks"] == config["task_kwargs"]["num_tasks"]
            assert set(values) == set(parameters)
            if run_group.attrs["model"] == "transformer":
                assert values["model_kwargs.hidden_size"] == 32
    table = plain_table(path)
    assert len(table) == 2 * len(frame)  # id and ood of every row
    assert sorted(set(table["sweep.task_kwargs.num_tasks"])) == list(NUM_TASKS)
    assert table["step"].dtype == np.int64 and set(table["model"]) == {"transformer", "bayes"}
    for _, row in frame.iterrows():  # the table's scalars are the DataFrame's
        step = -1 if row["checkpoint"] is None else row["checkpoint"]
        for split in ("id", "ood"):
            match = table[(table["run"] == row["run"]) & (table["step"] == step) & (table["split"] == split)]
            assert len(match) == 1 and match["metric.w_M"].iloc[0] == pytest.approx(row["metrics"][split]["w_M"],
                                                                                   nan_ok=True)
            assert match["sweep.task_kwargs.num_tasks"].iloc[0] == row["task_kwargs.num_tasks"]


def test_load_eval_results_has_the_predecessor_columns_and_sweep_parameters(trained, tmp_path):
    from normscale.analysis_utils import load_eval_results as compatible

    cache = copy_experiment(trained, tmp_path)
    cli("normscale.eval", cache)
    frame = compatible(SETTING, "ev", cache_dir=str(cache))  # collates first
    assert {"config", "metrics", "checkpoint", "task_kwargs.num_tasks"} <= set(frame.columns)
    assert "seed" not in frame.columns  # not swept here
    bayes = frame[frame["model"] == "bayes"]
    assert len(bayes) == 4 and bayes["checkpoint"].isna().all() and all(c is None for c in bayes["checkpoint"])
    trained_rows = frame[frame["model"] == "transformer"]
    assert sorted(set(trained_rows["checkpoint"])) == sorted({0, *checkpoint_schedule("sqrt_schedule", 120, 4, 10)})
    for _, row in frame.iterrows():
        assert row["task_kwargs.num_tasks"] == row["config"].task_kwargs.num_tasks  # read from the saved config
    assert sorted(set(frame["task_kwargs.num_tasks"])) == list(NUM_TASKS)
    row = trained_rows.iloc[-1]
    assert set(row["metrics"]) == {"id", "ood"} and 0 <= row["metrics"]["id"]["w_M"] <= 1
    assert row["metrics"]["id"]["per_position"]["kl"].shape == (12,)


def memorizing_weight(cell, alpha, beta, gamma) -> float:
    return float(normative.memorizing_weight(cell.step, cell.K_M, cell.K_G, cell.L_M, cell.L_G, alpha, beta, gamma))


def test_analysis_recovers_known_parameters_from_metrics_files_and_draws_the_figures(trained, tmp_path):
    """Every checkpoint's ID fit predictions are replaced, in its metrics.pt, by the normative model's mixture of the
    M and G fit predictions in the Bayes metrics files of its dataset, at known (alpha, beta, gamma) and SPEC D's
    K_s(D) and L_s(D) (one dataset per D: L_s(D) is its median-of-means strategy loss), and its w_M by the mixture
    weight. Collated and analysed, the fit recovers the parameters and the predicted w_M follow the observed ones;
    a T, M, G, K or L of another cell, dataset, split or strategy, or a w_M of another cell, would not."""
    cache = copy_experiment(trained, tmp_path)
    cli("normscale.eval", cache)
    bayes = {(kind, p.parent.name): load_metrics(p) for kind in normative.STRATEGIES
             for p in (experiment(cache) / "runs" / f"bayes-{kind}").glob("*/metrics.pt")}
    cells = {}  # metrics.pt -> its cell, T still to be made
    for run in trained_runs(cache):
        D = read_config(run).task_kwargs.num_tasks
        for step, path in list_checkpoints(run):
            data = load_metrics(path / "metrics.pt")["data_dir"]
            M, G = (bayes[k, data]["splits"]["id"]["fit_predictions"].double().numpy() for k in normative.STRATEGIES)
            L_M, L_G = (bayes[k, data]["strategy_loss"]["median_of_means"] for k in normative.STRATEGIES)
            K_M, K_G = (normative.complexity_bits(SETTING, k, D, 4) for k in normative.STRATEGIES)
            cells[path / "metrics.pt"] = normative.Cell(D=D, step=step, T=M, M=M, G=G, K_M=K_M, K_G=K_G, L_M=L_M,
                                                        L_G=L_G)
    alpha, beta = 0.5, 0.6  # and gamma such that D = 2's w_M crosses 1/2 at step 20, between its checkpoints 10 and 33
    two = next(c for c in cells.values() if c.D == 2)
    assert two.L_G > two.L_M  # M has the lower in-distribution loss at D = 2, so there is a transition
    gamma = math.log(2) * (two.K_M**beta - two.K_G**beta) / (20 ** (1 - alpha) * (two.L_G - two.L_M))
    for path, cell in cells.items():
        metrics = load_metrics(path)
        split = metrics["splits"]["id"]
        split["fit_predictions"] = torch.from_numpy(normative.predict(cell, alpha, beta, gamma, "categorical")).half()
        split["scalars"]["w_M"] = memorizing_weight(cell, alpha, beta, gamma)
        save_metrics(path, metrics)
    cli("normscale.collate", cache)
    result = cli("normscale.analysis", cache)
    out = experiment(cache) / "analysis"
    assert f"figures and summary.json in {out}" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    for name in ("w_M_heatmap.png", "w_M_curves.png", "transience.png", "final_loss_vs_D.png",
                 "predicted_vs_observed.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert name in summary["figures"]
    fit = summary["fit"]
    assert fit["n_fit_cells"] == 8 and fit["n_held_out_cells"] == 2  # steps 0 .. 69 of both D fitted, 120 held out
    # 5%: T is stored in float16 (relative rounding 2^-11), and alpha and gamma trade off over D = 2's three
    # checkpoints that are neither step 0 nor saturated (about 1% and 3% off here); N*(2) is better determined
    np.testing.assert_allclose([fit["alpha"], fit["beta"], fit["gamma"]], [alpha, beta, gamma], rtol=0.05)
    assert fit["transition_steps"]["2"] == pytest.approx(20, rel=0.01)
    assert fit["pearson_r_all"] > 0.999  # w_M ranges over 0.02 .. 1 at D = 2 and is ~0 at D = 64
    assert summary["complexity_bits"]["64"]["memorizing"] > summary["complexity_bits"]["2"]["memorizing"]
    assert summary["fitted_checkpoints"]["2"] == {"runs": 1, "fit": {"cells": 4, "steps": [0, 69]},
                                                  "held_out": {"cells": 1, "steps": [120, 120]}}
    assert "single run" in summary["fit_uncertainty"]["unavailable"]  # one seed per D: nothing to resample
    check_page(out)


def test_analysis_leaves_out_checkpoints_evaluated_only_per_task(trained, tmp_path):
    cache = copy_experiment(trained, tmp_path)
    cli("normscale.eval", cache)
    run = trained_runs(cache)[0]
    shutil.copytree(run / "checkpoint-120", run / "checkpoint-500")  # a new checkpoint, evaluated per task only
    (run / "checkpoint-500" / "metrics.pt").unlink()
    cli("normscale.eval", cache, "eval_kwargs.mode=single_task")
    cli("normscale.collate", cache)
    result = cli("normscale.analysis", cache)
    assert "leaving out 1 checkpoint(s) evaluated only in single_task mode" in result.stdout
    summary = json.loads((experiment(cache) / "analysis" / "summary.json").read_text())
    assert summary["fit"]["n_fit_cells"] + summary["fit"]["n_held_out_cells"] == 10
    for run_name, step in summary["transition_steps"]["observed"].items():
        sequences = summary["transition_sequences"]["observed"][run_name]
        assert sequences == (None if step is None else 16 * step)
    assert set(summary["transition_sequences"]["predicted"]) == {"2", "64"}
    assert summary["fit"]["checkpoints"] == {"fit_from": "all", "n_cells": 10, "n_cells_total": 10}

    result = cli("normscale.analysis", cache, "fit_from=interpolation_threshold")
    fit = json.loads((experiment(cache) / "analysis" / "summary.json").read_text())["fit"]
    (group, cutoff), = fit["checkpoints"]["cutoff_step"].items()
    assert group.startswith("mlp_expansion_factor=4.0,num_dims=4,")
    n_cells = fit["checkpoints"]["n_cells"]
    assert n_cells == fit["n_fit_cells"] + fit["n_held_out_cells"] and fit["checkpoints"]["n_cells_total"] == 10
    assert n_cells == sum(step >= cutoff for step in [0, 10, 33, 69, 120] for _ in (2, 64))
    assert f"on {n_cells} of 10 cells past the interpolation threshold" in result.stdout


def test_analysis_without_bayes_results_says_what_to_run(trained, tmp_path):
    cache = copy_experiment(trained, tmp_path)
    shutil.rmtree(experiment(cache) / "runs" / "bayes-generalizing")
    cli("normscale.eval", cache)
    cli("normscale.collate", cache)
    result = cli("normscale.analysis", cache, ok=False)
    assert result.returncode == 2 and "model=bayes model_kwargs.kind=memorizing,generalizing" in result.stderr
