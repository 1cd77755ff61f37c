"""muP as normscale applies it: the same multipliers as the mup package, and a coordinate check with a control."""
import dataclasses
import math

import mup as mup_package
import numpy as np
import pytest
import torch
from torch import nn

from normscale.config import Config, ModelConfig, TaskConfig
from normscale.coord_check import coord_data, main, slopes
from normscale.model import build_model, optimizer_groups
from normscale.model.mup import attention_scale

TASK = TaskConfig(num_dims=4, context_length=8, num_tasks=6)
LR, WD = 1e-3, 0.1


def build(model, setting, hidden, parametrization="mup", base_width=32, **kwargs):
    kwargs = ModelConfig(**{"hidden_size": hidden, "num_heads": 2, "num_layers": 2, "base_width": base_width,
                            "mlp_expansion_factor": 4.0, "parametrization": parametrization, **kwargs})
    torch.manual_seed(0)
    return build_model(dataclasses.replace(Config(), model=model, setting=setting, task_kwargs=TASK, model_kwargs=kwargs))


def by_param(groups):
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("setting", ["balls_and_urns", "linear_regression", "classification"])
@pytest.mark.parametrize("model", ["transformer", "mlp"])
def test_multipliers_equal_mup_package(model, setting):
    """mup.set_base_shapes(base width, delta = twice it) + MuAdamW give each parameter the lr and weight decay
    optimizer_groups gives it, and the readout multiplier is MuReadout's 1/width_mult."""
    target = build(model, setting, 128)
    mup_package.set_base_shapes(target, build(model, setting, 32), delta=build(model, setting, 64),
                                rescale_params=False, do_assert=False)
    reference = by_param(mup_package.MuAdamW(target.parameters(), lr=LR, weight_decay=WD).param_groups)
    ours = by_param(optimizer_groups(target, LR, WD))
    names = {id(p): n for n, p in target.named_parameters()}
    assert ours.keys() == reference.keys()
    for key, (lr, wd) in reference.items():
        assert ours[key] == pytest.approx((lr, wd), rel=1e-12), names[key]
    assert {lr for lr, _ in ours.values()} == {LR, LR / 4}  # hidden weights at width_mult 4, the rest unscaled
    assert target.read_out.multiplier == pytest.approx(1 / target.read_out.weight.infshape.width_mult())
    assert (target.read_out.weight == 0).all()


@pytest.mark.parametrize("model", ["transformer", "mlp", "hf_gpt_neox"])
def test_sp_is_one_learning_rate(model):
    net = build(model, "linear_regression", 128, parametrization="sp")
    groups = optimizer_groups(net, LR, WD)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(LR, WD)]
    assert sum(len(g["params"]) for g in groups) == len([p for p in net.parameters() if p.requires_grad])


def test_groups_survive_wrapping():
    """Scales are stored at build time by name: wrappers (DDP-style .module, torch.compile) give the same groups."""
    net = build("transformer", "balls_and_urns", 128)
    plain = by_param(optimizer_groups(net, LR, WD))
    wrapper = nn.Module()
    wrapper.module = net
    assert by_param(optimizer_groups(wrapper, LR, WD)) == plain
    assert by_param(optimizer_groups(torch.compile(net), LR, WD)) == plain
    with pytest.raises(ValueError, match="build it with normscale.model.build_model"):
        optimizer_groups(nn.Linear(2, 2), LR, WD)


def test_attention_scale():
    base = ModelConfig(hidden_size=128, num_heads=2, base_width=128, parametrization="mup")
    assert attention_scale(base) == pytest.approx(1 / math.sqrt(64))  # mup and sp agree at the base width
    assert attention_scale(dataclasses.replace(base, hidden_size=512)) == pytest.approx(8 / 256)  # 1/d_head beyond
    assert attention_scale(dataclasses.replace(base, hidden_size=512, parametrization="sp")) == pytest.approx(1 / 16)


# Coordinate check: log-log slope of mean |activation| against width, averaged over the steps after the first
# update. Measured over 20 seeds at these sizes: mup |slope| <= 0.24 for every layer type, sp logits slope >= 0.6
# (urns and regression, transformer and MLP); the thresholds sit between the two.
WIDTHS, STEPS = (32, 64, 128, 256), 3
MUP_MAX_SLOPE, SP_MIN_LOGIT_SLOPE = 0.35, 0.45


def drift(model, setting, parametrization, seed):
    rows = coord_data(setting, parametrization, WIDTHS, STEPS, model, task=TaskConfig(num_dims=8, context_length=16, num_tasks=32),
                      model_kwargs=ModelConfig(num_layers=2, base_width=32), batch_size=16, seed=seed)
    slope = slopes(rows)
    layers = {layer for _, layer, _ in slope}
    return {layer: float(np.mean([slope[parametrization, layer, s] for s in range(1, STEPS + 1)])) for layer in layers}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("model,setting", [("transformer", "balls_and_urns"), ("transformer", "linear_regression"),
                                           ("mlp", "balls_and_urns")])
def test_coordinate_check(model, setting, seed):
    mup = drift(model, setting, "mup", seed)
    assert max(abs(s) for s in mup.values()) < MUP_MAX_SLOPE, mup
    sp = drift(model, setting, "sp", seed)  # negative control: the same check sees sp's logits grow with width
    assert sp["logits"] > SP_MIN_LOGIT_SLOPE, sp
    assert {"read-in", "logits"} < set(mup) and (model == "mlp" or {"attention", "mlp", "final hidden"} < set(mup))


def test_coord_check_command(tmp_path, capsys):
    main(["--widths", "16,32", "--steps", "1", "--base-width", "16", "--num-layers", "1", "--batch-size", "4",
          "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {"coord_check.png", "coord_check.csv", "coord_check.md"}
    csv = (tmp_path / "coord_check.csv").read_text().splitlines()
    assert csv[0] == "parametrization,step,layer,width 16,width 32,slope"
    assert len(csv) == 1 + 2 * 2 * 5  # both parametrizations x 2 steps x 5 layer types
    assert "| sp | 1 | logits |" in capsys.readouterr().out
