"""The bootstrap over runs (normscale/analysis/bootstrap.py) on synthetic runs of the normative model at known
parameters: what a resample holds, and that its intervals cover the truth and narrow with more runs."""
import math
from collections import Counter

import numpy as np
import pytest
from scipy.special import log_softmax

from normscale.analysis import bootstrap, normative

SETTING = "balls_and_urns"
ALPHA, BETA = 0.5, 0.6
NUM_TASKS = (2, 4, 8, 16, 32)
STEPS = (0, 20, 50, 100, 200, 400, 800)
CONCENTRATION = 200.0  # of the Dirichlet noise around the model's mixture: a run's T at one position


def constants(D: int) -> tuple[float, float, float, float]:
    """(K_M, K_G, L_M, L_G): K_M grows with D, M's loss advantage shrinks with D."""
    return 1056.0 + 64.0 * D, 1056.0, 0.07 * D / (D + 8), 0.07


def true_gamma() -> float:
    K_M, K_G, L_M, L_G = constants(4)
    return math.log(2) * (K_M**BETA - K_G**BETA) / (80 ** (1 - ALPHA) * (L_G - L_M))  # N*(4) = 80 steps


def synthetic_runs(runs_per_D: int, seed: int) -> tuple[list[normative.Cell], list[str]]:
    """Cells of runs_per_D runs per D: each checkpoint's T is a Dirichlet draw around the normative mixture at
    (ALPHA, BETA, true_gamma()) per position, so its expectation is the mixture and the fit is consistent."""
    rng = np.random.default_rng(seed)
    cells, run_of_cell = [], []
    for D in NUM_TASKS:
        K_M, K_G, L_M, L_G = constants(D)
        M, G = (log_softmax(2 * rng.normal(size=(6, 4, 3)), axis=-1) for _ in range(2))
        for run in range(runs_per_D):
            for step in STEPS:
                cell = normative.Cell(D=D, step=step, T=M, M=M, G=G, K_M=K_M, K_G=K_G, L_M=L_M, L_G=L_G)
                mixture = np.exp(normative.predict(cell, ALPHA, BETA, true_gamma(), "categorical"))
                drawn = np.array([[rng.dirichlet(CONCENTRATION * p) for p in row] for row in mixture])
                cell.T = np.log(np.maximum(drawn, 1e-12))
                cells.append(cell)
                run_of_cell.append(f"D={D},seed={run}")
    return cells, run_of_cell


def test_a_resample_draws_whole_runs_with_replacement_within_each_d():
    cells, run_of_cell = synthetic_runs(runs_per_D=3, seed=0)
    rng = np.random.default_rng(1)
    repeated = False
    for _ in range(20):
        drawn = Counter(run_of_cell[i] for i in bootstrap.resample_runs(cells, run_of_cell, rng))
        assert all(n % len(STEPS) == 0 for n in drawn.values())  # every drawn run with all its checkpoints
        per_D = Counter(cells[run_of_cell.index(run)].D for run in drawn.elements())
        assert per_D == {D: 3 * len(STEPS) for D in NUM_TASKS}  # each D keeps its number of runs
        repeated |= max(drawn.values()) > len(STEPS)
    assert repeated  # with replacement: some resample draws a run twice


def test_intervals_cover_the_true_parameters_and_narrow_with_more_runs():
    truth = {"alpha": ALPHA, "beta": BETA, "gamma": true_gamma()}
    widths, missed = {}, []
    for runs_per_D in (4, 16):
        log_widths = []
        for seed in range(3):
            cells, run_of_cell = synthetic_runs(runs_per_D, seed)
            estimate = normative.fit(cells, SETTING, init=(BETA, ALPHA, truth["gamma"]))
            result = bootstrap.over_runs(cells, run_of_cell, SETTING, estimate)
            assert result["unavailable"] is None and result["resamples"] == bootstrap.DEFAULT_RESAMPLES
            for name, stats in result["parameters"].items():
                if not stats["low"] <= truth[name] <= stats["high"]:
                    missed.append((runs_per_D, seed, name, stats))
                assert stats["low"] < stats["estimate"] < stats["high"] and stats["standard_error"] > 0
            log_widths.append([math.log(result["parameters"][name]["high"] / result["parameters"][name]["low"])
                               for name in truth])
        widths[runs_per_D] = np.mean(log_widths, axis=0)
    assert len(missed) <= 2, missed  # of 18 intervals at 95%, about one may miss
    # four times the runs: the intervals should narrow by about half
    assert np.all(widths[16] < 0.8 * widths[4]), widths


def test_the_same_seed_gives_the_same_intervals_and_n_star_intervals_hold_the_estimate():
    cells, run_of_cell = synthetic_runs(runs_per_D=3, seed=2)
    estimate = normative.fit(cells, SETTING, init=(BETA, ALPHA, true_gamma()))
    first = bootstrap.over_runs(cells, run_of_cell, SETTING, estimate, resamples=6, seed=5)
    assert first == bootstrap.over_runs(cells, run_of_cell, SETTING, estimate, resamples=6, seed=5)
    assert first != bootstrap.over_runs(cells, run_of_cell, SETTING, estimate, resamples=6, seed=6)
    assert first["runs_per_D"] == {str(D): 3 for D in NUM_TASKS}
    for D in NUM_TASKS:
        stats = first["transition_steps"][str(D)]
        assert stats["estimate"] == pytest.approx(estimate.transition_steps[D])
        assert stats["low"] < stats["high"]


def test_one_run_per_d_gives_no_intervals_and_says_why():
    cells, run_of_cell = synthetic_runs(runs_per_D=1, seed=0)
    estimate = normative.fit(cells, SETTING, init=(BETA, ALPHA, true_gamma()))
    result = bootstrap.over_runs(cells, run_of_cell, SETTING, estimate)
    assert "single run" in result["unavailable"] and "parameters" not in result
