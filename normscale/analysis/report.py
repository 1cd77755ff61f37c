"""`python -m normscale.analysis <overrides>`: the normative fit and the standard figures of an experiment, from
its collated metrics.h5 alone (run `python -m normscale.collate` first).

Writes to <experiment>/analysis/: summary.json (the fit, its held-out quality, predicted and observed transition
steps, D*, final w_M per D, the fit's bootstrap intervals (fit_uncertainty: analysis/bootstrap.py) and which
checkpoints were fitted (fitted_checkpoints)), report.html (the page to read: all of it with the figures embedded,
self-contained: analysis/page.py) and the figures as PNG:
  w_M_heatmap.png          observed and predicted w_M (ID) over (sqrt steps, log2 D), seeds averaged
  w_M_curves.png           observed w_M (ID and OOD) against steps, one line per D
  transience.png           OOD task loss against steps per D, with M's and G's levels
  final_loss_vs_D.png      final-checkpoint ID and OOD task loss against D, with M and G reference lines
  predicted_vs_observed.png  predicted against observed w_M (ID), fitted and held-out cells apart
  loss_vs_width.png        final ID task loss against hidden size (only when the experiment varies it)
Cells of the fit are (run, checkpoint) pairs of the trained models, on the ID split's fit subset, with M's and G's
predictions on the same sequences from the Bayes rows of the run's dataset (`python -m normscale.eval
model=bayes model_kwargs.kind=memorizing,generalizing -m`). L_s(D) is the median-of-means strategy loss of the
Bayes rows, averaged over the datasets (seeds) with that D; K_s(D) is normative.complexity_bits. fit_from=all (the
default) fits every cell; fit_from=interpolation_threshold only those past RI's interpolation threshold
(`checkpoints_to_fit`), recorded in summary.json's fit.checkpoints.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np

from normscale import settings
from normscale.analysis import bootstrap, figures, normative, page
from normscale.collate import read_results
from normscale.config import Config, NormscaleError
from normscale.fileio import write_json
from normscale.layout import analysis_dir, collated_file, experiment_dir

def observed_transition_step(steps: list[int], w_m: list[float]) -> int | None:
    """SPEC C: the first checkpoint after which w_M stays above 0.5 (None when the last one is not above it)."""
    above = [w > 0.5 for w in w_m]
    if not above or not above[-1]:
        return None
    first = len(above)
    while first > 0 and above[first - 1]:
        first -= 1
    return steps[first]


def task_diversity_threshold(num_tasks: list[int], final_w_m: list[float]) -> float | None:
    """SPEC C: the D at which final-checkpoint w_M crosses 0.5 (falling with D), interpolated in log2 D."""
    x, y = np.log2(num_tasks), np.asarray(final_w_m)
    for i in range(len(x) - 1):
        if y[i] >= 0.5 > y[i + 1]:
            return float(2 ** (x[i] + (y[i] - 0.5) / (y[i] - y[i + 1]) * (x[i + 1] - x[i])))
    return None


def load_frame(config: Config):
    path = collated_file(experiment_dir(config))
    if not path.exists():
        raise NormscaleError(f"{path} does not exist: run `python -m normscale.collate` with the experiment's "
                             "overrides first")
    frame = read_results(path)
    standard = frame["metrics"].map(lambda m: "id" in m)  # rows with standard-mode results (not single_task only)
    checkpoints = frame["checkpoint"].notna()
    if not (checkpoints & standard).any():
        raise NormscaleError(f"{path} holds no checkpoints evaluated in standard mode: run `python -m normscale.eval` "
                             "(eval_kwargs.mode=standard, the default) with the experiment's overrides, then collate")
    skipped = frame[checkpoints & ~standard]
    if not skipped.empty:
        print(f"normscale: leaving out {len(skipped)} checkpoint(s) evaluated only in single_task mode (e.g. "
              f"{skipped['run'].iloc[0]} step {skipped['checkpoint'].iloc[0]}); `python -m normscale.eval` and "
              "collate again to include them")
    return path, frame[standard], frame[checkpoints & standard]


def bayes_rows(frame, path: Path) -> dict[tuple[str, str], dict]:
    """{(data_dir, kind): {"metrics", "h5_group"}} of the Bayes predictors' rows."""
    rows = {}
    for _, row in frame[frame["model"] == "bayes"].iterrows():
        rows[(row["data_dir"], row["kind"])] = {"metrics": row["metrics"], "h5_group": row["h5_group"]}
    return rows


def analyze(config: Config) -> Path:
    path, frame, trained = load_frame(config)
    setting = config.setting
    bayes = bayes_rows(frame, path)
    missing = sorted({d for d in trained["data_dir"] for kind in normative.STRATEGIES if (d, kind) not in bayes})
    if missing:
        raise NormscaleError(
            f"no Bayes results for dataset(s) {', '.join(missing)} in {path}: run `python -m normscale.eval -m "
            f"name={config.name} setting={setting} model=bayes model_kwargs.kind=memorizing,generalizing`, then "
            "collate again")
    out = analysis_dir(experiment_dir(config))
    metric = settings.facts(setting).report_metric

    strategy_losses = defaultdict(lambda: defaultdict(list))  # D -> kind -> [L_s per dataset]
    for (data_dir, kind), row in bayes.items():
        D = int(trained[trained["data_dir"] == data_dir]["config"].iloc[0].task_kwargs.num_tasks) \
            if (trained["data_dir"] == data_dir).any() else None
        if D is not None and kind in normative.STRATEGIES:
            strategy_losses[D][kind].append(row["metrics"]["strategy_loss"]["median_of_means"])
    L = {D: {kind: float(np.mean(v)) for kind, v in kinds.items()} for D, kinds in strategy_losses.items()}

    cells, groups = [], []  # groups: RI's interpolation-threshold group of each cell's run
    with h5py.File(path, "r") as f:
        reference = {key: f[row["h5_group"]]["standard/id/fit_predictions"][()] for key, row in bayes.items()}
        for _, row in trained.iterrows():
            task = row["config"].task_kwargs
            D = task.num_tasks
            K = {kind: normative.complexity_bits(setting, kind, D, task.num_dims, task.prior == "uniform")
                 for kind in normative.STRATEGIES}
            cells.append(normative.Cell(
                D=D, step=int(row["checkpoint"]), T=f[row["h5_group"]]["standard/id/fit_predictions"][()],
                M=reference[(row["data_dir"], "memorizing")], G=reference[(row["data_dir"], "generalizing")],
                K_M=K["memorizing"], K_G=K["generalizing"], L_M=L[D]["memorizing"], L_G=L[D]["generalizing"],
                observed_w_M=row["metrics"]["id"]["w_M"]))
            groups.append((row["config"].model_kwargs.mlp_expansion_factor, task.num_dims, task.context_length))
    shapes = {c.T.shape for c in cells} | {c.M.shape for c in cells}
    if len(shapes) > 1:
        raise NormscaleError(f"the fit subsets in {path} differ in shape ({sorted(shapes)}): the checkpoints and the "
                             "Bayes predictors were evaluated with different eval_kwargs.fit_size; evaluate them again "
                             "with one value (overwrite=true), then collate")
    used, checkpoints = checkpoints_to_fit(config.fit_from, cells, groups, settings.facts(setting).output)
    result = normative.fit(used, setting)
    fitted = {id(c) for c in normative.split_cells(used)[0]}
    predicted = [float(normative.memorizing_weight(c.step, c.K_M, c.K_G, c.L_M, c.L_G, result.alpha, result.beta,
                                                   result.gamma)) for c in cells]
    is_used = {id(c) for c in used}

    runs = []
    for run, group in trained.groupby("run", sort=True):
        group = group.sort_values("checkpoint")
        steps = [int(s) for s in group["checkpoint"]]
        config_row = group["config"].iloc[0]
        runs.append({"run": run, "config": config_row, "D": config_row.task_kwargs.num_tasks, "seed": config_row.seed,
                     "hidden_size": config_row.model_kwargs.hidden_size, "steps": steps,
                     "batch_size": config_row.training_kwargs.batch_size,
                     "data_dir": group["data_dir"].iloc[0],
                     "w_M": {s: [m[s]["w_M"] for m in group["metrics"]] for s in ("id", "ood")},
                     "loss": {s: [m[s][metric] for m in group["metrics"]] for s in ("id", "ood")},
                     "transition_step": observed_transition_step(steps, [m["id"]["w_M"] for m in group["metrics"]])})
    by_D = defaultdict(list)
    for r in runs:
        by_D[r["D"]].append(r)
    Ds = sorted(by_D)
    final_w_m = {D: float(np.nanmean([r["w_M"]["id"][-1] for r in by_D[D]])) for D in Ds}
    final_w_m_ood = {D: float(np.nanmean([r["w_M"]["ood"][-1] for r in by_D[D]])) for D in Ds}
    references = {D: {kind: {s: float(np.mean([bayes[(r["data_dir"], kind)]["metrics"][s][metric] for r in by_D[D]]))
                             for s in ("id", "ood")} for kind in normative.STRATEGIES} for D in Ds}

    drawn = {
        "w_M_heatmap.png": figures.w_m_heatmap(cells, predicted),
        "w_M_curves.png": figures.w_m_curves(by_D),
        "transience.png": figures.transience(by_D, references, metric),
        "final_loss_vs_D.png": figures.final_loss_vs_d(by_D, references, metric),
        "predicted_vs_observed.png": figures.predicted_vs_observed(
            used, [w for c, w in zip(cells, predicted) if id(c) in is_used], fitted, result),
    }
    widths = sorted({r["hidden_size"] for r in runs})
    if len(widths) > 1:
        drawn["loss_vs_width.png"] = figures.loss_vs_width(runs, metric)
    out.mkdir(parents=True, exist_ok=True)
    written = [figures.save(fig, out / name) for name, fig in drawn.items()]

    summary = {
        "experiment": config.name, "setting": setting, "metrics_file": str(path),
        "fit": result.to_json_dict() | {"checkpoints": checkpoints},
        "complexity_bits": {str(c.D): {"memorizing": c.K_M, "generalizing": c.K_G} for c in cells},
        "strategy_loss": {str(D): L[D] for D in Ds},
        "final_w_M": {"id": {str(D): nan_to_none(final_w_m[D]) for D in Ds},
                      "ood": {str(D): nan_to_none(final_w_m_ood[D]) for D in Ds}},
        "task_diversity_threshold_D*": task_diversity_threshold(Ds, [final_w_m[D] for D in Ds]),
        "transition_steps": {"predicted": result.to_json_dict()["transition_steps"],
                             "observed": {r["run"]: r["transition_step"] for r in runs}},
        "transition_sequences": {  # the same in sequences seen (steps x global batch size)
            "predicted": {str(D): sequences(result.transition_steps[D], {r["batch_size"] for r in by_D[D]})
                          for D in Ds},
            "observed": {r["run"]: None if r["transition_step"] is None else r["transition_step"] * r["batch_size"]
                         for r in runs}},
        "figures": [p.name for p in written],
        "widths": widths if len(widths) > 1 else f"not plotted: one hidden size ({widths[0]}) in this experiment",
    }
    run_of = dict(zip(map(id, cells), trained["run"]))  # one cell per row of trained, in order
    runs_of_used = [run_of[id(c)] for c in used]
    summary["fit_uncertainty"] = bootstrap.over_runs(used, runs_of_used, setting, result)
    summary["fitted_checkpoints"] = checkpoint_split(used, runs_of_used, fitted)
    write_json(out / "summary.json", summary)
    report = page.write(summary, out)
    print(fit_line(result, checkpoints) + "; final w_M (ID) by D: " + ", ".join(f"D={D} {final_w_m[D]:.2f}" for D in Ds))
    print(f"normscale: figures and summary.json in {out}")
    print(f"normscale: the report to read: {report}")
    return out


def checkpoints_to_fit(fit_from: str, cells: list, groups: list[tuple], output: str) -> tuple[list, dict]:
    """The cells the fit uses and summary.json's record of them. fit_from=all: every cell. interpolation_threshold:
    RI's filter (normative.interpolation_cutoffs) with groups (mlp_expansion_factor, num_dims, context_length), the
    interpolation distance of each cell's ID fit subset and RI's fraction (0.1 regression, 0.2 categorical)."""
    if fit_from == "all":
        return cells, {"fit_from": "all", "n_cells": len(cells), "n_cells_total": len(cells)}
    fraction = normative.INTERPOLATION_FRACTION[output]
    distances = [normative.interpolation_distance(c, output) for c in cells]
    cutoffs = normative.interpolation_cutoffs(groups, [c.D for c in cells], [c.step for c in cells], distances,
                                              fraction)
    used = [c for c, group in zip(cells, groups) if c.step >= cutoffs[group]]
    names = ("mlp_expansion_factor", "num_dims", "context_length")
    cutoff_steps = {",".join(f"{n}={v}" for n, v in zip(names, group)): None if math.isinf(step) else int(step)
                    for group, step in cutoffs.items()}
    if not used:
        raise NormscaleError(f"fit_from=interpolation_threshold leaves no checkpoint to fit: no run's interpolation "
                             f"distance falls below its threshold (cut-off steps {cutoff_steps}); use fit_from=all")
    return used, {"fit_from": fit_from, "threshold_fraction": fraction, "cutoff_step": cutoff_steps,
                  "n_cells": len(used), "n_cells_total": len(cells)}


def fit_line(result: normative.FitResult, checkpoints: dict) -> str:
    """The printed summary of a fit: parameters, held-out Pearson r (or why it is undefined), flags."""
    if math.isnan(result.pearson_r_held_out):
        r = f"held-out Pearson r(w_M) undefined: {result.undefined['pearson_r_held_out']}"
    else:
        r = f"held-out Pearson r(w_M) {result.pearson_r_held_out:.3f}"
    used = "" if checkpoints["fit_from"] == "all" else (
        f" on {checkpoints['n_cells']} of {checkpoints['n_cells_total']} cells past the interpolation threshold")
    flags = f"; FLAGS: {'; '.join(result.flags)}" if result.flags else ""
    return (f"normscale: fit alpha={result.alpha:.3f} beta={result.beta:.3f} gamma={result.gamma:.3g}{used}; {r}"
            f"{flags}")


def checkpoint_split(cells: list[normative.Cell], run_of_cell: list[str], fitted: set[int]) -> dict:
    """Per D: its number of runs and, of the fitted cells (ids in `fitted`: normative.split_cells) and the held-out
    ones, their number and first and last step (None when there are none)."""
    split = {}
    for D in sorted({c.D for c in cells}):
        of_D = [(c, run) for c, run in zip(cells, run_of_cell) if c.D == D]
        sides = {"fit": [c.step for c, _ in of_D if id(c) in fitted],
                 "held_out": [c.step for c, _ in of_D if id(c) not in fitted]}
        split[str(D)] = {"runs": len({run for _, run in of_D}),
                         **{side: {"cells": len(steps), "steps": [min(steps), max(steps)] if steps else None}
                            for side, steps in sides.items()}}
    return split


def sequences(steps: float, batch_sizes: set[int]) -> float | None | dict[str, float | None]:
    """N*(D) in sequences seen; per batch size when the runs at this D differ in it."""
    values = {b: steps * b if math.isfinite(steps) else None for b in sorted(batch_sizes)}
    return next(iter(values.values())) if len(values) == 1 else {f"batch_size={b}": v for b, v in values.items()}


def nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def main() -> None:
    from normscale.cli import hydra_main

    hydra_main(analyze)
