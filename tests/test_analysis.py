"""SPEC C's summary quantities computed by the analysis: the observed transition step and the threshold D*."""
import pytest

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


def test_loss_against_width_is_drawn_per_d(tmp_path):
    from normscale.analysis import figures

    runs = [{"D": D, "hidden_size": h, "loss": {"id": [1.0, 0.1 * D / h]}} for D in (4, 64) for h in (64, 128, 256)]
    path = figures.loss_vs_width(tmp_path / "loss_vs_width.png", runs, "kl")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
