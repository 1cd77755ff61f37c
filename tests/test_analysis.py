"""SPEC C's summary quantities computed by the analysis (the observed transition step and the threshold D*) and what
its figures draw."""
import math
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pytest

from normscale.analysis import figures
from normscale.analysis.normative import Cell, FitResult
from normscale.analysis.report import (checkpoints_to_fit, fit_line, observed_transition_step,
                                       task_diversity_threshold)
from normscale.config import NormscaleError


def test_transition_step_is_the_first_checkpoint_after_which_w_m_stays_above_half():
    steps = [0, 20, 58, 115, 193, 291]
    # an untrained model sits near 0.5: the checkpoint closest to 0.5 (step 0) is not the transition
    assert observed_transition_step(steps, [0.49, 0.2, 0.6, 0.4, 0.7, 0.9]) == 193
    assert observed_transition_step(steps, [0.51, 0.6, 0.7, 0.8, 0.9, 0.95]) == 0
    assert observed_transition_step(steps, [0.5, 0.2, 0.6, 0.7, 0.8, 0.4]) is None  # ends below: never stays above
    assert observed_transition_step(steps, [0.1] * 6) is None


def test_task_diversity_threshold_interpolates_in_log2_d():
    assert task_diversity_threshold([4, 16, 64], [0.9, 0.7, 0.3]) == pytest.approx(2 ** 5)  # halfway 16 -> 64
    assert task_diversity_threshold([4, 16], [0.9, 0.5]) is None  # never falls below 0.5
    assert task_diversity_threshold([4, 16, 64], [0.2, 0.1, 0.0]) is None


def drawn(line) -> tuple[list, list]:
    return list(line.get_xdata()), list(line.get_ydata())


def test_w_m_curves_draw_every_run_per_split_coloured_and_labelled_by_d():
    by_d = {64: [{"steps": [0, 10, 40], "w_M": {"id": [0.5, 0.3, 0.1], "ood": [0.5, 0.2, 0.0]}},
                 {"steps": [0, 10, 40], "w_M": {"id": [0.4, 0.3, 0.2], "ood": [0.4, 0.1, 0.1]}}],
            2: [{"steps": [0, 20], "w_M": {"id": [0.5, 0.9], "ood": [0.5, 0.6]}}]}
    fig = figures.w_m_curves(by_d)
    runs = [run for D in (2, 64) for run in by_d[D]]
    for ax, split in zip(fig.axes, ("id", "ood")):
        *curves, half = ax.lines  # one line per run, D ascending, then the w_M = 0.5 guide
        assert [drawn(line) for line in curves] == [(run["steps"], run["w_M"][split]) for run in runs]
        assert drawn(half)[1] == [0.5, 0.5]
        colours = [line.get_color() for line in curves]
        assert colours[1] == colours[2] != colours[0]
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["D=2", "D=64"]
    plt.close(fig)


def test_loss_against_width_draws_the_seed_mean_per_d(tmp_path):
    runs = [{"D": D, "hidden_size": h, "loss": {"id": [1.0, 0.1 * D / h + noise]}}
            for D in (64, 4) for h in (256, 64, 128) for noise in (-0.01, 0.01)]  # two seeds per (D, width)
    fig = figures.loss_vs_width(runs, "kl")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["D=4", "D=64"]
    for line, D in zip(ax.lines, (4, 64)):
        x, y = drawn(line)
        assert x == [64, 128, 256] and y == pytest.approx([0.1 * D / h for h in x])
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "kl"
    path = figures.save(fig, tmp_path / "loss_vs_width.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_to_fit_keep_the_steps_past_each_groups_interpolation_threshold():
    rng = np.random.default_rng(0)
    M, G, noise = rng.normal(size=(3, 16, 8))
    steps = [0, 100, 200, 300, 400, 500]
    amplitude = {  # (group, D) -> how far T is from the M-G line at each step: the threshold falls at a known step
        ((4.0, 8, 64), 4): [3, 2, 0.5, 0.1, 0.1, 0.1],  # first below at step 200 (0.5^2 << 0.2 x 3^2)
        ((4.0, 8, 64), 64): [3, 3, 2, 2, 0.5, 0.1],  # step 400: the group's cut-off
        ((1.0, 8, 64), 4): [3, 0.5, 0.1, 0.1, 0.1, 0.1],  # step 100
    }
    cells, groups = [], []
    for (group, D), amplitudes in amplitude.items():
        for step, a in zip(steps, amplitudes):
            cells.append(Cell(D=D, step=step, T=0.5 * (M + G) + a * noise, M=M, G=G, K_M=2e3, K_G=1e3, L_M=0.1,
                              L_G=0.2))
            groups.append(group)
    assert checkpoints_to_fit("all", cells, groups, "regression") == (
        cells, {"fit_from": "all", "n_cells": 18, "n_cells_total": 18})
    used, record = checkpoints_to_fit("interpolation_threshold", cells, groups, "regression")
    used_ids = {id(c) for c in used}
    assert [(g, c.D, c.step) for c, g in zip(cells, groups) if id(c) in used_ids] == (
        [((4.0, 8, 64), D, s) for D in (4, 64) for s in (400, 500)] + [((1.0, 8, 64), 4, s) for s in steps[1:]])
    assert record == {"fit_from": "interpolation_threshold", "threshold_fraction": 0.1,
                      "cutoff_step": {"mlp_expansion_factor=4.0,num_dims=8,context_length=64": 400,
                                      "mlp_expansion_factor=1.0,num_dims=8,context_length=64": 100},
                      "n_cells": 9, "n_cells_total": 18}
    flat = [replace(c, T=0.5 * (M + G) + noise) for c in cells]  # no checkpoint falls below its threshold
    with pytest.raises(NormscaleError, match="no checkpoint to fit"):
        checkpoints_to_fit("interpolation_threshold", flat, groups, "regression")


def test_fit_line_states_flags_and_why_the_held_out_r_is_undefined():
    result = FitResult(setting="classification", alpha=0.7, beta=0.3, gamma=2.0, fit_loss=1e-3,
                       held_out_loss=math.nan, pearson_r_held_out=math.nan, pearson_r_all=0.9, n_fit_cells=10,
                       n_held_out_cells=0, converged=True, message="", transition_steps={},
                       flags=["beta at its bound 2"], undefined={"pearson_r_held_out": "no held-out cells"})
    line = fit_line(result, {"fit_from": "interpolation_threshold", "n_cells": 10, "n_cells_total": 30})
    assert line == ("normscale: fit alpha=0.700 beta=0.300 gamma=2 on 10 of 30 cells past the interpolation "
                    "threshold; held-out Pearson r(w_M) undefined: no held-out cells; FLAGS: beta at its bound 2")
    clean = replace(result, pearson_r_held_out=0.95, flags=[], undefined={})
    assert fit_line(clean, {"fit_from": "all"}) == (
        "normscale: fit alpha=0.700 beta=0.300 gamma=2; held-out Pearson r(w_M) 0.950")


def test_predicted_against_observed_titles_an_undefined_r_with_its_reason():
    result = FitResult(setting="balls_and_urns", alpha=0.7, beta=0.3, gamma=2.0, fit_loss=1e-3, held_out_loss=0.1,
                       pearson_r_held_out=math.nan, pearson_r_all=0.9, n_fit_cells=1, n_held_out_cells=1,
                       converged=True, message="", transition_steps={},
                       undefined={"pearson_r_held_out": "the held-out cells' observed w_M are constant (0.25)"})
    cells = [Cell(D=4, step=s, T=np.zeros((1, 2)), M=np.zeros((1, 2)), G=np.zeros((1, 2)), K_M=2.0, K_G=1.0, L_M=0.1,
                  L_G=0.2, observed_w_M=0.25) for s in (10, 20)]
    fig = figures.predicted_vs_observed(cells, [0.2, 0.3], {id(cells[0])}, result)
    assert fig.axes[0].get_title() == ("Pearson r: all 0.900, held-out undefined (the held-out cells' observed w_M "
                                       "are constant (0.25))")
    plt.close(fig)
