"""The settings protocol (normscale/settings): a contract every registered setting meets, the one scorer shared by
training and evaluation, and a fourth setting added from outside normscale (tests/toy_setting.py) going through
train -> eval -> collate -> analysis."""
import json
import math
import os
import re
import struct

import numpy as np
import pytest
import torch

import toy_setting  # noqa: F401  (registers fixed_pattern)
from conftest import ROOT, run_module
from normscale import settings
from normscale.collate import read_results
from normscale.config import ConfigError, ModelConfig, TaskConfig
from normscale.metrics import metric_sums, summarize
from normscale.model.hf import HFGPTNeoX
from normscale.model.mlp import MLP
from normscale.model.transformer import Transformer
from normscale.results import load_metrics
from normscale.settings.base import SymbolSequence

TASK = TaskConfig(num_tasks=3, num_dims=4, context_length=6, num_ood_tasks=5)
ALL = settings.names()
assert "fixed_pattern" in ALL


def make(name: str, task: TaskConfig = TASK):
    return settings.get(name, task)


def pool(setting, num: int, seed: int = 0):
    return {k: torch.as_tensor(v) for k, v in setting.draw_tasks(num, np.random.default_rng(seed)).items()}


def predictors(setting, tasks) -> dict:
    """M (with a uniform prior over the TASK's D tasks), G and Const of `setting`."""
    log_prior = torch.full((TASK.num_tasks,), -math.log(TASK.num_tasks), dtype=torch.float64)
    return {kind: setting.predictor(kind, tasks, log_prior) for kind in ("memorizing", "generalizing", "const")}


def sequences(setting, tasks, num: int, seed: int = 0):
    D = len(next(iter(tasks.values())))
    weights = torch.full((D,), 1 / D, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.multinomial(weights, num, replacement=True, generator=generator)
    batch = setting.sample(tasks, ids, generator, weights)
    return batch | {name: tasks[source][ids] for name, source in setting.sequence_task_params.items()}


@pytest.mark.parametrize("name", ALL)
def test_batches_and_tasks_have_the_declared_layout(name):
    setting = make(name)
    tasks = pool(setting, TASK.num_tasks)
    assert {k: tuple(v.shape) for k, v in tasks.items()} == setting.task_shapes(TASK.num_tasks)
    batch = sequences(setting, tasks, 5)
    shapes = setting.batch_shapes(5)
    assert set(shapes) == set(setting.batch_arrays) and "task_ids" in shapes
    for key, (stored, used) in setting.batch_arrays.items():
        assert batch[key].dtype == used and tuple(batch[key].shape) == shapes[key], key
        as_stored = batch[key].numpy().astype(stored)
        assert np.array_equal(as_stored.astype(batch[key].numpy().dtype), batch[key].numpy()), f"{key} fits {stored}"
    assert isinstance(setting.tokens_per_sequence, int) and setting.tokens_per_sequence > 0
    assert {"id", "ood"} <= set(setting.eval_splits)


@pytest.mark.parametrize("name", ALL)
def test_sampling_is_a_function_of_the_generator(name):
    setting = make(name)
    tasks = pool(setting, TASK.num_tasks)
    first, again, other = (sequences(setting, tasks, 7, seed) for seed in (1, 1, 2))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if k != "task_ids")


@pytest.mark.parametrize("name", ALL)
def test_storage_limits_are_checked_before_any_data(name):
    make(name).check(TASK.num_tasks)
    with pytest.raises(ConfigError, match="int32"):
        make(name).check(2**31)


def networks(setting):
    io = setting.network_io
    model = ModelConfig(hidden_size=8, num_heads=2, num_layers=1)
    built = [Transformer(io, model), MLP(io, model)]
    if io.inputs == "pairs" or (io.output_size == io.input_size and io.predicts == "every"):
        built.append(HFGPTNeoX(io, model))
    return built


@pytest.mark.parametrize("name", ALL)
def test_networks_predict_in_the_convention_of_the_predictors(name):
    setting = make(name)
    tasks = pool(setting, TASK.num_tasks)
    batch = sequences(setting, tasks, 5)
    reference = predictors(setting, tasks)["memorizing"](batch)
    torch.manual_seed(0)
    for net in networks(setting):
        outputs = net(batch)
        objective = setting.objective(outputs, batch)
        assert objective.shape == (5,) and torch.isfinite(objective).all(), type(net).__name__
        objective.mean().backward()
        predictions = setting.predictions(outputs)
        assert predictions.shape == reference.shape and predictions.dtype == torch.float32, type(net).__name__
        if settings.facts(name).output == "categorical":
            assert torch.allclose(predictions.logsumexp(-1), torch.zeros(()), atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_pointwise_metrics_distances_and_mixtures(name):
    setting = make(name)
    tasks = pool(setting, TASK.num_tasks)
    batch = sequences(setting, tasks, 6)
    m, g = (setting.predictions(predictors(setting, tasks)[kind](batch)) for kind in ("memorizing", "generalizing"))
    per = setting.pointwise(m, batch)
    assert set(per) == {"loss", setting.metric}
    d = setting.distance(m, g)
    assert d.ndim == 2 and d.shape[0] == 6 and all(v.shape == d.shape for v in per.values())
    assert setting.strategy_loss(per, batch).shape == d.shape
    assert (d >= 0).all() and torch.allclose(d, setting.distance(g, m))
    assert torch.equal(setting.distance(m, m), torch.zeros_like(d))
    assert torch.allclose(setting.mixture(m, g, 1.0), m) and torch.allclose(setting.mixture(m, g, 0.0), g)
    halfway = setting.mixture(m, g, 0.5)
    assert (setting.distance(halfway, m) <= d + 1e-6).all()
    for predictions, w_m in ((m, 1.0), (g, 0.0)):
        assert summarize(setting, predictions, m, g, batch)["scalars"]["w_M"] == pytest.approx(w_m, abs=1e-6)
    sums, count = metric_sums(setting, m, batch)
    assert count == d.numel() and sums["loss"].item() == pytest.approx(per["loss"].double().sum().item())


@pytest.mark.parametrize("name", ALL)
def test_each_bayes_predictor_is_best_on_the_distribution_it_is_optimal_for(name):
    """M is Bayes-optimal on sequences of the D training tasks, G on tasks fresh from the prior, so each has the lower
    mean loss there (and neither is worse than Const where it is optimal). 4000 sequences keep the margins far
    above the sampling noise."""
    setting = make(name)
    tasks = pool(setting, TASK.num_tasks)
    bayes = predictors(setting, tasks)

    def mean_losses(batch):
        return {kind: setting.pointwise(setting.predictions(p(batch)), batch)["loss"].double().mean().item()
                for kind, p in bayes.items()}

    in_distribution = mean_losses(sequences(setting, tasks, 4000, seed=3))
    assert in_distribution["memorizing"] < in_distribution["generalizing"] <= in_distribution["const"] + 1e-9
    fresh = pool(setting, 200, seed=4)
    out_of_distribution = mean_losses(sequences(setting, fresh, 4000, seed=5))
    assert out_of_distribution["generalizing"] < out_of_distribution["memorizing"]
    assert out_of_distribution["generalizing"] <= out_of_distribution["const"] + 1e-9


def test_a_setting_missing_part_of_the_protocol_cannot_be_built():
    class Incomplete(SymbolSequence):  # no tasks, no sampling, no metrics, no predictors
        name = "incomplete"

    with pytest.raises(TypeError, match="abstract method.*draw_tasks"):
        Incomplete(TASK)


def test_unknown_settings_are_named_with_the_registered_ones():
    with pytest.raises(ValueError, match="unknown setting 'urns'.*balls_and_urns.*NORMSCALE_SETTINGS"):
        settings.get("urns", TASK)


# ---------------------------------------------------------------------- one scorer

TINY = ["name=scorer", "task_kwargs.num_dims=4", "task_kwargs.context_length=12", "task_kwargs.num_tasks=4",
        "task_kwargs.num_ood_tasks=8", "model_kwargs.hidden_size=16", "training_kwargs.batch_size=8",
        "training_kwargs.max_steps=20", "training_kwargs.warmup_steps=0", "training_kwargs.eval_every=20",
        "training_kwargs.save_steps.schedule=end_only", "data_kwargs.eval_size=48", "eval_kwargs.batch_size=16",
        "eval_kwargs.num_eval_batches=3"]


def wandb_history(run) -> list[dict]:
    """The history rows an offline wandb run wrote: its .wandb file is a LevelDB-style log (7-byte file header,
    32 KiB blocks of records: crc32, length, type 1 full / 2 first / 3 middle / 4 last) of Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    raw = next(run.glob("wandb/offline-run-*/*.wandb")).read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.parametrize("setting", ["balls_and_urns", "classification"])
def test_every_record_of_an_evaluation_agrees_on_each_metric(tmp_path, setting):
    """The in-training evaluation (eval_metrics.jsonl, wandb, the final line) and normscale.eval (metrics.pt, then
    metrics.h5) score the final checkpoint on the same sequences with the same function: the same numbers."""
    env = {"CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    trained = run_module("normscale.train", f"setting={setting}", *TINY, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = next((tmp_path / "cache" / "experiments" / setting / "scorer" / "runs").iterdir())
    for module in ("normscale.eval", "normscale.collate"):
        result = run_module(module, f"setting={setting}", *TINY, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    in_training = [json.loads(line) for line in (run / "eval_metrics.jsonl").read_text().splitlines()][-1]
    assert in_training["step"] == 20
    summary = wandb_history(run)[-1]
    final_line = dict(re.findall(r"(\w+ \w+) (-?[\d.]+)", trained.stdout.split("trained 20 steps;")[1].split("; checkpoints")[0]))
    evaluated = load_metrics(run / "checkpoint-20" / "metrics.pt")["splits"]
    frame = read_results(tmp_path / "cache" / "experiments" / setting / "scorer" / "metrics.h5")
    collated = frame[frame["checkpoint"] == 20].iloc[0]
    names = {"balls_and_urns": ("loss", "kl"), "classification": ("loss", "accuracy")}[setting]
    assert set(in_training) == {"step", *make(setting).eval_splits}
    for split in make(setting).eval_splits:
        assert set(in_training[split]) == set(names)
        for name in names:
            value = in_training[split][name]
            assert summary[f"eval/{split}/{name}"] == pytest.approx(value, rel=1e-12)
            assert float(final_line[f"{split} {name}"]) == pytest.approx(value, abs=5e-5)
            assert evaluated[split]["scalars"][name] == pytest.approx(value, rel=1e-6)
            assert collated["metrics"][split][name] == pytest.approx(value, rel=1e-6)
    train_record = json.loads((run / "train_metrics.jsonl").read_text().splitlines()[-1])
    assert "objective" in train_record and "loss" not in train_record
    assert summary["objective"] == pytest.approx(train_record["objective"], rel=1e-12)


# ---------------------------------------------------------------------- a fourth setting, from outside normscale

TOY = [f"hydra.searchpath=[file://{ROOT}/tests/toy_conf]", "setting=fixed_pattern", "name=toy", "logging.wandb=false",
       "task_kwargs.num_ood_tasks=20", "training_kwargs.batch_size=16",
       "training_kwargs.max_steps=60", "training_kwargs.save_steps.num_checkpoints=3",
       "training_kwargs.save_steps.first_step=10", "training_kwargs.eval_every=60", "data_kwargs.eval_size=64",
       "eval_kwargs.batch_size=32", "eval_kwargs.num_eval_batches=2", "eval_kwargs.fit_size=16",
       "eval_kwargs.strategy_loss_sequences=100"]


def test_a_setting_from_outside_normscale_goes_through_train_eval_collate_and_analysis(tmp_path):
    env = {"CACHE_DIR": str(tmp_path / "cache"), settings.PLUGINS_VARIABLE: "toy_setting",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    steps = [("normscale.train", "-m", "task_kwargs.num_tasks=2,16", "model_kwargs.hidden_size=16"),
             ("normscale.eval", "-m", "task_kwargs.num_tasks=2,16", "model_kwargs.hidden_size=16"),
             ("normscale.eval", "-m", "model=bayes", "model_kwargs.kind=memorizing,generalizing"),
             ("normscale.collate",), ("normscale.analysis",)]
    for module, *args in steps:
        flags = [a for a in args if a == "-m"]
        result = run_module(module, *flags, *TOY, *[a for a in args if a != "-m"], env=env)
        assert result.returncode == 0, (module, result.stderr[-3000:])
    experiment = tmp_path / "cache" / "experiments" / "fixed_pattern" / "toy"
    rows = [row for _, row in read_results(experiment / "metrics.h5").iterrows()]
    trained = [r for r in rows if r["model"] == "transformer"]
    assert len(trained) == 2 * 4 and {r["config"].task_kwargs.num_tasks for r in trained} == {2, 16}
    assert {r["kind"] for r in rows if r["model"] == "bayes"} == {"memorizing", "generalizing"}
    final = max((r for r in trained if r["config"].task_kwargs.num_tasks == 2), key=lambda r: r["checkpoint"])
    start = min((r for r in trained if r["config"].task_kwargs.num_tasks == 2), key=lambda r: r["checkpoint"])
    assert final["metrics"]["id"]["loss"] < start["metrics"]["id"]["loss"]  # it learnt something in 60 steps
    summary = json.loads((experiment / "analysis" / "summary.json").read_text())
    assert summary["setting"] == "fixed_pattern" and set(summary["final_w_M"]["id"]) == {"2", "16"}
    assert summary["complexity_bits"]["16"]["memorizing"] - summary["complexity_bits"]["2"]["memorizing"] == 32 * 14
