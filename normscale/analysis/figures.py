"""The standard figures of an experiment (matplotlib's Agg backend); each function draws one and returns its Figure,
which `save` writes as PNG. Inputs are what normscale.analysis.report assembles from the collated metrics.h5."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from normscale.fileio import atomic_path  # noqa: E402

STRATEGY_STYLE = {"memorizing": ("M", "tab:red"), "generalizing": ("G", "tab:blue")}


def save(fig: Figure, path: Path) -> Path:
    """Write fig to path as PNG and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def _colours(Ds: list[int]):
    cmap = plt.get_cmap("viridis")
    return {D: cmap(i / max(1, len(Ds) - 1)) for i, D in enumerate(Ds)}


def w_m_heatmap(cells, predicted: list[float]) -> Figure:
    """Observed and predicted w_M over (sqrt step, log2 D); seeds of one (D, step) averaged."""
    observed, model = defaultdict(list), defaultdict(list)
    for cell, p in zip(cells, predicted):
        observed[(cell.D, cell.step)].append(cell.observed_w_M)
        model[(cell.D, cell.step)].append(p)
    Ds = sorted({D for D, _ in observed})
    steps = sorted({s for _, s in observed})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, layout="constrained")
    for ax, values, title in ((axes[0], observed, "observed w_M (ID)"), (axes[1], model, "normative model w_M")):
        grid = np.full((len(Ds), len(steps)), np.nan)
        for (D, s), v in values.items():
            grid[Ds.index(D), steps.index(s)] = np.nanmean(v)
        x = np.sqrt(steps)
        image = ax.pcolormesh(x, np.log2(Ds), grid, vmin=0, vmax=1, cmap="coolwarm", shading="nearest")
        ax.set(title=title, xlabel="sqrt(training steps)")
    axes[0].set_ylabel("log2 D (number of training tasks)")
    fig.colorbar(image, ax=axes, label="w_M (1: memorizing M, 0: generalizing G)")
    return fig


def w_m_curves(by_d: dict[int, list[dict]]) -> Figure:
    """Observed w_M against steps for every run, coloured by D; ID and OOD side by side."""
    colours = _colours(sorted(by_d))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, layout="constrained")
    for ax, split in zip(axes, ("id", "ood")):
        for D, runs in sorted(by_d.items()):
            for i, run in enumerate(runs):
                ax.plot(run["steps"], run["w_M"][split], color=colours[D], marker=".", label=f"D={D}" if i == 0 else None)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(title=f"w_M, {split.upper()} sequences", xlabel="training steps", xscale="symlog", xlim=(0, None), ylim=(-0.05, 1.05))
    axes[0].set_ylabel("w_M (1: M, 0: G)")
    axes[1].legend(fontsize=8)
    return fig


def transience(by_d: dict[int, list[dict]], references: dict, metric: str) -> Figure:
    """OOD task loss against steps per D, with the Bayes predictors' OOD levels as dashed lines of the same colour."""
    colours = _colours(sorted(by_d))
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    for D, runs in sorted(by_d.items()):
        for i, run in enumerate(runs):
            ax.plot(run["steps"], run["loss"]["ood"], color=colours[D], marker=".", label=f"D={D}" if i == 0 else None)
        for kind, (short, _) in STRATEGY_STYLE.items():
            ax.axhline(references[D][kind]["ood"], color=colours[D], lw=0.8, ls="--" if short == "M" else ":")
    ax.set(title=f"Transience: OOD {metric} (dashed: M, dotted: G)", xlabel="training steps", ylabel=f"OOD {metric}",
           xscale="symlog", xlim=(0, None))
    ax.legend(fontsize=8)
    return fig


def final_loss_vs_d(by_d: dict[int, list[dict]], references: dict, metric: str) -> Figure:
    """Final-checkpoint task loss against D (ID and OOD), with the M and G predictors' losses on the same data."""
    Ds = sorted(by_d)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, split in zip(axes, ("id", "ood")):
        for D in Ds:
            ax.scatter([D] * len(by_d[D]), [r["loss"][split][-1] for r in by_d[D]], color="black", s=14)
        ax.plot(Ds, [np.mean([r["loss"][split][-1] for r in by_d[D]]) for D in Ds], color="black", label="model")
        for kind, (short, colour) in STRATEGY_STYLE.items():
            ax.plot(Ds, [references[D][kind][split] for D in Ds], color=colour, ls="--", label=short)
        ax.set(title=f"final {split.upper()} {metric}", xlabel="D (number of training tasks)", ylabel=metric, xscale="log")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    return fig


def predicted_vs_observed(cells, predicted: list[float], fitted: set[int], result) -> Figure:
    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
    observed = np.array([c.observed_w_M for c in cells])
    predicted = np.asarray(predicted)
    mask = np.array([id(c) in fitted for c in cells])
    ax.scatter(observed[mask], predicted[mask], s=12, color="tab:blue", label="fitted cells")
    ax.scatter(observed[~mask], predicted[~mask], s=16, color="tab:orange", marker="^", label="held-out cells")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), xlabel="observed w_M (ID)", ylabel="predicted w_M",
           title=f"Pearson r: all {pearson(result, 'pearson_r_all')}, held-out {pearson(result, 'pearson_r_held_out')}")
    ax.legend(fontsize=8)
    return fig


def pearson(result, field: str) -> str:
    """A Pearson r of the fit, or why it is undefined (normative.FitResult.undefined)."""
    value = getattr(result, field)
    return f"undefined ({result.undefined[field]})" if np.isnan(value) else f"{value:.3f}"


def loss_vs_width(runs: list[dict], metric: str) -> Figure:
    """Final ID task loss against hidden size, one line per D."""
    by_d = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_d[run["D"]][run["hidden_size"]].append(run["loss"]["id"][-1])
    colours = _colours(sorted(by_d))
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    for D, widths in sorted(by_d.items()):
        xs = sorted(widths)
        ax.plot(xs, [np.mean(widths[x]) for x in xs], marker="o", color=colours[D], label=f"D={D}")
    ax.set(title=f"final ID {metric} against width", xlabel="hidden size", ylabel=metric)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    return fig
