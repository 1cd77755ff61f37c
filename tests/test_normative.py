"""The normative model (SPEC D): complexities, weights, transition steps, the 80/80 split and the fit's recovery of
known parameters from data the model itself generates."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.special import expit, log_softmax, logit, rel_entr

from normscale import settings
from normscale.analysis.normative import (NUM_STARTS, Cell, _fit_flags, _Objective, cell_loss, complexity_bits, fit,
                                          interpolation_cutoffs, interpolation_distance, memorizing_weight, predict,
                                          split_cells, transition_step)
from normscale.config import checkpoint_schedule

STEPS = np.unique(np.round(np.linspace(0, math.sqrt(1e5), 30) ** 2).astype(int))  # a sqrt-like grid, 0 .. 1e5
DS = [2**k for k in range(2, 11)]  # 4 .. 1024


def synthetic_cells(setting: str, alpha: float, beta: float, gamma: float, num_dims: int,
                    shape: tuple[int, ...], seed: int = 0) -> list[Cell]:
    """Cells whose model output T is exactly the normative prediction h at (alpha, beta, gamma); L_G - L_M is chosen
    per D so that N*(D) runs log-uniformly from 30 to 3e6 across the D values (transitions inside the step range for
    the smaller and middle D, none for the largest)."""
    rng = np.random.default_rng(seed)
    output = settings.facts(setting).output

    def outputs():
        x = rng.normal(size=shape) * 2
        return log_softmax(x, axis=-1) if output == "categorical" else x

    K_G = complexity_bits(setting, "generalizing", 1, num_dims)
    G = outputs()
    cells = []
    for D, n_star in zip(DS, np.geomspace(30, 3e6, len(DS))):
        K_M = complexity_bits(setting, "memorizing", D, num_dims)
        dL = math.log(2) * (K_M**beta - K_G**beta) / (gamma * n_star ** (1 - alpha))
        L_M = 0.5 + 0.1 * rng.random()
        M = outputs()
        for step in STEPS:
            cell = Cell(D=D, step=int(step), T=M, M=M, G=G, K_M=K_M, K_G=K_G, L_M=L_M, L_G=L_M + dL)
            w = float(memorizing_weight(step, K_M, K_G, L_M, L_M + dL, alpha, beta, gamma))
            cells.append(replace(cell, T=predict(cell, alpha, beta, gamma, output), observed_w_M=w))
    return cells


@pytest.mark.parametrize("setting, truth, num_dims, shape", [
    ("balls_and_urns", (0.75, 0.35, 0.3), 8, (16, 32, 8)),
    ("linear_regression", (0.5, 0.45, 0.05), 4, (16, 32)),
    ("classification", (0.6, 0.25, 0.5), 4, (64, 2)),
])
def test_fit_recovers_known_parameters(setting, truth, num_dims, shape):
    alpha, beta, gamma = truth
    cells = synthetic_cells(setting, alpha, beta, gamma, num_dims, shape)
    n_star = [transition_step(c.K_M, c.K_G, c.L_M, c.L_G, alpha, beta, gamma) for c in cells if c.step == 0]
    assert sum(STEPS[1] < n < STEPS[-1] for n in n_star) >= 4  # the test's own premise: identifiable transitions
    init_beta, init_alpha, init_gamma = settings.facts(setting).fit_start
    assert min(abs(alpha / init_alpha - 1), abs(beta / init_beta - 1), abs(gamma / init_gamma - 1)) > 0.2

    result = fit(cells, setting)
    assert result.converged, result.message
    np.testing.assert_allclose([result.alpha, result.beta, result.gamma], truth, rtol=1e-3)
    assert result.fit_loss < 1e-9 and result.held_out_loss < 1e-8
    assert result.pearson_r_held_out > 0.99 and result.pearson_r_all > 0.99
    assert result.n_fit_cells + result.n_held_out_cells == len(cells)
    assert result.n_fit_cells == len(split_cells(cells)[0])
    assert result.transition_steps == pytest.approx(dict(zip(DS, n_star)), rel=1e-2)
    json.dumps(result.to_json_dict(), allow_nan=False)


@pytest.mark.parametrize("setting, num_dims, shape", [("balls_and_urns", 5, (4, 6, 5)),
                                                       ("linear_regression", 3, (4, 6))])
@pytest.mark.parametrize("params", [(0.55, 0.28, 0.25), (0.3, 0.05, 50.0)])  # the second saturates w_M at 1
def test_fast_objective_matches_reference_loss_and_finite_differences(setting, num_dims, shape, params):
    output = settings.facts(setting).output
    cells = synthetic_cells(setting, 0.6, 0.3, 0.2, num_dims, shape, seed=1)
    rng = np.random.default_rng(2)
    # a model output that is not the normative prediction, so the loss and its gradient are non-trivial, and
    # memorizing log-probabilities down to -300 (where the mixture's log must not lose 1 - w_M)
    noisy = [replace(c, T=log_softmax(c.T + rng.normal(size=shape), -1) if output == "categorical"
                     else c.T + rng.normal(size=shape),
                     M=log_softmax(c.M * rng.choice([1, 30], size=shape), -1) if output == "categorical" else c.M)
             for c in cells]
    objective = _Objective(noisy, output)
    alpha, beta, gamma = params
    if params[2] > 1:
        z = [math.log(w / (1 - w)) for w in memorizing_weight([c.step for c in noisy], [c.K_M for c in noisy],
                                                             [c.K_G for c in noisy], [c.L_M for c in noisy],
                                                             [c.L_G for c in noisy], *params) if 0 < w < 1]
        assert len(z) < len(noisy) / 2  # most cells have w_M == 1.0 in float64
    u = np.array([math.log(alpha / (1 - alpha)), math.log(beta), math.log(gamma)])
    loss, grad = objective(u)
    reference = np.mean([cell_loss(c, predict(c, alpha, beta, gamma, output), output) for c in noisy])
    assert loss == pytest.approx(reference, rel=1e-10) and loss > 1e-3
    eps = 1e-6
    numeric = [(objective(u + eps * e)[0] - objective(u - eps * e)[0]) / (2 * eps) for e in np.eye(3)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)
    assert np.any(np.abs(grad) > 1e-6)


def test_fit_loss_is_the_mean_reference_loss_on_noisy_data():
    cells = synthetic_cells("balls_and_urns", 0.7, 0.3, 0.4, 4, (8, 10, 4), seed=3)
    rng = np.random.default_rng(4)
    cells = [replace(c, T=log_softmax(c.T + 0.3 * rng.normal(size=c.T.shape), -1)) for c in cells]
    result = fit(cells, "balls_and_urns")
    fit_cells, held_out = split_cells(cells)
    params = result.alpha, result.beta, result.gamma
    for group, value in ((fit_cells, result.fit_loss), (held_out, result.held_out_loss)):
        expected = np.mean([cell_loss(c, predict(c, *params, "categorical"), "categorical") for c in group])
        assert value == pytest.approx(expected, rel=1e-9)


def test_memorizing_weight_crosses_one_half_at_the_transition_step():
    K_M, K_G, L_M, L_G, alpha, beta, gamma = 5e4, 1056.0, 0.4, 0.9, 0.7, 0.3, 0.5
    n_star = transition_step(K_M, K_G, L_M, L_G, alpha, beta, gamma)
    assert 1 < n_star < 1e9
    w = memorizing_weight(np.array([0.5 * n_star, n_star, 2 * n_star]), K_M, K_G, L_M, L_G, alpha, beta, gamma)
    assert w[1] == pytest.approx(0.5, abs=1e-12)
    assert w[0] < 0.5 < w[2]
    # N = 0: the softmax of the complexity term alone
    w0 = memorizing_weight(0, K_M, K_G, L_M, L_G, alpha, beta, gamma)
    log_prior = -math.log(2) * np.array([K_M**beta, K_G**beta])
    assert w0 == pytest.approx(np.exp(log_prior - np.logaddexp(*log_prior))[0], rel=1e-12)
    assert 0 < w0 < 0.5
    # vectorised over N and per-D arrays together
    w = memorizing_weight(np.array([[0.0], [1e3]]), np.array([2e3, 5e4]), K_G, L_M, L_G, alpha, beta, gamma)
    assert w.shape == (2, 2) and w[1, 0] > w[0, 0] and w[0, 1] < w[0, 0]


def test_transition_step_beyond_float64_is_inf_and_below_it_exact():
    """alpha near 1 puts N* = (ln 2 (K_M^b - K_G^b) / (gamma (L_G - L_M)))^(1/(1-alpha)) beyond float64: inf, not an
    OverflowError that stops the analysis (a fit can end there); below that the log-space value is the power's."""
    args = (5e4, 1056.0, 0.4, 0.9)
    assert transition_step(*args, alpha=0.9999, beta=0.3, gamma=0.5) == math.inf
    base = math.log(2) * (5e4**0.3 - 1056.0**0.3) / (0.5 * 0.5)
    for alpha in (0.1, 0.7, 0.95):
        assert transition_step(*args, alpha=alpha, beta=0.3, gamma=0.5) == pytest.approx(base ** (1 / (1 - alpha)), rel=1e-12)


def test_transition_step_is_nan_when_undefined():
    args = {"alpha": 0.7, "beta": 0.3, "gamma": 0.5}
    assert math.isnan(transition_step(1000.0, 1056.0, 0.4, 0.9, **args))  # K_M < K_G
    assert math.isnan(transition_step(1056.0, 1056.0, 0.4, 0.9, **args))  # K_M == K_G
    assert math.isnan(transition_step(5e4, 1056.0, 0.9, 0.4, **args))  # L_G < L_M
    assert math.isnan(transition_step(5e4, 1056.0, 0.9, 0.9, **args))  # L_G == L_M
    assert transition_step(5e4, 1056.0, 0.4, 0.9, **args) > 0
    with pytest.raises(ValueError, match="alpha"):
        transition_step(5e4, 1056.0, 0.4, 0.9, alpha=1.0, beta=0.3, gamma=0.5)


@pytest.mark.parametrize("setting", ["balls_and_urns", "linear_regression", "classification"])
def test_complexity_memorizing_linear_in_D_generalizing_constant(setting):
    def K(kind, D, **kw):
        return complexity_bits(setting, kind, D, 8, **kw)

    step = K("memorizing", 20) - K("memorizing", 10)
    assert step > 0 and K("memorizing", 40) - K("memorizing", 20) == 2 * step
    assert K("memorizing", 1) > K("generalizing", 1)
    assert K("generalizing", 1) == K("generalizing", 1000) > 1024
    assert K("memorizing", 10, uniform_prior=False) - K("memorizing", 10) == 32 * 9


def test_complexity_values():
    assert complexity_bits("balls_and_urns", "memorizing", 16, 8) == 1024 + 32 * 16 * 7
    assert complexity_bits("linear_regression", "memorizing", 16, 8) == 1024 + 32 * 16 * 8
    assert complexity_bits("classification", "memorizing", 16, 8) == 1024 + 32 * 16 * 8 + 16
    assert complexity_bits("balls_and_urns", "generalizing", 16, 8) == 1024 + 32
    assert complexity_bits("linear_regression", "generalizing", 16, 8) == 1024 + 64
    assert complexity_bits("classification", "generalizing", 16, 8) == 1024 + 32


def test_complexity_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown setting 'urns'"):
        complexity_bits("urns", "memorizing", 4, 8)
    with pytest.raises(ValueError, match="unknown strategy kind 'memorising'"):
        complexity_bits("balls_and_urns", "memorising", 4, 8)
    with pytest.raises(ValueError, match="num_tasks"):
        complexity_bits("balls_and_urns", "memorizing", 0, 8)
    with pytest.raises(ValueError, match="unknown setting"):
        fit([], "urns")


def test_split_cells_80_80_rule():
    def cell(D, step):
        return Cell(D=D, step=step, T=np.zeros(1), M=np.zeros(1), G=np.zeros(1), K_M=2.0, K_G=1.0, L_M=0.0, L_G=1.0)

    grid = {1: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # 10 steps -> first 8
            2: [40, 0, 30, 10, 20],  # 5 steps, unsorted -> first 4: 0, 10, 20, 30
            3: list(range(0, 150, 10)),  # 15 steps -> 12
            4: [5, 1, 3, 2, 4, 6, 7],  # 7 steps -> ceil(5.6) = 6: 1 .. 6
            5: [0, 1, 2, 3]}  # the largest of 5 D values: ceil(4.0) = 4 D values are fitted, so all held out
    cells = [cell(D, s) for D, steps in grid.items() for s in steps]
    cells.append(cell(2, 10))  # a second run's checkpoint at a step already present
    fit_cells, held_out = split_cells(cells)
    expected = ({(1, s) for s in range(8)} | {(2, s) for s in (0, 10, 20, 30)} | {(3, s) for s in range(0, 120, 10)}
                | {(4, s) for s in range(1, 7)})
    assert [(c.D, c.step) for c in fit_cells] == [(c.D, c.step) for c in cells if (c.D, c.step) in expected]
    assert [(c.D, c.step) for c in held_out] == [(c.D, c.step) for c in cells if (c.D, c.step) not in expected]
    assert sum((c.D, c.step) == (2, 10) for c in fit_cells) == 2
    # 9 D values -> the smallest ceil(7.2) = 8 are fitted
    nine = [cell(D, 0) for D in range(9)]
    assert [c.D for c in split_cells(nine)[0]] == list(range(8))
    # 0.28 of 25 steps is 7, although 0.28 * 25 == 7.000000000000001 in floating point
    assert [c.step for c in split_cells([cell(1, s) for s in range(25)], fraction=0.28)[0]] == list(range(7))
    with pytest.raises(ValueError, match="fraction"):
        split_cells(cells, fraction=0.0)


def test_cell_loss_kl_and_mse():
    rng = np.random.default_rng(5)
    T, M, G = (log_softmax(rng.normal(size=(3, 2)), -1) for _ in range(3))
    cell = Cell(D=2, step=0, T=T.astype(np.float16), M=M, G=G, K_M=2e3, K_G=1e3, L_M=0.1, L_G=0.2)
    h = np.log(0.3 * np.exp(M) + 0.7 * np.exp(G))
    T64 = T.astype(np.float16).astype(np.float64)
    expected = rel_entr(np.exp(T64), np.exp(h)).sum(-1).mean()
    assert cell_loss(cell, h, "categorical") == pytest.approx(expected, rel=1e-12)
    assert cell_loss(replace(cell, T=h), h, "categorical") == pytest.approx(0, abs=1e-15)
    # predict mixes probabilities with weight w_M
    w = float(memorizing_weight(cell.step, cell.K_M, cell.K_G, cell.L_M, cell.L_G, 0.5, 0.2, 1.0))
    h = predict(replace(cell, M=M.astype(np.float16)), 0.5, 0.2, 1.0, "categorical")
    assert h.dtype == np.float64
    M16 = M.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(np.exp(h), w * np.exp(M16) + (1 - w) * np.exp(G), rtol=1e-12)
    reg = Cell(D=2, step=100, T=np.array([[1.0, 2.0]]), M=np.array([[0.0, 0.0]]), G=np.array([[2.0, 4.0]]),
               K_M=2e3, K_G=1e3, L_M=0.1, L_G=0.2)
    w = float(memorizing_weight(100, 2e3, 1e3, 0.1, 0.2, 0.5, 0.2, 1.0))
    h = predict(reg, 0.5, 0.2, 1.0, "regression")
    np.testing.assert_allclose(h, (1 - w) * reg.G)
    assert cell_loss(reg, h, "regression") == pytest.approx(((1 - 2 * (1 - w)) ** 2 + (2 - 4 * (1 - w)) ** 2) / 2)
    with pytest.raises(ValueError, match="unknown output"):
        cell_loss(reg, h, "mse")
    with pytest.raises(ValueError, match="shape"):
        cell_loss(reg, h[:, :1], "regression")


def test_fit_rejects_bad_cells():
    good = synthetic_cells("balls_and_urns", 0.6, 0.3, 0.2, 4, (2, 3, 4))
    with pytest.raises(ValueError, match="share one shape"):
        fit([replace(good[0], M=good[0].M[:1])] + good[1:], "balls_and_urns")
    with pytest.raises(ValueError, match="finite"):
        fit([replace(good[0], G=np.full_like(good[0].G, -np.inf))] + good[1:], "balls_and_urns")
    with pytest.raises(ValueError, match="exceeds 700 nats"):
        fit([replace(good[0], M=log_softmax(good[0].M * 1000, -1))] + good[1:], "balls_and_urns")
    with pytest.raises(ValueError, match="disagree"):
        fit([replace(good[0], L_M=good[0].L_M + 1)] + good[1:], "balls_and_urns")
    with pytest.raises(ValueError, match="alpha"):
        fit(good, "balls_and_urns", init=(0.2, 1.5, 0.85))


def with_logit_noise(cells: list[Cell], setting: str, truth: tuple[float, float, float], sd: float = 0.3,
                     seed: int = 0) -> list[Cell]:
    """Each cell's T the normative prediction at truth with N(0, sd^2) noise added to its log-odds z."""
    rng = np.random.default_rng(seed)
    output = settings.facts(setting).output
    noisy = []
    for c in cells:
        w = float(expit(logit(memorizing_weight(c.step, c.K_M, c.K_G, c.L_M, c.L_G, *truth)) + sd * rng.normal()))
        T = (np.logaddexp(np.log(w) + c.M, np.log1p(-w) + c.G) if output == "categorical"
             else w * c.M + (1 - w) * c.G)
        noisy.append(replace(c, T=T, observed_w_M=w))
    return noisy


def assert_recovered(result, truth):
    alpha, beta, gamma = truth
    assert abs(result.alpha - alpha) < 0.03 and abs(result.beta - beta) < 0.05, (result.alpha, result.beta)
    assert abs(result.gamma / gamma - 1) < 0.25, result.gamma


@pytest.mark.parametrize("setting, truth, num_dims, shape", [
    ("balls_and_urns", (0.75, 0.35, 0.3), 8, (16, 32, 8)),
    ("linear_regression", (0.5, 0.45, 0.05), 4, (16, 32)),
])
def test_fit_recovers_known_parameters_under_logit_noise(setting, truth, num_dims, shape):
    cells = with_logit_noise(synthetic_cells(setting, *truth, num_dims, shape), setting, truth)
    result = fit(cells, setting)
    assert_recovered(result, truth)
    assert result.flags == [] and result.undefined == {}
    assert len(result.starts) == NUM_STARTS and result.fit_loss == min(s.fit_loss for s in result.starts)


# L_M, L_G of normscale's classification Bayes predictors (num_dims 8, context_length 128, exemplar_noise 0.5;
# median of 10 means over 4000 fresh ID sequences) for D = 2 .. 2^15: G reads the context, which holds the query's
# exemplar, so beyond D ~ 1024 it beats M.
CLASSIFICATION_LOSSES = {2: (0.078, 0.188), 4: (0.153, 0.272), 8: (0.116, 0.246), 16: (0.099, 0.23),
                         32: (0.19, 0.347), 64: (0.284, 0.435), 128: (0.415, 0.529), 256: (0.44, 0.545),
                         512: (0.526, 0.564), 1024: (0.567, 0.578), 2048: (0.602, 0.581), 4096: (0.641, 0.595),
                         8192: (0.648, 0.59), 16384: (0.669, 0.586), 32768: (0.685, 0.583)}


@pytest.fixture(scope="module")
def classification_predictions() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{D: (M, G)}: the Bayes predictors' (256, 2) log-probabilities on 256 ID sequences of D random tasks."""
    torch = pytest.importorskip("torch")
    from normscale.config import TaskConfig

    out = {}
    for D in CLASSIFICATION_LOSSES:
        setting = settings.get("classification", TaskConfig(num_tasks=D, num_dims=8, context_length=128))
        tasks = {k: torch.as_tensor(v) for k, v in setting.draw_tasks(D, np.random.default_rng(D)).items()}
        generator = torch.Generator().manual_seed(D)
        batch = setting.sample(tasks, torch.randint(0, D, (256,), generator=generator), generator,
                               torch.full((D,), 1 / D, dtype=torch.float64))
        log_prior = torch.full((D,), -math.log(D), dtype=torch.float64)
        out[D] = tuple(setting.predictor(kind, tasks, log_prior)(batch).double().numpy()
                       for kind in ("memorizing", "generalizing"))
    return out


def test_classification_fit_escapes_the_saturated_stall_of_the_spec_start(classification_predictions):
    """Issue 14: from SPEC D's classification start (0.12, 0.8, 1.5) L-BFGS-B's first step takes beta to its bound,
    where every predicted w_M is 0 and the gradient vanishes. Cells: the Bayes predictors' outputs, 100 sqrt-spaced
    checkpoints to step 2000 (the demo's max_steps), D = 2 .. 2^15, T from truth with logit noise 0.3."""
    truth = (0.7, 0.3, 2.0)
    K_G = complexity_bits("classification", "generalizing", 1, 8)
    cells = [Cell(D=D, step=step, T=M, M=M, G=G, K_M=complexity_bits("classification", "memorizing", D, 8), K_G=K_G,
                  L_M=CLASSIFICATION_LOSSES[D][0], L_G=CLASSIFICATION_LOSSES[D][1])
             for D, (M, G) in classification_predictions.items()
             for step in checkpoint_schedule("sqrt_schedule", 2000, 100, 20)]
    cells = with_logit_noise(cells, "classification", truth)

    single = fit(cells, "classification", num_starts=1)
    assert single.beta == pytest.approx(2.0) and single.fit_loss > 10 * fit(cells, "classification").fit_loss
    assert single.flags[:2] == ["saturated: every fitted cell's predicted w_M < 0.01 (max 0)", "beta at its bound 2"]

    result = fit(cells, "classification")
    assert_recovered(result, truth)
    assert result.flags == []
    assert result.starts[0].start == pytest.approx({"alpha": 0.8, "beta": 0.12, "gamma": 1.5})
    assert result.starts[0].flags == single.flags


def test_fit_flags_a_point_that_is_not_a_minimum_and_states_why_a_statistic_is_undefined():
    truth = (0.6, 0.3, 0.2)
    cells = synthetic_cells("balls_and_urns", *truth, 4, (4, 6, 4))
    fit_cells = split_cells(cells)[0]
    objective = _Objective(fit_cells, "categorical")
    u = np.array([logit(truth[0]), math.log(truth[1]), math.log(truth[2])])
    assert _fit_flags(objective, fit_cells, u, *objective(u), True, "") == []
    off = u + [0, 0, 0.6]  # gamma 1.8 times too large
    flags = _fit_flags(objective, fit_cells, off, *objective(off), True, "")
    assert len(flags) == 1 and flags[0].startswith("stalled: not a minimum") and "lowers the fit loss" in flags[0]

    constant = [replace(c, observed_w_M=0.25) for c in cells]
    result = fit(constant, "balls_and_urns", num_starts=1)
    assert math.isnan(result.pearson_r_held_out) and math.isnan(result.pearson_r_all)
    assert result.undefined == {"pearson_r_held_out": "the held-out cells' observed w_M are constant (0.25)",
                                "pearson_r_all": "the cells' observed w_M are constant (0.25)"}
    everything = fit(cells, "balls_and_urns", fraction=1.0, num_starts=1)
    assert everything.undefined == {"held_out_loss": "no held-out cells", "pearson_r_held_out": "no held-out cells"}
    assert json.loads(json.dumps(everything.to_json_dict()))["undefined"] == everything.undefined


def test_interpolation_distance_is_zero_on_the_mixture_and_rises_off_it():
    rng = np.random.default_rng(6)
    M, G = rng.normal(size=(2, 5, 7))
    regression = Cell(D=4, step=10, T=0.3 * M + 0.7 * G, M=M, G=G, K_M=2e3, K_G=1e3, L_M=0.1, L_G=0.2)
    assert interpolation_distance(regression, "regression") == pytest.approx(0, abs=1e-12)  # w = 0.3 exactly
    T = regression.T + 1.0

    def mse(a, b):
        return np.mean((a - b) ** 2)

    w = (1 + np.clip((mse(T, G) - mse(T, M)) / mse(M, G), -1, 1)) / 2
    expected = mse(T, w * M + (1 - w) * G)
    assert interpolation_distance(replace(regression, T=T), "regression") == pytest.approx(expected, rel=1e-12)
    assert 0.5 < expected <= 1.0  # at most the distance 1 to the mixture at w = 0.3
    M, G = log_softmax(3 * rng.normal(size=(2, 5, 6, 4)), -1)
    categorical = Cell(D=4, step=10, T=M, M=M, G=G, K_M=2e3, K_G=1e3, L_M=0.1, L_G=0.2)
    assert interpolation_distance(categorical, "categorical") == pytest.approx(0, abs=1e-12)  # r clips to 1
    assert interpolation_distance(replace(categorical, T=G), "categorical") == pytest.approx(0, abs=1e-12)
    uniform = replace(categorical, T=np.full_like(M, -math.log(4)))

    def sym_kl(a, b):  # RI's: (KL(b || a) + KL(a || b)) / 2, summed over classes, averaged over the rest
        return (rel_entr(np.exp(a), np.exp(b)).sum(-1).mean() + rel_entr(np.exp(b), np.exp(a)).sum(-1).mean()) / 2

    T = uniform.T
    w = (1 + np.clip((sym_kl(T, G) - sym_kl(T, M)) / sym_kl(M, G), -1, 1)) / 2
    expected = sym_kl(T, np.log(w * np.exp(M) + (1 - w) * np.exp(G)))
    assert interpolation_distance(uniform, "categorical") == pytest.approx(expected, rel=1e-10) and expected > 0.01


def test_interpolation_cutoffs_take_the_first_step_below_the_threshold_and_the_largest_over_D():
    steps = [0, 10, 20, 30, 40, 50]
    rows = [  # (group, D, distances over steps)
        ("a", 4, [1.0, 0.5, 0.19, 0.1, 0.0, 0.05]),  # threshold 0 + 0.2 * 1 = 0.2: first below at step 20
        ("a", 64, [2.0, 1.5, 1.0, 0.4, 0.3, 0.0]),  # threshold 0.4: 0.4 is not below it, 0.3 is: step 40
        ("b", 4, [1.0, 0.9, 0.2, 0.0, 0.1, 0.1]),  # threshold 0.2, 0.2 not below: step 30
        ("c", 4, [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),  # flat: nothing below min + 0: inf
    ]
    groups, Ds, all_steps, distances = zip(*[(g, D, s, d) for g, D, ds in rows for s, d in zip(steps, ds)])
    assert interpolation_cutoffs(groups, Ds, all_steps, distances, 0.2) == {"a": 40, "b": 30, "c": math.inf}
    # checkpoints of two seeds pool, in step order whatever the input order
    order = [5, 3, 1, 0, 2, 4]
    assert interpolation_cutoffs(["a"] * 12, [4] * 12, [steps[i] for i in order] * 2,
                                 [rows[0][2][i] for i in order] + [0.9] * 6, 0.2) == {"a": 20}
