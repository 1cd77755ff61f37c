"""Task priors and the data-generating processes of SPEC A, checked statistically against their definitions."""
import math

import numpy as np
import pytest
import torch

from normscale import settings
from normscale.config import TaskConfig
from normscale.data import MixtureDataset, constant_freq_task_ids, draw_task_pools, make_eval_splits, task_prior_weights
from normscale.data.seeds import numpy_generator, torch_generator


# --- task priors --------------------------------------------------------------------------------------------------

def test_uniform_and_power_law_weights():
    assert np.allclose(task_prior_weights("uniform", 5), 0.2)
    w = task_prior_weights("power_law", 4, 2.0)
    expected = np.array([1, 1 / 4, 1 / 9, 1 / 16])  # (k+1)^-a: task 0 has the largest weight, never zero
    assert np.allclose(w, expected / expected.sum())
    assert w[0] > 0 and np.all(np.diff(w) < 0)
    assert np.allclose(task_prior_weights("power_law", 7, 0.0), 1 / 7)  # a = 0 is uniform


def test_power_law_sampling_frequencies_follow_the_weights():
    task = TaskConfig(num_tasks=6, num_dims=3, context_length=2, prior="power_law", prior_exponent=1.0)
    setting = settings.get("balls_and_urns", task)
    tasks = setting.draw_tasks(6, numpy_generator(0, "t"))
    dataset = MixtureDataset(setting, tasks, "power_law", batch_size=500, seed=1)
    ids = torch.cat([dataset.batch(step)["task_ids"] for step in range(40)]).numpy()
    observed = np.bincount(ids, minlength=6) / len(ids)
    expected = task_prior_weights("power_law", 6, 1.0)
    assert np.abs(observed - expected).max() < 4 * math.sqrt(expected[0] / len(ids))


@pytest.mark.parametrize("num_tasks, batch_size", [(5, 8), (16, 4), (3, 3)])
def test_constant_freq_rounds_have_exact_counts_across_batches(num_tasks, batch_size):
    task = TaskConfig(num_tasks=num_tasks, num_dims=3, context_length=2, prior="constant_freq")
    setting = settings.get("balls_and_urns", task)
    tasks = setting.draw_tasks(num_tasks, numpy_generator(0, "t"))
    dataset = MixtureDataset(setting, tasks, "constant_freq", batch_size=batch_size, seed=2)
    ids = torch.cat([dataset.batch(step)["task_ids"] for step in range(30)])
    rounds = ids[: len(ids) // num_tasks * num_tasks].reshape(-1, num_tasks)
    assert all(sorted(r.tolist()) == list(range(num_tasks)) for r in rounds)  # every task exactly once per round
    assert len({tuple(r.tolist()) for r in rounds}) > 1  # rounds are shuffled, not repeated


def test_constant_freq_windows_are_reproducible_without_history():
    whole = constant_freq_task_ids(0, 40, 7, seed=3)
    assert torch.equal(constant_freq_task_ids(13, 9, 7, seed=3), whole[13:22])
    assert not torch.equal(constant_freq_task_ids(0, 40, 7, seed=4), whole)


# --- balls_and_urns (A1) ------------------------------------------------------------------------------------------

def test_balls_and_urns_draw_tasks_has_the_dirichlet_moments():
    V, alpha = 5, 0.7
    setting = settings.get("balls_and_urns", TaskConfig(num_dims=V, dirichlet_alpha=alpha))
    theta = setting.draw_tasks(40_000, numpy_generator(0, "t"))["theta"]
    a0 = V * alpha
    assert np.allclose(theta.sum(1), 1)
    assert np.abs(theta.mean(0) - 1 / V).max() < 0.004
    assert np.allclose(theta.var(0), alpha * (a0 - alpha) / (a0 ** 2 * (a0 + 1)), rtol=0.05)


def test_balls_and_urns_sample_draws_colours_from_their_task():
    V, C = 4, 2000
    task = TaskConfig(num_tasks=3, num_dims=V, context_length=C)
    tasks = {"theta": torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25] * 4, [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)}
    weights = torch.full((3,), 1 / 3, dtype=torch.float64)
    batch = settings.get("balls_and_urns", task).sample(tasks, torch.tensor([0, 1, 2]), torch_generator(0, "s"), weights)
    tokens = batch["tokens"]
    assert tokens.shape == (3, C + 1) and torch.all(tokens[:, 0] == V) and torch.all(tokens[:, 1:] < V)
    freqs = torch.stack([torch.bincount(row[1:], minlength=V) / C for row in tokens]).double()
    assert torch.allclose(freqs, tasks["theta"], atol=4 * math.sqrt(0.25 / C))
    assert freqs[2, :2].sum() == 0  # a zero-probability colour is never drawn


# --- linear_regression (A2) ---------------------------------------------------------------------------------------

def test_linear_regression_draw_tasks_and_sample_have_the_spec_variances():
    d, C, B = 8, 64, 256
    task = TaskConfig(num_tasks=B, num_dims=d, context_length=C, weight_variance=2.0)
    setting = settings.get("linear_regression", task)
    w = setting.draw_tasks(20_000, numpy_generator(0, "t"))["w"]
    assert abs(w.var() - 2.0) < 0.03 and abs(w.mean()) < 0.01
    tasks = {"w": torch.from_numpy(w[:B])}
    weights = torch.full((B,), 1 / B, dtype=torch.float64)
    batch = setting.sample(tasks, torch.arange(B), torch_generator(0, "s"), weights)
    xs, ys = batch["xs"].double(), batch["ys"].double()
    assert abs(xs.var().item() - 1) < 0.02 and abs(xs.mean().item()) < 0.01
    noise = ys - torch.einsum("bcd,bd->bc", xs, tasks["w"])
    assert task.sigma2 == d / 256
    assert abs(noise.var().item() / (d / 256) - 1) < 0.03 and abs(noise.mean().item()) < 0.005


# --- classification (A3) ------------------------------------------------------------------------------------------

def test_classification_sample_noise_marginals_and_query_structure():
    d, C, D, B, w = 8, 16, 50, 4000, 0.5
    task = TaskConfig(num_tasks=D, num_dims=d, context_length=C, exemplar_noise=w)
    setting = settings.get("classification", task)
    exemplars = setting.draw_tasks(D, numpy_generator(0, "t"))
    tasks = {k: torch.from_numpy(v) for k, v in exemplars.items()}
    weights = torch.full((D,), 1 / D, dtype=torch.float64)
    ids = torch.multinomial(weights, B, replacement=True, generator=torch_generator(0, "ids"))
    batch = setting.sample(tasks, ids, torch_generator(0, "s"), weights)
    xs, ex = batch["xs"].double(), batch["exemplar_ids"]
    assert abs(xs.var().item() * d - 1) < 0.05  # x~ keeps the exemplars' variance 1/d
    noise = xs * math.sqrt(1 + w) - tasks["x"][ex]  # sqrt(w) eps, eps ~ N(0, I/d)
    assert abs(noise.var().item() * d / w - 1) < 0.02 and abs(noise.mean().item()) < 0.005
    assert torch.equal(ex[:, -1], ids)  # the query is the sequence's task
    assert torch.all((ex[:, :-1] == ids[:, None]).any(1))  # ... and copies a context exemplar
    assert torch.all(batch["labels"][:, -1] == -1)
    assert torch.equal(batch["labels"][:, :-1], tasks["y"][ex[:, :-1]])
    assert torch.equal(batch["query_labels"], tasks["y"][ids])
    iwl = setting.sample(tasks, ids, torch_generator(0, "s"), weights, exclude_query=True)
    assert not torch.any(iwl["exemplar_ids"][:, :-1] == ids[:, None])  # IWL: the query's exemplar is not in context
    labels = tasks["y"].double().mean().item()
    assert 0.3 < labels < 0.7


# --- streams and eval splits --------------------------------------------------------------------------------------

def test_task_pools_use_independent_streams():
    task = TaskConfig(num_tasks=10, num_dims=4, num_ood_tasks=10)
    setting = settings.get("balls_and_urns", task)
    pools = draw_task_pools(setting, seed=0)
    assert not np.allclose(pools["train"]["theta"], pools["ood"]["theta"])
    assert np.array_equal(pools["train"]["theta"], draw_task_pools(setting, seed=0)["train"]["theta"])
    assert not np.allclose(pools["train"]["theta"], draw_task_pools(setting, seed=1)["train"]["theta"])


@pytest.mark.parametrize("setting", ["balls_and_urns", "linear_regression", "classification"])
def test_eval_splits_carry_task_parameters_and_differ_from_training_batches(setting):
    task = TaskConfig(num_tasks=6, num_dims=4, context_length=64, num_ood_tasks=30)  # long: no chance repeats
    setting_obj = settings.get(setting, task)
    pools = draw_task_pools(setting_obj, seed=0)
    splits = make_eval_splits(setting_obj, pools, 256, seed=0)
    assert set(splits) == ({"id", "ood", "iwl"} if setting == "classification" else {"id", "ood"})
    assert tuple(splits) == setting_obj.eval_splits
    first = "tokens" if setting == "balls_and_urns" else "xs"
    train = MixtureDataset(setting_obj, pools["train"], "uniform", 256, seed=0)
    train_rows = {row.numpy().tobytes() for step in range(4) for row in train.batch(step)[first]}
    for split, arrays in splits.items():
        pool = pools["ood" if split == "ood" else "train"]
        ids = arrays["task_ids"]
        assert ids.max() < len(next(iter(pool.values())))
        if setting == "balls_and_urns":
            assert np.array_equal(arrays["theta"], pool["theta"][ids])
        elif setting == "linear_regression":
            assert np.array_equal(arrays["w"], pool["w"][ids])
        else:
            assert np.array_equal(arrays["query_x"], pool["x"][ids]) and np.array_equal(arrays["query_y"], pool["y"][ids])
        assert not {row.tobytes() for row in arrays[first]} & train_rows  # never the first training batches


def test_classification_sample_rejects_missing_or_too_few_exemplars():
    task = TaskConfig(num_tasks=1, num_dims=2, context_length=4)
    setting = settings.get("classification", task)
    tasks = {k: torch.from_numpy(v) for k, v in setting.draw_tasks(1, numpy_generator(0, "t")).items()}
    ids, g = torch.zeros(3, dtype=torch.int64), torch_generator(0, "s")
    with pytest.raises(TypeError, match="context_weights"):  # required of every setting now
        setting.sample(tasks, ids, g)
    with pytest.raises(ValueError, match="at least 2 exemplars"):
        setting.sample(tasks, ids, g, torch.ones(1, dtype=torch.float64), exclude_query=True)
