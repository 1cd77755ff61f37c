"""Trainable models: the forward contract per setting, causality, determinism, learning, errors."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from normscale import settings
from normscale.config import Config, ModelConfig, TaskConfig
from normscale.data.priors import task_prior_weights
from normscale.model import BayesPredictor, build_model, optimizer_groups

SETTINGS = ("balls_and_urns", "linear_regression", "classification")
MODELS = ("transformer", "mlp", "hf_gpt_neox")
TASK = TaskConfig(num_dims=4, context_length=8, num_tasks=6)


def config(model="transformer", setting="balls_and_urns", **model_kwargs) -> Config:
    kwargs = ModelConfig(**{"hidden_size": 32, "num_heads": 2, "num_layers": 2, "base_width": 16, **model_kwargs})
    return dataclasses.replace(Config(), model=model, setting=setting, task_kwargs=TASK, model_kwargs=kwargs)


def make_batch(setting, batch_size=4, seed=0, task=TASK):
    s = settings.get(setting, task)
    tasks = {k: torch.as_tensor(v) for k, v in s.draw_tasks(task.num_tasks, np.random.default_rng(seed)).items()}
    weights = torch.as_tensor(task_prior_weights("uniform", task.num_tasks))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, task.num_tasks, (batch_size,), generator=generator)
    return s.sample(tasks, ids, generator, weights)


def built(model, setting, seed=0, **model_kwargs):
    torch.manual_seed(seed)
    return build_model(config(model, setting, **model_kwargs))


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("model", MODELS)
def test_output_shapes(model, setting):
    batch = make_batch(setting)
    out = built(model, setting)({**batch, "extra": torch.zeros(1)})
    B, C, V = 4, TASK.context_length, TASK.num_dims
    assert out.shape == {"balls_and_urns": (B, C, V + 1), "linear_regression": (B, C), "classification": (B, 2)}[setting]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def changed(a, b):
    return (a - b).abs().amax(dim=0)


@pytest.mark.parametrize("model", MODELS)
def test_urns_causal(model):
    net, batch = built(model, "balls_and_urns"), make_batch("balls_and_urns")
    t = 3  # output t reads tokens[:, :t+1]
    other = batch["tokens"].clone()
    other[:, t + 1:] = (other[:, t + 1:] + 1) % TASK.num_dims
    diff = changed(net(batch), net({**batch, "tokens": other})).amax(-1)
    assert diff[:t + 1].max() < 1e-5 and (diff[t + 1:] > 1e-4).all()


@pytest.mark.parametrize("model", MODELS)
def test_regression_causal(model):
    net, batch = built(model, "linear_regression"), make_batch("linear_regression")
    out, t = net(batch), 3
    ys = batch["ys"].clone()
    ys[:, t:] += 1.0  # y_t must not reach output t
    diff = changed(out, net({**batch, "ys": ys}))
    assert diff[:t + 1].max() < 1e-5 and (diff[t + 1:] > 1e-4).all()
    xs = batch["xs"].clone()
    xs[:, t:] += 1.0  # x_t does
    diff = changed(out, net({**batch, "xs": xs}))
    assert diff[:t].max() < 1e-5 and (diff[t:] > 1e-4).all()


@pytest.mark.parametrize("model", MODELS)
def test_classification_reads_query_and_context_not_query_label(model):
    net, batch = built(model, "classification"), make_batch("classification")
    out = net(batch)
    xs = batch["xs"].clone()
    xs[:, -1] += 1.0
    assert changed(out, net({**batch, "xs": xs})).min() > 1e-4
    labels = batch["labels"].clone()
    labels[:, 0] = 1 - labels[:, 0]
    assert changed(out, net({**batch, "labels": labels})).min() > 1e-6
    labels = batch["labels"].clone()
    labels[:, -1] = 1  # the query's label slot holds -1; whatever it holds is never read
    assert changed(out, net({**batch, "labels": labels})).max() == 0


@pytest.mark.parametrize("model", MODELS)
def test_deterministic_init(model):
    a, b, c = (built(model, "linear_regression", seed).state_dict() for seed in (0, 0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dtype.is_floating_point and a[k].std() > 0)


@pytest.mark.parametrize("parametrization", ["sp", "mup"])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("model", MODELS)
def test_overfits_a_tiny_batch(model, setting, parametrization):
    if model == "hf_gpt_neox" and parametrization == "mup":
        pytest.skip("hf_gpt_neox is standard parametrisation only")
    net, batch = built(model, setting, parametrization=parametrization), make_batch(setting, batch_size=8)
    objective = settings.get(setting, TASK).objective
    optimizer = torch.optim.AdamW(optimizer_groups(net, 1e-2, 0.0))
    losses = []
    for _ in range(40):
        loss = objective(net(batch), batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_transformer_is_gpt_neox():
    """Our Transformer computes exactly what transformers' GPTNeoXForCausalLM computes with the same weights."""
    ours, hf = built("transformer", "balls_and_urns", hidden_size=64), built("hf_gpt_neox", "balls_and_urns", hidden_size=64)
    renamed = {"read_in.weight": "net.gpt_neox.embed_in.weight", "read_out.weight": "net.lm_head.weight"}
    state = {renamed.get(k, f"net.gpt_neox.{k}"): v for k, v in ours.state_dict().items() if k != "read_out.bias"}
    hf.load_state_dict(state, strict=True)
    batch = make_batch("balls_and_urns")
    torch.testing.assert_close(ours(batch), hf(batch), rtol=1e-5, atol=1e-5)


def test_mlp_prefix_layer_equals_masked_flattened_input():
    """The cumulative-sum first layer equals a Linear over the explicitly masked, flattened prefix + one-hot of t."""
    net, batch = built("mlp", "linear_regression"), make_batch("linear_regression")
    xs, ys = batch["xs"], batch["ys"]
    B, C, d = xs.shape
    pre = net.read_in(xs, ys)
    t = torch.arange(C)
    blocks = torch.cat([xs, ys[..., None]], dim=-1)[:, None].expand(B, C, C, d + 1).clone()  # (B, t, s, k)
    blocks[..., :d] *= (t[None, :] <= t[:, None])[..., None]
    blocks[..., d] *= t[None, :] < t[:, None]
    flat = torch.cat([blocks.flatten(2), torch.eye(C).expand(B, C, C)], dim=-1)
    torch.testing.assert_close(pre, flat @ net.read_in.weight.T + net.read_in.bias, rtol=1e-5, atol=1e-5)


def test_build_model_errors():
    with pytest.raises(ValueError, match="model='gpt5'.*transformer, mlp, hf_gpt_neox, bayes"):
        build_model(config("gpt5"))
    with pytest.raises(ValueError, match="unknown setting 'urns'"):
        build_model(config(setting="urns"))
    with pytest.raises(ValueError, match="memorizing predictor needs the D training tasks"):
        build_model(dataclasses.replace(config("bayes"), model_kwargs=ModelConfig(kind="memorizing")))
    with pytest.raises(ValueError, match="model_kwargs.mlp_expansion_factor"):
        build_model(config("mlp", mlp_expansion_factor=0.01))
    with pytest.raises(ValueError, match="model_kwargs.hidden_size=30 must be divisible by model_kwargs.num_heads=4"):
        build_model(config(hidden_size=30, num_heads=4))
    with pytest.raises(ValueError, match="parametrization='mup' is not supported by model=hf_gpt_neox"):
        build_model(config("hf_gpt_neox", parametrization="mup"))
    with pytest.raises(ValueError, match="parametrization='xp'.*sp, mup"):
        build_model(config("mlp", parametrization="xp"))


def test_build_model_bayes():
    tasks = settings.get("balls_and_urns", TASK).draw_tasks(TASK.num_tasks, np.random.default_rng(0))
    log_prior = np.log(task_prior_weights("uniform", TASK.num_tasks))
    predictor = build_model(dataclasses.replace(config("bayes"), model_kwargs=ModelConfig(kind="memorizing")),
                            tasks, log_prior)
    assert isinstance(predictor, BayesPredictor)
    assert predictor(make_batch("balls_and_urns")).shape == (4, TASK.context_length, TASK.num_dims)


def test_importing_models_does_not_import_transformers():
    code = "import sys, normscale.model; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
