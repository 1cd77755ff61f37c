"""The uncertainty of the normative fit: a bootstrap over runs, stratified by D.

A resample draws, for every D, as many of that D's runs as it has, with replacement, and keeps all cells
(checkpoints) of every drawn run: the checkpoints of one run share its training noise, so they stay together. Each
resample is refitted with `normative.fit`, warm-started from the point estimate (one start: the estimate's
multi-start has already found the basin). Reported per parameter (alpha, beta,
gamma, and N*(D) for every D from the refitted parameters and the experiment's K_s(D), L_s(D)): the 2.5 and 97.5
percentiles and the standard deviation over resamples (the bootstrap standard error).

Resampling within each D keeps every D in every resample, so the fit/held-out split (`normative.split_cells`, which
takes the smallest 80% of the D values present) is the same as the estimate's. Resampling the runs of all D together
would drop D values from many resamples (21 of the 27 possible with three runs, one per D), changing which D are fitted
and leaving fits that are poorly determined and slow (tens of seconds each on the demo). The spread therefore comes
from the D with more than one run (seeds); when every D has a single run there is nothing to resample, and the
intervals are reported as unavailable rather than as zero width.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from normscale.analysis import normative

DEFAULT_RESAMPLES = 24
DEFAULT_SEED = 0
PERCENTILES = (2.5, 97.5)
PARAMETERS = ("alpha", "beta", "gamma")


def runs_by_D(cells: Sequence[normative.Cell], run_of_cell: Sequence[str]) -> dict[int, list[str]]:
    """{D: its runs, sorted}; a run must hold cells of one D."""
    by_D: dict[int, set[str]] = {}
    for cell, run in zip(cells, run_of_cell):
        by_D.setdefault(cell.D, set()).add(run)
    runs = [run for group in by_D.values() for run in group]
    if len(runs) != len(set(runs)):
        raise ValueError("a run holds cells of more than one D")
    return {D: sorted(by_D[D]) for D in sorted(by_D)}


def resample_runs(cells: Sequence[normative.Cell], run_of_cell: Sequence[str], rng: np.random.Generator) -> list[int]:
    """Indices of the cells of one resample: for each D (ascending), as many of its runs as it has, drawn with
    replacement, each contributing all its cells (a run drawn k times contributes them k times), in the order drawn."""
    cells_of = {run: [i for i, r in enumerate(run_of_cell) if r == run] for run in set(run_of_cell)}
    return [i for runs in runs_by_D(cells, run_of_cell).values()
            for k in rng.integers(len(runs), size=len(runs)) for i in cells_of[runs[k]]]


def over_runs(cells: Sequence[normative.Cell], run_of_cell: Sequence[str], setting: str,
              estimate: normative.FitResult, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict:
    """Bootstrap intervals of the fit `estimate` of `cells` (run_of_cell[i]: the run of cells[i]); a JSON-ready dict
    (NaN and infinite N* as None). "unavailable" says why there are no intervals (None when there are)."""
    if len(cells) != len(run_of_cell):
        raise ValueError(f"{len(cells)} cells but {len(run_of_cell)} run names")
    if resamples < 2:
        raise ValueError(f"need at least 2 resamples; got {resamples}")
    grouped = runs_by_D(cells, run_of_cell)
    report = {
        "method": "bootstrap over runs, stratified by D (all checkpoints of a drawn run together), refits "
                  "warm-started from the point estimate",
        "resamples": resamples, "seed": seed, "runs_per_D": {str(D): len(runs) for D, runs in grouped.items()},
        "percentiles": list(PERCENTILES)}
    if all(len(runs) == 1 for runs in grouped.values()):
        return {**report, "unavailable": "every D has a single run (seed): there is nothing to resample; train more "
                                         "seeds per D for intervals"}
    per_D = {c.D: (c.K_M, c.K_G, c.L_M, c.L_G) for c in cells}
    init = (estimate.beta, estimate.alpha, estimate.gamma)
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in PARAMETERS}
    transition = {D: [] for D in sorted(per_D)}
    not_converged = 0
    for _ in range(resamples):
        refit = normative.fit([cells[i] for i in resample_runs(cells, run_of_cell, rng)], setting, init=init,
                              num_starts=1)
        not_converged += not refit.converged
        for name in PARAMETERS:
            draws[name].append(getattr(refit, name))
        for D, constants in per_D.items():
            transition[D].append(normative.transition_step(*constants, refit.alpha, refit.beta, refit.gamma))
    return {
        **report, "unavailable": None, "not_converged": not_converged,
        "parameters": {name: interval(getattr(estimate, name), draws[name]) for name in PARAMETERS},
        "transition_steps": {str(D): interval(estimate.transition_steps[D], values)
                             for D, values in transition.items()},
    }


def interval(estimate: float, draws: list[float]) -> dict:
    """The estimate, the PERCENTILES of the draws and their standard deviation; None for what is undefined (N* is NaN
    without a transition, inf beyond float64: such draws make the upper percentile, or all, undefined)."""
    values = np.asarray(draws, np.float64)
    if np.isnan(values).any():
        low = high = se = None
    else:
        low, high = (finite_or_none(float(p)) for p in np.percentile(values, PERCENTILES))
        se = finite_or_none(float(np.std(values, ddof=1)))
    return {"estimate": finite_or_none(estimate), "low": low, "high": high, "standard_error": se}


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
