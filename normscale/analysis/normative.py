"""The normative model of strategy selection (SPEC D): a posterior over two strategies, fitted to checkpoints.

After N training steps on D tasks a model is explained as the posterior mixture of two Bayes predictors, memorizing
(M: the posterior over the D training tasks) and generalizing (G: the posterior under the task prior):

    log p(s | N, D) = -ln2 * K_s(D)^beta - gamma * N^(1-alpha) * L_s(D) + const,    w_s = softmax_s(.)
    h(N, D) = w_M A_M + (1 - w_M) A_G     (a mixture of probabilities for categorical outputs, of predictions for
                                           regression)

so w_M = sigmoid(z) with log-odds z = -ln2 (K_M^beta - K_G^beta) + gamma N^(1-alpha) (L_G - L_M); N = 0 gives
N^(1-alpha) = 0 (the complexity term alone). w_M crosses 1/2 at the transition step

    N*(D) = [ln2 (K_M^beta - K_G^beta) / (gamma (L_G - L_M))]^(1/(1-alpha)),  defined only when K_M > K_G and
                                                                              L_G > L_M (NaN otherwise).

L_s(D) is strategy s's in-distribution loss, computed elsewhere. K_s(D) is its description length in bits, defined
here (`complexity_bits`): a program cost K0 = PROGRAM_BITS = 1024 bits, the same for both strategies, plus 32 bits
(one float32) per number the strategy must store:
  memorizing    the D tasks' parameters: balls_and_urns D*(V-1) free simplex coordinates; linear_regression D*d
                weights; classification D*d exemplar coordinates plus D one-bit labels (32*D*d + D bits); and, for
                a non-uniform task prior, its D-1 free weights (32*(D-1) bits);
  generalizing  only its prior's hyperparameters: balls_and_urns the Dirichlet concentration (1 number);
                linear_regression sigma^2 and tau^2 (2); classification the exemplar noise w (1).
So K_M grows linearly in D and K_G does not depend on D.

Fitting (`fit`): alpha in (0, 1), beta > 0 and gamma > 0 are optimised as u = (logit alpha, log beta, log gamma) by
scipy's L-BFGS-B with analytic gradients, within BOUNDS. The objective is the mean over (N, D) cells of the per-cell
loss (`cell_loss`): for categorical outputs (T, M, G log-probabilities; balls_and_urns (n, C, V), classification
(n, 2)) KL(T || h) over the last axis, averaged over the others; for regression (linear_regression (n, C)
predictions) the mean squared error between T and h. Only the cells `split_cells` keeps are fitted (the first 80% of
each D's checkpoints x the smallest 80% of the D values); the others are held out.
A single start can stall: from SPEC D's classification start the first L-BFGS-B step can take beta to its bound,
where every predicted w_M is 0 and the gradient vanishes (tests/test_normative.py reproduces it with the Bayes
predictors' outputs). So `fit` runs NUM_STARTS starts (`candidate_starts`): the setting's fit_start = (beta, alpha,
gamma) and the best NUM_STARTS - 1 points, by the objective there, of START_GRID (alpha 0.3, 0.6, 0.9 x beta 0.1, 0.3,
0.6 x gamma 0.03, 1, 30 times the start's); it keeps the lowest fit loss (ties: the setting's start). Each start's
result is in FitResult.starts. `flags` say what makes the chosen solution doubtful (empty when clean): every fitted
cell's predicted w_M below SATURATION (or above 1 - SATURATION); "stalled": a step of STALL_PROBE along an axis of u
lowers the loss (not a minimum); a parameter at its bound; no convergence. Reported (`FitResult`): the fitted
parameters, fit and held-out losses, the Pearson r between predicted and observed w_M on the held-out cells and on
all cells, N*(D) for every D, and for each NaN among them the reason (`undefined`).

The paper's checkpoint filter (`interpolation_distance`, `interpolation_cutoffs`; `fit_from=interpolation_threshold`
in normscale.analysis.report): RI fits only the checkpoints past an approximate interpolation threshold. A cell's
interpolation distance is d(T, w M + (1 - w) G) with SPEC C's distance d and w = (1 + r) / 2 from T, M, G themselves;
per (group, D) the threshold is min + p (max - min) over its checkpoints (p = INTERPOLATION_FRACTION: 0.1 regression,
0.2 categorical), the first step below it its cut-off (inf if none), and a group's cut-off the largest over its D.

Public API: PROGRAM_BITS, BOUNDS, NUM_STARTS, START_GRID, complexity_bits, memorizing_weight, transition_step, Cell,
predict, cell_loss, split_cells, candidate_starts, fit, FitResult, FitStart, interpolation_distance,
interpolation_cutoffs. All arithmetic is float64 whatever the inputs' dtype.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import expit, log_expit, logit

from normscale import settings

LN2 = math.log(2.0)
PROGRAM_BITS = 1024.0  # K0: the fixed program cost shared by both strategies
FLOAT_BITS = 32.0  # one stored float32 number
STRATEGIES = ("memorizing", "generalizing")
OUTPUTS = ("categorical", "regression")
BOUNDS = {"alpha": (1e-4, 1 - 1e-4), "beta": (1e-4, 2.0), "gamma": (1e-12, 1e12)}
NUM_STARTS = 5  # L-BFGS-B runs per fit: the setting's fit_start and the best 4 of START_GRID
START_GRID = {"alpha": (0.3, 0.6, 0.9), "beta": (0.1, 0.3, 0.6), "gamma_factor": (0.03, 1.0, 30.0)}
INTERPOLATION_FRACTION = {"categorical": 0.2, "regression": 0.1}  # RI's threshold_percentile (0.1 for regression)
SATURATION = 0.01  # a predicted w_M below it, or above 1 - it, is saturated
BLOCK_ELEMENTS = 2**20  # the objective's categorical arrays are processed in blocks of at most this many numbers
STALL_PROBE = 0.5  # step along each axis of (logit alpha, log beta, log gamma) that tests a solution for a minimum


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}: expected one of {OUTPUTS} (a setting's Facts.output)")


def _check_params(alpha: float, beta: float, gamma: float) -> None:
    if not (0 < alpha < 1 and beta > 0 and gamma > 0):
        raise ValueError(f"need 0 < alpha < 1, beta > 0, gamma > 0; got alpha={alpha}, beta={beta}, gamma={gamma}")


def complexity_bits(setting: str, kind: str, num_tasks: int, num_dims: int, uniform_prior: bool = True) -> float:
    """K_s(D) in bits (module docstring): PROGRAM_BITS plus 32 bits per stored number (the setting's Facts say how
    many: normscale.settings); uniform_prior=False adds the D-1 prior weights to the memorizing strategy."""
    known = settings.facts(setting)
    if kind not in STRATEGIES:
        raise ValueError(f"unknown strategy kind {kind!r}: expected one of {STRATEGIES}")
    if num_tasks < 1 or num_dims < known.min_dims:
        raise ValueError(f"need num_tasks >= 1 and num_dims >= {known.min_dims} for {setting}; "
                         f"got num_tasks={num_tasks}, num_dims={num_dims}")
    if kind == "generalizing":
        return PROGRAM_BITS + FLOAT_BITS * known.prior_numbers
    D, d = num_tasks, num_dims
    tasks = FLOAT_BITS * known.task_numbers(D, d) + known.task_bits(D)
    prior = 0.0 if uniform_prior else FLOAT_BITS * (D - 1)
    return PROGRAM_BITS + tasks + prior


def _log_odds(N: ArrayLike, K_M: ArrayLike, K_G: ArrayLike, L_M: ArrayLike, L_G: ArrayLike,
              alpha: float, beta: float, gamma: float) -> np.ndarray:
    """z = log w_M - log w_G, broadcast over all array arguments."""
    N = np.asarray(N, np.float64)
    if np.any(N < 0):
        raise ValueError("training steps N must be >= 0")
    K_M, K_G = np.asarray(K_M, np.float64), np.asarray(K_G, np.float64)
    return -LN2 * (K_M**beta - K_G**beta) + gamma * N ** (1 - alpha) * (np.asarray(L_G, np.float64) - L_M)


def memorizing_weight(N: ArrayLike, K_M: ArrayLike, K_G: ArrayLike, L_M: ArrayLike, L_G: ArrayLike,
                      alpha: float, beta: float, gamma: float) -> np.ndarray:
    """Posterior weight w_M of the memorizing strategy (the sigmoid of the log-odds), broadcast over N and the
    per-D arrays K_M, K_G, L_M, L_G."""
    _check_params(alpha, beta, gamma)
    return expit(_log_odds(N, K_M, K_G, L_M, L_G, alpha, beta, gamma))


def transition_step(K_M: float, K_G: float, L_M: float, L_G: float, alpha: float, beta: float, gamma: float) -> float:
    """N*: the step where w_M = 1/2; NaN unless K_M > K_G and L_G > L_M (no crossing otherwise), inf where it lies
    beyond float64 (alpha near 1 makes the power huge)."""
    _check_params(alpha, beta, gamma)
    if not (K_M > K_G and L_G > L_M):
        return math.nan
    log_step = (math.log(LN2 * (K_M**beta - K_G**beta)) - math.log(gamma * (L_G - L_M))) / (1 - alpha)
    return math.exp(log_step) if log_step < math.log(sys.float_info.max) else math.inf


@dataclass
class Cell:
    """One (D, checkpoint) cell. T, M, G: the model's and the memorizing and generalizing Bayes predictors' outputs
    on the same fit sequences, of one shape (log-probabilities over the last axis for categorical outputs,
    predictions for regression). K_M, K_G: complexities in bits; L_M, L_G: in-distribution losses (per D).
    observed_w_M: w_M measured elsewhere (SPEC C's distances), NaN if unknown; used only for the Pearson r."""
    D: int
    step: int
    T: np.ndarray
    M: np.ndarray
    G: np.ndarray
    K_M: float
    K_G: float
    L_M: float
    L_G: float
    observed_w_M: float = math.nan


def _check_cell(cell: Cell, output: str) -> None:
    where = f"cell D={cell.D} step={cell.step}"
    shapes = {np.shape(cell.T), np.shape(cell.M), np.shape(cell.G)}
    if len(shapes) != 1:
        raise ValueError(f"{where}: T, M, G must share one shape; got {np.shape(cell.T)}, {np.shape(cell.M)}, "
                         f"{np.shape(cell.G)}")
    shape = shapes.pop()
    if output == "categorical" and (len(shape) < 2 or shape[-1] < 2):
        raise ValueError(f"{where}: categorical outputs need shape (..., classes >= 2); got {shape}")
    if not all(np.all(np.isfinite(a)) for a in (cell.T, cell.M, cell.G)):
        raise ValueError(f"{where}: T, M, G must be finite (clip log-probabilities, e.g. np.maximum(x, -1e4))")
    if cell.step < 0 or not np.all(np.isfinite([cell.K_M, cell.K_G, cell.L_M, cell.L_G])):
        raise ValueError(f"{where}: need step >= 0 and finite K_M, K_G, L_M, L_G")


def _cell_log_odds(cell: Cell, alpha: float, beta: float, gamma: float) -> float:
    return float(_log_odds(cell.step, cell.K_M, cell.K_G, cell.L_M, cell.L_G, alpha, beta, gamma))


def predict(cell: Cell, alpha: float, beta: float, gamma: float, output: str) -> np.ndarray:
    """The model's predicted output h (float64, the shape of cell.M): for output "categorical" the log of the
    mixture of probabilities, log(w_M exp(M) + (1 - w_M) exp(G)); for "regression" w_M M + (1 - w_M) G."""
    _check_output(output)
    _check_params(alpha, beta, gamma)
    z = _cell_log_odds(cell, alpha, beta, gamma)
    M, G = np.asarray(cell.M, np.float64), np.asarray(cell.G, np.float64)
    if output == "categorical":
        return np.logaddexp(log_expit(z) + M, log_expit(-z) + G)
    w = expit(z)
    return w * M + (1 - w) * G


def cell_loss(cell: Cell, h: np.ndarray, output: str) -> float:
    """Loss of prediction h against the model's output cell.T: "categorical" the mean over positions of
    KL(T || h) over the last axis (both log-probabilities); "regression" the mean squared error."""
    _check_output(output)
    T, h = np.asarray(cell.T, np.float64), np.asarray(h, np.float64)
    if T.shape != h.shape:
        raise ValueError(f"prediction shape {h.shape} differs from the model's output shape {T.shape}")
    if output == "categorical":
        return float(np.mean(np.sum(np.exp(T) * (T - h), axis=-1)))
    return float(np.mean((T - h) ** 2))


def _num_kept(n: int, fraction: float) -> int:
    return math.ceil(round(fraction * n, 9))  # the rounding keeps e.g. 0.28 * 25 at 7, not 8


def split_cells(cells: Sequence[Cell], fraction: float = 0.8) -> tuple[list[Cell], list[Cell]]:
    """(fit cells, held-out cells), each in input order. A cell is fitted iff its D is among the smallest
    ceil(fraction * n_D) distinct D values AND its step is among the first ceil(fraction * n_steps) distinct steps
    of its D (sorted by step); every other cell is held out."""
    is_fit = _fit_mask(cells, fraction)
    return [c for c, f in zip(cells, is_fit) if f], [c for c, f in zip(cells, is_fit) if not f]


def _fit_mask(cells: Sequence[Cell], fraction: float) -> np.ndarray:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    Ds = sorted({c.D for c in cells})
    fit_Ds = set(Ds[:_num_kept(len(Ds), fraction)])
    steps: dict[int, set[int]] = {D: set() for D in Ds}
    for c in cells:
        steps[c.D].add(c.step)
    first = {D: set(sorted(s)[:_num_kept(len(s), fraction)]) for D, s in steps.items()}
    return np.array([c.D in fit_Ds and c.step in first[c.D] for c in cells], bool)


class _Objective:
    """Mean cell loss over cells, and its gradient, as a function of u = (logit alpha, log beta, log gamma).

    A cell's loss depends on its log-odds z alone (w = sigmoid z). Categorical: with p = exp(T) and e = exp(M - G)
    precomputed and flattened, log h = G + log q where q = (1 - w) + w e (1 - w and w each from a sigmoid, so
    neither is lost when the other saturates); hence loss = c - p.log(q) / P and dloss/dz = -w (1 - w)
    p.((e - 1) / q) / P, with c = p.(T - G) / P and P the number of positions. This keeps two float64 arrays the
    size of T per cell, stacked in blocks of cells. Regression: loss = a - 2 w b + w^2 c, with a, b, c the means of (T - G)^2,
    (T - G)(M - G) and (M - G)^2, and no arrays kept."""

    def __init__(self, cells: Sequence[Cell], output: str):
        self.output = output
        self.N = np.array([c.step for c in cells], np.float64)
        self.log_N = np.log(np.where(self.N > 0, self.N, 1.0))  # N^(1-alpha) ln N -> 0 at N = 0
        self.K_M, self.K_G = (np.array([getattr(c, k) for c in cells], np.float64) for k in ("K_M", "K_G"))
        self.dL = np.array([c.L_G - c.L_M for c in cells], np.float64)
        self.abc = []
        self.blocks = []  # categorical: (cell indices, p, e, c, P) for runs of cells of one shape, stacked
        for cell in cells:
            T, M, G = (np.asarray(a, np.float64).ravel() for a in (cell.T, cell.M, cell.G))
            if output == "categorical":
                if np.max(np.abs(M - G)) > 700:
                    raise ValueError(f"cell D={cell.D} step={cell.step}: |M - G| exceeds 700 nats, so exp(M - G) "
                                     f"over- or underflows; clip the log-probabilities, e.g. np.maximum(x, -600)")
                self.abc.append((np.exp(T), np.exp(M - G), T - G, T.size / np.shape(cell.T)[-1]))
            else:
                TG, MG = T - G, M - G
                self.abc.append((TG @ TG / T.size, TG @ MG / T.size, MG @ MG / T.size))
        if output == "categorical":
            self._stack_blocks()

    def _stack_blocks(self) -> None:
        """Stack consecutive cells of one size into blocks of at most BLOCK_ELEMENTS (one numpy operation per block
        instead of per cell; the stacks replace the per-cell arrays, so memory stays two arrays the size of T)."""
        per_cell, self.abc = self.abc, []
        start = 0
        while start < len(per_cell):
            size = per_cell[start][0].size
            stop = start + 1
            while (stop < len(per_cell) and per_cell[stop][0].size == size
                   and (stop - start + 1) * size <= BLOCK_ELEMENTS):
                stop += 1
            p, e, TG, P = (np.stack(a) for a in zip(*per_cell[start:stop]))
            self.blocks.append((slice(start, stop), p, e, np.einsum("ij,ij->i", p, TG) / P, P))
            per_cell[start:stop] = [None] * (stop - start)
            start = stop

    def cell_losses(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's loss and its derivative in z."""
        w, w1 = expit(z), expit(-z)
        if self.output == "regression":
            a, b, c = np.array(self.abc, np.float64).reshape(-1, 3).T
            return a - 2 * w * b + w**2 * c, 2 * (w * c - b) * w * w1
        losses, slopes = np.empty_like(z), np.empty_like(z)
        for cells, p, e, c, P in self.blocks:
            q = w1[cells, None] + w[cells, None] * e
            losses[cells] = c - np.einsum("ij,ij->i", p, np.log(q)) / P
            slopes[cells] = -w[cells] * w1[cells] * np.einsum("ij,ij->i", p, (e - 1) / q) / P
        return losses, slopes

    def __call__(self, u: np.ndarray) -> tuple[float, np.ndarray]:
        alpha, beta, gamma = expit(u[0]), math.exp(u[1]), math.exp(u[2])
        KM_b, KG_b, N_a = self.K_M**beta, self.K_G**beta, self.N ** (1 - alpha)
        z = -LN2 * (KM_b - KG_b) + gamma * N_a * self.dL
        dz = np.stack([-gamma * N_a * self.log_N * self.dL * alpha * (1 - alpha),  # d/d logit(alpha)
                       -LN2 * (KM_b * np.log(self.K_M) - KG_b * np.log(self.K_G)) * beta,  # d/d log(beta)
                       gamma * N_a * self.dL])  # d/d log(gamma)
        losses, slopes = self.cell_losses(z)
        return float(losses.mean()), dz @ slopes / len(z)


@dataclass
class FitStart:
    """One L-BFGS-B run of a fit: where it started and where it ended."""
    start: dict[str, float]  # {"alpha", "beta", "gamma"}
    alpha: float
    beta: float
    gamma: float
    fit_loss: float
    converged: bool
    message: str
    flags: list[str]  # `_fit_flags` of this run's solution


@dataclass
class FitResult:
    """A fit of (alpha, beta, gamma) to one setting's cells: the best of `starts` by fit loss. NaN where a quantity
    is undefined (no held-out cells, fewer than two observed w_M, no transition), with the reason in `undefined`
    ({field: reason}). `flags` name what makes the chosen solution doubtful (empty when clean): saturated predictions,
    a stalled optimiser, a parameter at its bound, no convergence."""
    setting: str
    alpha: float
    beta: float
    gamma: float
    fit_loss: float
    held_out_loss: float
    pearson_r_held_out: float
    pearson_r_all: float
    n_fit_cells: int
    n_held_out_cells: int
    converged: bool
    message: str
    transition_steps: dict[int, float]  # D -> N*(D)
    flags: list[str] = field(default_factory=list)
    undefined: dict[str, str] = field(default_factory=dict)
    starts: list[FitStart] = field(default_factory=list)

    def to_json_dict(self) -> dict:
        """A strictly JSON-serialisable dict: NaN -> None, D keys as strings."""
        def clean(x):
            return None if isinstance(x, float) and math.isnan(x) else x
        d = {k: clean(v) for k, v in asdict(self).items()}
        d["transition_steps"] = {str(D): clean(n) for D, n in self.transition_steps.items()}
        return d


def _pearson(x: np.ndarray, y: np.ndarray, cells: str) -> tuple[float, str | None]:
    """Pearson r of predicted x against observed y, or NaN and the reason it is undefined (`cells` names them)."""
    if x.size == 0:
        return math.nan, f"no {cells}"
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2:
        return math.nan, f"fewer than two {cells} with an observed w_M"
    if np.ptp(y) == 0:
        return math.nan, f"the {cells}' observed w_M are constant ({y[0]:.3g})"
    if np.ptp(x) == 0:
        return math.nan, f"the {cells}' predicted w_M are constant ({x[0]:.3g})"
    return float(np.corrcoef(x, y)[0, 1]), None


def _per_D_constants(cells: Sequence[Cell]) -> dict[int, tuple[float, float, float, float]]:
    """(K_M, K_G, L_M, L_G) of each D, checked to agree across its cells."""
    out: dict[int, tuple[float, float, float, float]] = {}
    for c in cells:
        values = (float(c.K_M), float(c.K_G), float(c.L_M), float(c.L_G))
        first = out.setdefault(c.D, values)
        if not np.allclose(values, first, rtol=1e-9, atol=0):
            raise ValueError(f"cells of D={c.D} disagree on (K_M, K_G, L_M, L_G): {first} vs {values}; "
                             f"these are per-D quantities and must be the same for every checkpoint")
    return out


_U_BOUNDS = np.array([logit(BOUNDS["alpha"]), np.log(BOUNDS["beta"]), np.log(BOUNDS["gamma"])])  # (3, 2): low, high
_U_NAMES = ("logit alpha", "log beta", "log gamma")


def _to_u(alpha: float, beta: float, gamma: float) -> np.ndarray:
    return np.clip([logit(alpha), math.log(beta), math.log(gamma)], *_U_BOUNDS.T)


def _from_u(u: np.ndarray) -> tuple[float, float, float]:
    return float(expit(u[0])), math.exp(u[1]), math.exp(u[2])


def candidate_starts(objective: _Objective, init: tuple[float, float, float], num_starts: int) -> list[np.ndarray]:
    """The fit's starts in u = (logit alpha, log beta, log gamma): init = (beta, alpha, gamma) first, then the
    num_starts - 1 points of the START_GRID (gamma relative to init's) with the lowest objective there."""
    beta0, alpha0, gamma0 = init
    grid = [_to_u(a, b, gamma0 * f) for a in START_GRID["alpha"] for b in START_GRID["beta"]
            for f in START_GRID["gamma_factor"]]
    ranked = sorted(grid, key=lambda u: objective(u)[0])  # stable: ties keep the grid's order
    return [_to_u(alpha0, beta0, gamma0)] + ranked[:num_starts - 1]


def _fit_flags(objective: _Objective, fit_cells: Sequence[Cell], u: np.ndarray, loss: float, grad: np.ndarray,
               converged: bool, message: str) -> list[str]:
    """What makes a solution doubtful: all fitted cells' predicted w_M saturated (< SATURATION or > 1 - SATURATION),
    a lower loss one STALL_PROBE away along an axis of u (the optimiser stopped where the gradient vanished, not at a
    minimum: typically a flat objective where w_M saturates), a parameter at its bound, no convergence."""
    flags = []
    alpha, beta, gamma = _from_u(u)
    w = np.array([expit(_cell_log_odds(c, alpha, beta, gamma)) for c in fit_cells])
    if np.all(w < SATURATION):
        flags.append(f"saturated: every fitted cell's predicted w_M < {SATURATION:g} (max {w.max():.2g})")
    elif np.all(w > 1 - SATURATION):
        flags.append(f"saturated: every fitted cell's predicted w_M > {1 - SATURATION:g} (min {w.min():.2g})")
    for axis, sign in [(axis, sign) for axis in range(3) for sign in (-1, 1)]:
        probe = np.clip(u + sign * STALL_PROBE * np.eye(3)[axis], *_U_BOUNDS.T)
        probe_loss = objective(probe)[0]
        if probe_loss < loss - 1e-6 * abs(loss):
            flags.append(f"stalled: not a minimum (gradient norm {np.linalg.norm(grad):.1e}): {_U_NAMES[axis]} "
                         f"{sign * STALL_PROBE:+g} lowers the fit loss from {loss:.4g} to {probe_loss:.4g}")
            break
    for name, value, (low, high) in zip(("alpha", "beta", "gamma"), (alpha, beta, gamma), BOUNDS.values()):
        if math.isclose(value, low, rel_tol=1e-6) or math.isclose(value, high, rel_tol=1e-6):
            flags.append(f"{name} at its bound {value:.4g}")
    if not converged:
        flags.append(f"not converged: {message}")
    return flags


def fit(cells: Sequence[Cell], setting: str, init: tuple[float, float, float] | None = None,
        fraction: float = 0.8, num_starts: int = NUM_STARTS) -> FitResult:
    """Fit (alpha, beta, gamma) to the cells `split_cells(cells, fraction)` keeps by L-BFGS-B from each of
    `candidate_starts` (init = (beta, alpha, gamma), default the setting's fit_start, and num_starts - 1 grid
    points; num_starts=1: init alone); keep the run with the lowest fit loss, flag it (`_fit_flags`) and evaluate it
    on the held-out cells and on all cells. Categorical fits hold two float64 arrays the size of T per fit cell
    (about 4 MB for (256, 128, 8))."""
    known = settings.facts(setting)
    output = known.output
    cells = list(cells)
    for c in cells:
        _check_cell(c, output)
    per_D = _per_D_constants(cells)
    init = known.fit_start if init is None else init
    beta0, alpha0, gamma0 = init
    _check_params(alpha0, beta0, gamma0)
    if num_starts < 1:
        raise ValueError(f"num_starts must be >= 1; got {num_starts}")
    is_fit = _fit_mask(cells, fraction)
    fit_cells = [c for c, f in zip(cells, is_fit) if f]
    held_out = [c for c, f in zip(cells, is_fit) if not f]
    if not fit_cells:
        raise ValueError("no cells to fit: pass at least one cell")

    objective = _Objective(fit_cells, output)
    starts = []
    for u0 in candidate_starts(objective, init, num_starts):
        res = minimize(objective, u0, jac=True, method="L-BFGS-B", bounds=_U_BOUNDS,
                       options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
        start = dict(zip(("alpha", "beta", "gamma"), _from_u(u0)))
        flags = _fit_flags(objective, fit_cells, res.x, float(res.fun), res.jac, bool(res.success), str(res.message))
        starts.append(FitStart(start, *_from_u(res.x), float(res.fun), bool(res.success), str(res.message), flags))
    best = min(starts, key=lambda s: s.fit_loss)  # the first of equals: the setting's start wins ties
    alpha, beta, gamma = best.alpha, best.beta, best.gamma

    undefined = {}
    if held_out:
        held_out_loss = float(np.mean([cell_loss(c, predict(c, alpha, beta, gamma, output), output)
                                       for c in held_out]))
    else:
        held_out_loss, undefined["held_out_loss"] = math.nan, "no held-out cells"
    w_pred = memorizing_weight([c.step for c in cells], [c.K_M for c in cells], [c.K_G for c in cells],
                               [c.L_M for c in cells], [c.L_G for c in cells], alpha, beta, gamma)
    w_obs = np.array([c.observed_w_M for c in cells], np.float64)
    r_held_out, why = _pearson(w_pred[~is_fit], w_obs[~is_fit], "held-out cells")
    if why:
        undefined["pearson_r_held_out"] = why
    r_all, why = _pearson(w_pred, w_obs, "cells")
    if why:
        undefined["pearson_r_all"] = why
    transition_steps = {D: transition_step(*per_D[D], alpha, beta, gamma) for D in sorted(per_D)}
    no_crossing = [D for D, n in transition_steps.items() if math.isnan(n)]
    if no_crossing:
        undefined["transition_steps"] = (f"no crossing (needs K_M > K_G and L_G > L_M) at D = "
                                         f"{', '.join(map(str, no_crossing))}")
    return FitResult(
        setting=setting, alpha=alpha, beta=beta, gamma=gamma, fit_loss=best.fit_loss, held_out_loss=held_out_loss,
        pearson_r_held_out=r_held_out, pearson_r_all=r_all, n_fit_cells=len(fit_cells), n_held_out_cells=len(held_out),
        converged=best.converged, message=best.message, transition_steps=transition_steps, flags=best.flags,
        undefined=undefined, starts=starts)


def _distance(a: np.ndarray, b: np.ndarray, output: str) -> float:
    """SPEC C's distance: the symmetrised KL over the last axis averaged over the others (categorical
    log-probabilities), or the mean squared difference (regression)."""
    if output == "categorical":
        return float(np.mean(np.sum((np.exp(a) - np.exp(b)) * (a - b), axis=-1)) / 2)
    return float(np.mean((a - b) ** 2))


def interpolation_distance(cell: Cell, output: str) -> float:
    """d(T, w M + (1 - w) G) on the cell's own outputs (SPEC C; RI's compute_barycentric_weights for two
    predictors): w = (1 + r) / 2 with r = (d(T, G) - d(T, M)) / d(M, G) clipped to [-1, 1]; the mixture is of
    probabilities for categorical outputs, of predictions for regression."""
    _check_output(output)
    T, M, G = (np.asarray(a, np.float64) for a in (cell.T, cell.M, cell.G))
    r = np.clip((_distance(T, G, output) - _distance(T, M, output)) / _distance(M, G, output), -1, 1)
    w = (1 + r) / 2
    if output == "categorical":
        with np.errstate(divide="ignore"):  # w = 0 or 1: log 0 = -inf leaves the other predictor alone
            mixture = np.logaddexp(np.log(w) + M, np.log1p(-w) + G)
    else:
        mixture = w * M + (1 - w) * G
    return _distance(T, mixture, output)


def interpolation_cutoffs(groups: Sequence, Ds: Sequence[int], steps: Sequence[int], distances: Sequence[float],
                          fraction: float) -> dict:
    """RI's find_approximate_interpolation_threshold (rational-icl src/code/analysis_utils.py): for each (group, D),
    over its checkpoints (all runs pooled), the threshold min + fraction (max - min) of the interpolation distances
    and the first step (ascending) whose distance is below it (inf if none); a group's cut-off is the largest over
    its D values. Checkpoints at or after their group's cut-off are the ones RI fits. Returns {group: cut-off step}."""
    by_group_D: dict[tuple, list[tuple[int, float]]] = {}
    for group, D, step, distance in zip(groups, Ds, steps, distances, strict=True):
        by_group_D.setdefault((group, D), []).append((step, distance))
    cutoffs: dict = {}
    for (group, _), points in by_group_D.items():
        points.sort(key=lambda point: point[0])
        values = [d for _, d in points]
        threshold = min(values) + (max(values) - min(values)) * fraction
        first_below = next((step for step, d in points if d < threshold), math.inf)
        cutoffs[group] = max(cutoffs.get(group, -math.inf), first_below)
    return cutoffs
