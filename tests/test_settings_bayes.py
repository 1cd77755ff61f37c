"""Bayes-optimal predictors (SPEC B) against closed forms, brute-force enumeration, float64 references and
Monte Carlo; M -> G on OOD data as D grows; chunking; output alignment; Bayes-optimality; input errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from normscale import settings
from normscale.config import TaskConfig
from normscale.data.priors import task_prior_weights
from normscale.data.seeds import numpy_generator, torch_generator
from normscale.model import BayesPredictor, build_bayes


def setup(setting, D, d, C, prior="uniform", exponent=1.0, seed=0, **task_kwargs):
    task = TaskConfig(num_tasks=D, num_dims=d, context_length=C, prior=prior, prior_exponent=exponent, **task_kwargs)
    tasks = settings.get(setting, task).draw_tasks(D, numpy_generator(seed, "train-tasks"))
    weights = task_prior_weights(prior, D, exponent)
    return task, tasks, torch.as_tensor(np.log(weights)), weights


def sequences(setting, task, tasks, weights, B, seed, exclude_query=False):
    """B sequences whose tasks are drawn from `weights` (the task prior over `tasks`)."""
    g = torch_generator(seed, "sequences")
    weights = torch.as_tensor(weights)
    ids = torch.multinomial(weights, B, replacement=True, generator=g)
    params = {k: torch.as_tensor(v) for k, v in tasks.items()}
    return settings.get(setting, task).sample(params, ids, g, weights, exclude_query=exclude_query)


def predictors(setting, task, tasks, log_prior, **kwargs):
    return {kind: build_bayes(setting, kind, task, tasks, log_prior, **kwargs)
            for kind in ("memorizing", "generalizing", "const")}


def urn_tokens(B, C, V, seed):
    draws = torch.randint(0, V, (B, C), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.full((B, 1), V), draws], dim=1)


def sym_kl(logp, logq):
    p, q = logp.exp(), logq.exp()
    return 0.5 * ((p * (logp - logq)).sum(-1) + (q * (logq - logp)).sum(-1))


# ---------------------------------------------------------------- balls_and_urns


def test_urns_generalizing_is_the_dirichlet_closed_form():
    V, C, alpha = 3, 6, 0.7
    task = TaskConfig(num_dims=V, context_length=C, dirichlet_alpha=alpha)
    tokens = urn_tokens(4, C, V, seed=1)
    out = build_bayes("balls_and_urns", "generalizing", task, None, None)({"tokens": tokens})
    assert out.shape == (4, C, V)
    for b in range(4):
        for t in range(C):  # output t has seen draws x_1..x_t = tokens[b, 1..t]
            seen = tokens[b, 1:t + 1].tolist()
            for v in range(V):
                expected = (seen.count(v) + alpha) / (t + V * alpha)
                assert math.isclose(out[b, t, v].exp().item(), expected, rel_tol=1e-12)


def brute_force_urns_m(tokens, theta, weights):
    """Posterior predictive by enumerating tasks: p(v | x_1..x_t) = sum_k p(k | x_1..x_t) theta_kv."""
    B, C, (D, V) = tokens.shape[0], tokens.shape[1] - 1, theta.shape
    out = np.zeros((B, C, V))
    for b in range(B):
        for t in range(C):
            joint = []
            for k in range(D):
                log_joint = math.log(weights[k])
                for i in range(1, t + 1):
                    log_joint += math.log(theta[k, tokens[b, i]])
                joint.append(log_joint)
            top = max(joint)
            post = [math.exp(j - top) for j in joint]
            total = sum(post)
            for v in range(V):
                out[b, t, v] = sum(post[k] / total * theta[k, v] for k in range(D))
    return out


@pytest.mark.parametrize("C", [5, 40])
def test_urns_memorizing_matches_enumeration_with_power_law_prior(C):
    D, V = 3, 3
    task, tasks, log_prior, weights = setup("balls_and_urns", D, V, C, prior="power_law", exponent=1.5)
    tokens = urn_tokens(4, C, V, seed=2)
    out = build_bayes("balls_and_urns", "memorizing", task, tasks, log_prior)({"tokens": tokens})
    expected = brute_force_urns_m(tokens, tasks["theta"], weights)
    np.testing.assert_allclose(out.exp().numpy(), expected, rtol=1e-10, atol=1e-13)

    # The prior matters: the uniform-prior predictor differs, and equals the uniform brute force.
    uniform = task_prior_weights("uniform", D)
    out_uniform = build_bayes("balls_and_urns", "memorizing", task, tasks, torch.as_tensor(np.log(uniform)))(
        {"tokens": tokens})
    np.testing.assert_allclose(out_uniform.exp().numpy(), brute_force_urns_m(tokens, tasks["theta"], uniform),
                               rtol=1e-10, atol=1e-13)
    assert (out.exp() - out_uniform.exp()).abs().max() > 1e-3


def test_urns_outputs_are_normalised_and_float32_agrees():
    task, tasks, log_prior, _ = setup("balls_and_urns", 50, 8, 64)
    tokens = urn_tokens(16, 64, 8, seed=3)
    for kind, model in predictors("balls_and_urns", task, tasks, log_prior).items():
        out = model({"tokens": tokens})
        torch.testing.assert_close(out.exp().sum(-1), torch.ones(16, 64, dtype=torch.float64))
        out32 = model.float()({"tokens": tokens})
        assert (out32.dtype == torch.float32) == (kind == "memorizing")  # G, Const: dtype fixed at build
        torch.testing.assert_close(out32.double(), out, atol=1e-4, rtol=1e-4)


def test_urns_alignment_output_t_sees_exactly_draws_1_to_t():
    V, C, t = 4, 10, 5
    task, tasks, log_prior, weights = setup("balls_and_urns", 6, V, C, prior="power_law")
    models = predictors("balls_and_urns", task, tasks, log_prior)
    tokens = urn_tokens(8, C, V, seed=4)
    out = {kind: m({"tokens": tokens}) for kind, m in models.items()}
    # Position 0 has seen nothing: G is the prior mean alpha / sum(alpha) = Const; M the prior mixture of thetas.
    torch.testing.assert_close(out["generalizing"][:, 0], out["const"][:, 0])
    prior_mix = torch.as_tensor(weights @ tasks["theta"]).log()
    torch.testing.assert_close(out["memorizing"][:, 0], prior_mix.expand(8, V))
    changed = tokens.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % V  # draw x_{t+1}
    for kind in ("memorizing", "generalizing"):
        new = models[kind]({"tokens": changed})
        torch.testing.assert_close(new[:, :t + 1], out[kind][:, :t + 1], rtol=0, atol=0)
        assert (new[:, t + 1] - out[kind][:, t + 1]).abs().amax(-1).gt(1e-3).all()


def test_urns_memorizing_chunking_is_exact():
    task, tasks, log_prior, _ = setup("balls_and_urns", 37, 5, 23, prior="power_law")
    tokens = urn_tokens(9, 23, 5, seed=5)
    big = build_bayes("balls_and_urns", "memorizing", task, tasks, log_prior)({"tokens": tokens})
    for budget in (1, 100, 37 * 23 + 1):
        small = build_bayes("balls_and_urns", "memorizing", task, tasks, log_prior, chunk_elements=budget)
        torch.testing.assert_close(small({"tokens": tokens}), big, rtol=0, atol=1e-14)


def test_urns_memorizing_approaches_generalizing_on_ood_as_d_grows():
    V, C = 8, 32
    ood_task, ood_tasks, _, ood_weights = setup("balls_and_urns", 256, V, C, seed=99)  # an independent seed
    tokens = sequences("balls_and_urns", ood_task, ood_tasks, ood_weights, 512, seed=7)["tokens"]
    g = build_bayes("balls_and_urns", "generalizing", ood_task, None, None)({"tokens": tokens})
    distances = []
    for D in (4, 64, 4096):
        task, tasks, log_prior, _ = setup("balls_and_urns", D, V, C, seed=0)
        m = build_bayes("balls_and_urns", "memorizing", task, tasks, log_prior)({"tokens": tokens})
        distances.append(sym_kl(m, g).mean().item())
    assert distances[0] > 3 * distances[1] > 9 * distances[2], distances
    assert distances[2] < 0.02, distances


def test_urns_bayes_optimality_id_and_ood():
    V, C, D = 8, 64, 8
    task, tasks, log_prior, weights = setup("balls_and_urns", D, V, C, prior="power_law")
    models = predictors("balls_and_urns", task, tasks, log_prior)

    def nll(tokens):
        targets = tokens[:, 1:, None]
        return {k: -m({"tokens": tokens}).gather(-1, targets).mean().item() for k, m in models.items()}

    ind = nll(sequences("balls_and_urns", task, tasks, weights, 512, seed=8)["tokens"])
    ood_task, ood_tasks, _, ood_weights = setup("balls_and_urns", 256, V, C, seed=99)
    ood = nll(sequences("balls_and_urns", ood_task, ood_tasks, ood_weights, 512, seed=9)["tokens"])
    assert ind["memorizing"] < ind["generalizing"] < ind["const"], ind
    assert ood["generalizing"] < ood["memorizing"] and ood["generalizing"] < ood["const"], ood


# ---------------------------------------------------------------- linear_regression


def regression_batch(B, C, d, seed, w=None, sigma2=0.1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(B, C, d, generator=g)
    w = torch.randn(B, d, generator=g) if w is None else w
    ys = torch.einsum("bcd,bd->bc", xs, w) + math.sqrt(sigma2) * torch.randn(B, C, generator=g)
    return {"xs": xs, "ys": ys}


def test_regression_memorizing_matches_enumeration():
    D, d, C = 4, 3, 6
    task, tasks, log_prior, weights = setup("linear_regression", D, d, C, prior="power_law", exponent=2.0,
                                            noise_variance=0.3)
    batch = regression_batch(3, C, d, seed=10, w=torch.as_tensor(tasks["w"][[0, 2, 3]]).float())
    out = build_bayes("linear_regression", "memorizing", task, tasks, log_prior)(batch)
    xs, ys, W = batch["xs"].double().numpy(), batch["ys"].double().numpy(), tasks["w"]
    for b in range(3):
        for t in range(C):
            logs = []
            for k in range(D):
                sse = sum((ys[b, i] - float(np.dot(W[k], xs[b, i]))) ** 2 for i in range(t))
                logs.append(math.log(weights[k]) - sse / (2 * 0.3))
            top = max(logs)
            post = np.array([math.exp(v - top) for v in logs])
            post /= post.sum()
            expected = sum(post[k] * float(np.dot(xs[b, t], W[k])) for k in range(D))
            assert math.isclose(out[b, t].item(), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_ridge_matches_float64_reference_solve_and_variance():
    d, C, sigma2, tau2 = 3, 7, 0.2, 1.7
    task = TaskConfig(num_dims=d, context_length=C, noise_variance=sigma2, weight_variance=tau2)
    batch = regression_batch(4, C, d, seed=11, sigma2=sigma2)
    g = build_bayes("linear_regression", "generalizing", task, None, None)
    mean, log_var = g(batch), g.predictive_log_variance(batch)
    const_log_var = build_bayes("linear_regression", "const", task, None, None).predictive_log_variance(batch)
    xs, ys, lam = batch["xs"].double().numpy(), batch["ys"].double().numpy(), sigma2 / tau2
    for b in range(4):
        for t in range(C):
            X, y, x = xs[b, :t], ys[b, :t], xs[b, t]
            A = X.T @ X + lam * np.eye(d)
            w_hat = np.linalg.solve(A, X.T @ y)
            assert math.isclose(mean[b, t].item(), x @ w_hat, rel_tol=1e-10, abs_tol=1e-12)
            var = sigma2 * (1 + x @ np.linalg.solve(A, x))
            assert math.isclose(log_var[b, t].exp().item(), var, rel_tol=1e-10)
            assert math.isclose(const_log_var[b, t].exp().item(), sigma2 + tau2 * x @ x, rel_tol=1e-10)
    assert (mean[:, 0] == 0).all()
    torch.testing.assert_close(log_var[:, 0], const_log_var[:, 0])


def test_regression_alignment_output_t_does_not_see_y_t():
    D, d, C, t = 16, 4, 12, 2
    task, tasks, log_prior, _ = setup("linear_regression", D, d, C, noise_variance=1.0)  # a posterior not yet sharp
    batch = regression_batch(6, C, d, seed=12)
    for kind in ("memorizing", "generalizing"):
        model = build_bayes("linear_regression", kind, task, tasks, log_prior)
        out = model(batch)
        changed_y = {"xs": batch["xs"], "ys": batch["ys"].clone()}
        changed_y["ys"][:, t] += 3.0
        new = model(changed_y)
        torch.testing.assert_close(new[:, :t + 1], out[:, :t + 1], rtol=0, atol=0)
        assert (new[:, t + 1] != out[:, t + 1]).all()
        changed_x = {"xs": batch["xs"].clone(), "ys": batch["ys"]}
        changed_x["xs"][:, t] *= -1.0
        new = model(changed_x)
        torch.testing.assert_close(new[:, :t], out[:, :t], rtol=0, atol=0)
        assert (new[:, t] != out[:, t]).all()


def test_regression_chunking_is_exact():
    task, tasks, log_prior, _ = setup("linear_regression", 29, 5, 11, prior="power_law")
    batch = regression_batch(7, 11, 5, seed=13)
    for kind in ("memorizing", "generalizing"):
        big = build_bayes("linear_regression", kind, task, tasks, log_prior)
        small = build_bayes("linear_regression", kind, task, tasks, log_prior, chunk_elements=1)
        torch.testing.assert_close(small(batch), big(batch), rtol=0, atol=1e-13)
    big, small = (build_bayes("linear_regression", "generalizing", task, None, None, chunk_elements=c)
                  for c in (2**24, 300))
    torch.testing.assert_close(small.predictive_log_variance(batch), big.predictive_log_variance(batch))


def test_regression_memorizing_approaches_ridge_on_ood_as_d_grows():
    d, C = 2, 8
    ood_task, ood_tasks, _, ood_weights = setup("linear_regression", 256, d, C, seed=99)
    batch = sequences("linear_regression", ood_task, ood_tasks, ood_weights, 512, seed=14)
    ridge = build_bayes("linear_regression", "generalizing", ood_task, None, None)(batch)
    distances = []
    for D in (4, 64, 4096):
        task, tasks, log_prior, _ = setup("linear_regression", D, d, C, seed=0)
        m = build_bayes("linear_regression", "memorizing", task, tasks, log_prior)(batch)
        distances.append((m - ridge).pow(2).mean().item())
    assert distances[0] > 3 * distances[1] > 9 * distances[2], distances
    assert distances[2] < 0.01 * ridge.pow(2).mean().item(), distances


def test_regression_bayes_optimality_id_and_ood():
    D, d, C = 8, 8, 16
    task, tasks, log_prior, weights = setup("linear_regression", D, d, C, prior="power_law")
    models = predictors("linear_regression", task, tasks, log_prior)

    def mse(batch):
        return {k: (m(batch) - batch["ys"]).pow(2).mean().item() for k, m in models.items()}

    ind = mse(sequences("linear_regression", task, tasks, weights, 512, seed=15))
    ood_task, ood_tasks, _, ood_weights = setup("linear_regression", 256, d, C, seed=99)
    ood = mse(sequences("linear_regression", ood_task, ood_tasks, ood_weights, 512, seed=16))
    assert ind["memorizing"] < ind["generalizing"] < ind["const"], ind
    assert ood["generalizing"] < ood["memorizing"] and ood["generalizing"] < ood["const"], ood


# ---------------------------------------------------------------- classification


def test_classification_memorizing_and_generalizing_match_enumeration():
    D, d, C, w = 5, 3, 6, 0.5
    task, tasks, log_prior, weights = setup("classification", D, d, C, prior="power_law", exponent=1.0)
    batch = sequences("classification", task, tasks, weights, 8, seed=17)
    models = predictors("classification", task, tasks, log_prior)
    xs, labels = batch["xs"].double().numpy(), batch["labels"].numpy()
    for kind, model in models.items():
        out = model(batch)
        assert out.shape == (8, 2)
        for b in range(8):
            q = xs[b, -1]
            if kind == "memorizing":
                logs = [math.log(weights[k]) - d / (2 * w) * sum((math.sqrt(1 + w) * q[i] - tasks["x"][k, i]) ** 2
                                                                 for i in range(d)) for k in range(D)]
                item_labels = tasks["y"]
            elif kind == "generalizing":
                logs = [-d * (1 + w) ** 2 / (2 * w * (2 + w)) * sum((q[i] - xs[b, j, i] / (1 + w)) ** 2
                                                                    for i in range(d)) for j in range(C - 1)]
                item_labels = labels[b, :-1]
            else:
                logs, item_labels = [0.0, 0.0], [0, 1]
            top = max(logs)
            post = [math.exp(v - top) for v in logs]
            p1 = sum(p for p, y in zip(post, item_labels) if y == 1) / sum(post)
            p1 = min(max(p1, 1e-5), 1 - 1e-5)
            np.testing.assert_allclose(out[b].exp().numpy(), [1 - p1, p1], rtol=1e-10)


def test_classification_generalizing_matches_monte_carlo_over_exemplar_prior():
    """p(query copies item j) = p(x~_q | x~_j) / sum, with p(x~_q | x~_j) = E_x[p(x~_q|x) p(x~_j|x)] / E_x[p(x~_j|x)]
    integrated by Monte Carlo over the exemplar prior x ~ N(0, I/d); all context items are distinct exemplars."""
    d, w, n_items = 2, 0.5, 4
    rng = np.random.default_rng(18)
    exemplars = rng.normal(0, math.sqrt(1 / d), size=(n_items, d))
    noised = (exemplars + rng.normal(0, math.sqrt(w / d), size=(n_items, d))) / math.sqrt(1 + w)
    query = (exemplars[1] + rng.normal(0, math.sqrt(w / d), size=d)) / math.sqrt(1 + w)
    var = w / (d * (1 + w))  # x~ | x ~ N(x / sqrt(1+w), var I)

    def density(z, x):  # (n, d) samples x -> p(z | x), shape (n,)
        return np.exp(-((z - x / math.sqrt(1 + w)) ** 2).sum(-1) / (2 * var)) / (2 * math.pi * var) ** (d / 2)

    repeats, per_repeat = 10, 200_000
    estimates = []
    for _ in range(repeats):
        x = rng.normal(0, math.sqrt(1 / d), size=(per_repeat, d))
        q_density = density(query, x)
        cond = np.array([(q_density * density(noised[j], x)).mean() / density(noised[j], x).mean()
                         for j in range(n_items)])
        estimates.append(cond / cond.sum())
    estimates = np.array(estimates)
    mc, stderr = estimates.mean(0), estimates.std(0, ddof=1) / math.sqrt(repeats)

    task = TaskConfig(num_dims=d, context_length=n_items + 1, exemplar_noise=w)
    model = build_bayes("classification", "generalizing", task, None, None)
    xs = torch.as_tensor(np.concatenate([noised, query[None]]))[None].expand(n_items, -1, -1)
    labels = torch.cat([torch.eye(n_items, dtype=torch.int64), torch.full((n_items, 1), -1)], dim=1)
    posterior = model({"xs": xs, "labels": labels})[:, 1].exp().numpy()  # row j: label 1 only on item j -> pi_j
    assert np.all(np.abs(posterior - mc) < 5 * stderr + 1e-4), (posterior, mc, stderr)
    assert mc.max() < 0.95 and mc.min() > 0.01  # a non-degenerate posterior, so the check has power

    # A plausible wrong likelihood (M's, treating x~_j as the clean exemplar) is rejected by the same check.
    wrong = np.exp(-d / (2 * w) * ((math.sqrt(1 + w) * query - noised) ** 2).sum(-1))
    assert np.any(np.abs(wrong / wrong.sum() - mc) > 5 * stderr + 1e-4)


def test_classification_chunking_is_exact():
    task, tasks, log_prior, weights = setup("classification", 23, 4, 9, prior="power_law")
    batch = sequences("classification", task, tasks, weights, 11, seed=19)
    for kind in ("memorizing", "generalizing"):
        big = build_bayes("classification", kind, task, tasks, log_prior)
        small = build_bayes("classification", kind, task, tasks, log_prior, chunk_elements=1)
        torch.testing.assert_close(small(batch), big(batch), rtol=0, atol=1e-14)


def test_classification_bayes_optimality_id_and_ood():
    D, d, C = 16, 8, 32
    task, tasks, log_prior, weights = setup("classification", D, d, C, prior="power_law")
    models = predictors("classification", task, tasks, log_prior)

    def ce(batch):
        return {k: -m(batch).gather(1, batch["query_labels"][:, None]).mean().item() for k, m in models.items()}

    ind = ce(sequences("classification", task, tasks, weights, 1024, seed=20))
    ood_task, ood_tasks, _, ood_weights = setup("classification", 512, d, C, seed=99)
    ood = ce(sequences("classification", ood_task, ood_tasks, ood_weights, 1024, seed=21))
    assert ind["memorizing"] < ind["generalizing"] < ind["const"], ind
    assert ood["generalizing"] < ood["const"] < ood["memorizing"], ood


# ---------------------------------------------------------------- input errors


def test_bad_input_raises_clear_errors():
    task, tasks, log_prior, weights = setup("balls_and_urns", 4, 3, 5)
    with pytest.raises(ValueError, match="unknown setting 'urns'"):
        build_bayes("urns", "memorizing", task, tasks, log_prior)
    with pytest.raises(ValueError, match="unknown Bayes predictor kind 'bayes'.*memorizing, generalizing, const"):
        build_bayes("balls_and_urns", "bayes", task, tasks, log_prior)
    with pytest.raises(ValueError, match="needs the D training tasks.*tasks=.*log_prior="):
        build_bayes("balls_and_urns", "memorizing", task, None, log_prior)
    with pytest.raises(ValueError, match="needs the D training tasks"):
        build_bayes("balls_and_urns", "memorizing", task, tasks, None)
    with pytest.raises(ValueError, match=r"need 'theta'; missing \['theta'\]"):
        build_bayes("balls_and_urns", "memorizing", task, {"w": tasks["theta"]}, log_prior)
    with pytest.raises(ValueError, match=r"theta has shape \(3, 3\), expected \(4, 3\)"):
        build_bayes("balls_and_urns", "memorizing", task, {"theta": tasks["theta"][:3]}, log_prior)
    with pytest.raises(ValueError, match=r"log_prior has shape \(5,\), expected \(4,\)"):
        build_bayes("balls_and_urns", "memorizing", task, tasks, torch.zeros(5))
    with pytest.raises(ValueError, match="not the weights themselves"):
        build_bayes("balls_and_urns", "memorizing", task, tasks, torch.as_tensor(weights))
    with pytest.raises(ValueError, match="probability vectors"):
        build_bayes("balls_and_urns", "memorizing", task, {"theta": tasks["theta"] * 2}, log_prior)
    model = build_bayes("balls_and_urns", "memorizing", task, tasks, log_prior)
    with pytest.raises(ValueError, match="batch needs 'tokens'"):
        model({"xs": torch.zeros(2, 5, 3)})
    with pytest.raises(ValueError, match="colours 0..2"):
        model({"tokens": urn_tokens(2, 5, 4, seed=0)})
    with pytest.raises(AttributeError, match="predictive_log_variance"):  # only linear_regression's predictor has it
        model.predictive_log_variance({"tokens": urn_tokens(2, 5, 3, seed=0)})

    rtask, rtasks, rlog_prior, _ = setup("linear_regression", 4, 3, 5)
    ridge = build_bayes("linear_regression", "generalizing", rtask, None, None)
    with pytest.raises(ValueError, match=r"do not match \(B, C, d=3\)"):
        ridge({"xs": torch.zeros(2, 5, 4), "ys": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="predictive_log_variance is defined"):
        build_bayes("linear_regression", "memorizing", rtask, rtasks, rlog_prior).predictive_log_variance(
            regression_batch(2, 5, 3, seed=0))
    ctask, ctasks, clog_prior, _ = setup("classification", 4, 3, 5)
    with pytest.raises(ValueError, match="must be 0 or 1"):
        build_bayes("classification", "memorizing", ctask, {"x": ctasks["x"], "y": ctasks["y"] + 1}, clog_prior)
    with pytest.raises(ValueError, match="C >= 2"):
        build_bayes("classification", "generalizing", ctask, None, None)(
            {"xs": torch.zeros(2, 1, 3), "labels": torch.full((2, 1), -1)})
    with pytest.raises(ValueError, match="chunk_elements=0"):
        settings.get("classification", ctask).predictor("const", chunk_elements=0)
    assert isinstance(build_bayes("classification", "const", ctask), BayesPredictor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predictors_on_gpu_match_cpu():
    for setting, d, C in (("balls_and_urns", 8, 64), ("linear_regression", 8, 16), ("classification", 8, 32)):
        task, tasks, log_prior, weights = setup(setting, 256, d, C, prior="power_law")
        batch = sequences(setting, task, tasks, weights, 64, seed=22)
        for kind, model in predictors(setting, task, tasks, log_prior).items():
            out = model.to("cuda")({k: v.cuda() for k, v in batch.items()})
            assert out.is_cuda
            torch.testing.assert_close(out.cpu(), model.cpu()(batch))
