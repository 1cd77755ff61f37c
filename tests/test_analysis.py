"""SPEC C's summary quantities computed by the analysis (the observed transition step and the threshold D*) and what
its figures draw."""
import matplotlib.pyplot as plt
import pytest

from normscale.analysis import figures
from normscale.analysis.report import observed_transition_step, task_diversity_threshold


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
