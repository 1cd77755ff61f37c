"""Packs (normscale.pack): each run of a pack is its solo run.

A pack of 3 runs differing in seed, D, task prior, learning rate, warmup, clipping norm and max_steps is trained
solo (the plain loop's pieces: build_model under the init seed, optimizer_groups + AdamW, LambdaLR with lr_factor,
clip_grad_norm_, the setting's objective on the run's own MixtureDataset batches) and packed; final weights agree to
1e-5, per-step objectives and grad norms closely. Through normscale.train's run_loops, in turn is bit-identical and
stacked close; one global clipping norm over the pack (the negative control) is not close.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from normscale import settings
from normscale.config import Config, ModelConfig, TaskConfig, TrainingConfig
from normscale.data import MixtureDataset, draw_task_pools
from normscale.data.seeds import stream_seed
from normscale.dist.accel import make_accelerator
from normscale.model import build_model, optimizer_groups
from normscale.pack.stacked import StackedRuns, stack_batches
from normscale.pack import stacked as stacked_module
from normscale.config import lr_factor
from normscale.train import Hook, Loop, run_loops, wrap

STEPS = 50
WEIGHT_TOLERANCE = 1e-5
CONTEXT = {"balls_and_urns": 16, "linear_regression": 8, "classification": 16}
# (seed, D, prior, learning rate, warmup, max_grad_norm, max_steps): run 0 is always clipped, run 1 never, run 2
# stops early.
RUNS = [(0, 4, "uniform", 1e-3, 0, 0.05, STEPS), (1, 16, "power_law", 3e-3, 5, 1e3, STEPS),
        (2, 64, "uniform", 2e-3, 10, 0.5, 30)]
COMBINATIONS = [(s, m, "sp") for s in CONTEXT for m in ("transformer", "mlp")] + \
               [("balls_and_urns", "transformer", "mup"), ("linear_regression", "mlp", "mup"),
                ("classification", "transformer", "mup")]


def pack_configs(setting: str, model: str, parametrization: str) -> list[Config]:
    model_kwargs = ModelConfig(hidden_size=16, num_layers=1 if model == "transformer" else 2, num_heads=2,
                               mlp_expansion_factor=2.0, parametrization=parametrization, base_width=8)
    return [dataclasses.replace(
        Config(), setting=setting, model=model, seed=seed, model_kwargs=model_kwargs,
        task_kwargs=TaskConfig(num_tasks=D, num_dims=4, context_length=CONTEXT[setting], prior=prior,
                               prior_exponent=1.5, num_ood_tasks=4),
        training_kwargs=TrainingConfig(learning_rate=lr, warmup_steps=warmup, max_grad_norm=max_norm,
                                       max_steps=max_steps, batch_size=8, weight_decay=0.01 * seed))
        for seed, D, prior, lr, warmup, max_norm, max_steps in RUNS]


def run_pieces(config: Config, device="cpu"):
    """What a run's solo loop starts from: its setting, its dataset (batches on `device`) and its model (init seed)."""
    setting = settings.get(config.setting, config.task_kwargs)
    dataset = MixtureDataset(setting, draw_task_pools(setting, config.seed)["train"], config.task_kwargs.prior,
                             config.training_kwargs.batch_size, config.seed, device)
    torch.manual_seed(stream_seed(config.seed, "init"))
    return setting, dataset, build_model(config)


def train_solo(config: Config):
    """The plain loop of normscale.train (one process, fp32): weights, per-step objectives and grad norms."""
    setting, dataset, model = run_pieces(config)
    t = config.training_kwargs
    optimizer = torch.optim.AdamW(optimizer_groups(model, t.learning_rate, t.weight_decay),
                                  betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.lr_schedule))
    objectives, norms = [], []
    for step in range(t.max_steps):
        batch = dataset.batch(step)
        losses = setting.objective(model(batch), batch)
        losses.mean().backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        objectives.append(losses.detach())
    return model, optimizer, torch.stack(objectives), torch.stack(norms)


def train_pack(configs: list[Config]):
    """The same runs as one StackedRuns; returns it, each run's objectives (steps, B) and grad norms."""
    pieces = [run_pieces(c) for c in configs]
    engine = StackedRuns([m for _, _, m in pieces], [s for s, _, _ in pieces], [c.training_kwargs for c in configs])
    objectives, norms = [[] for _ in configs], [[] for _ in configs]
    while any(engine.active):
        steps = list(engine.steps)
        result = engine.step([d.batch(steps[k]) if engine.active[k] else None for k, (_, d, _) in enumerate(pieces)])
        for k, active in enumerate(result.active):
            if active:
                objectives[k].append(result.objectives[k])
                norms[k].append(result.grad_norms[k])
    return engine, [torch.stack(o) for o in objectives], [torch.stack(n) for n in norms]


class Record(Hook):
    """Each step's objectives and gradient norm, as the step left them in the loop."""

    def __init__(self):
        self.objectives, self.norms = [], []

    def after_step(self, loop):
        ((_, losses),) = loop.chunks
        self.objectives.append(losses.detach())
        self.norms.append(loop.grad_norm)


def train_loops(configs: list[Config], stacked: bool):
    """The runs as normscale.train trains a pack: run_loops (stacked or in turn) over Loops built as start_run builds
    them (an Accelerator each, on the device it picks; the model under its init seed; wrap), with no run directory and
    no hooks but Record. Returns the loops (each model synced), each run's objectives (steps, B) and grad norms."""
    loops, records = [], []
    for config in configs:
        accelerator = make_accelerator(config)
        setting, dataset, model = run_pieces(config, accelerator.device)
        model, optimizer, scheduler = wrap(model, config.training_kwargs, accelerator)
        records.append(Record())
        loops.append(Loop(config, setting, None, accelerator, model, optimizer, scheduler, None, dataset,
                          [records[-1]]))
    assert run_loops(loops, stacked) == []
    for loop in loops:
        loop.sync()
    return loops, [torch.stack(r.objectives) for r in records], [torch.stack(r.norms) for r in records]


def weight_error(engine, solo_models) -> float:
    return max((engine.state_dict(k)[name] - value).abs().max().item()
               for k, model in enumerate(solo_models) for name, value in model.state_dict().items())


@pytest.fixture(scope="module")
def solo_runs():
    cache = {}

    def get(setting, model, parametrization):
        key = (setting, model, parametrization)
        if key not in cache:
            cache[key] = [train_solo(c) for c in pack_configs(*key)]
        return cache[key]
    return get


@pytest.mark.parametrize("setting,model,parametrization", COMBINATIONS)
def test_stacked_pack_matches_solo_runs(solo_runs, setting, model, parametrization):
    solos = solo_runs(setting, model, parametrization)
    engine, objectives, norms = train_pack(pack_configs(setting, model, parametrization))
    assert engine.steps == [max_steps for *_, max_steps in RUNS]
    max_norms = [max_norm for *_, max_norm, _ in RUNS]
    solo_norms = [n for *_, n in solos]
    assert (solo_norms[0] > max_norms[0]).any() and not (solo_norms[1] > max_norms[1]).any()  # clipping differs
    error = weight_error(engine, [m for m, *_ in solos])
    print(f"{setting} {model} {parametrization}: max |packed - solo| weight {error:.2e}")
    assert error <= WEIGHT_TOLERANCE
    for k, (_, _, solo_objectives, solo_grad_norms) in enumerate(solos):
        torch.testing.assert_close(objectives[k], solo_objectives, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norms[k], solo_grad_norms, rtol=1e-4, atol=1e-6)


def global_clipping(grads, max_norms):
    """The negative control: one norm over the whole pack, as clip_grad_norm_ over the stacked parameters gives."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    coefficients = torch.clamp(max_norms / (norm + 1e-6), max=1.0)
    for g in grads.values():
        g.mul_(stacked_module.run_view(coefficients, g))
    return norm.expand(len(max_norms))


def test_one_global_clipping_norm_does_not_match_solo_runs(solo_runs, monkeypatch):
    solos = solo_runs("balls_and_urns", "transformer", "sp")
    monkeypatch.setattr(stacked_module, "clip_grad_norms_per_run", global_clipping)
    engine, _, _ = train_pack(pack_configs("balls_and_urns", "transformer", "sp"))
    error = weight_error(engine, [m for m, *_ in solos])
    print(f"global clipping norm: max |packed - solo| weight {error:.2e}")
    assert error > 100 * WEIGHT_TOLERANCE


@pytest.mark.parametrize("stacked", [False, True], ids=["in_turn", "stacked"])
@pytest.mark.parametrize("setting,model,parametrization",
                         [("balls_and_urns", "mlp", "sp"), ("classification", "transformer", "mup")])
def test_run_loops_trains_each_run_of_a_pack_as_its_solo_run(solo_runs, setting, model, parametrization, stacked):
    """normscale.train's pack executions (Accelerate's prepare, clipping and schedule; runs of different max_steps):
    in turn is the plain solo loop bit for bit, stacked within WEIGHT_TOLERANCE."""
    solos = solo_runs(setting, model, parametrization)
    loops, objectives, norms = train_loops(pack_configs(setting, model, parametrization), stacked)
    assert [loop.step for loop in loops] == [max_steps for *_, max_steps in RUNS]
    for k, (solo_model, _, solo_objectives, solo_norms) in enumerate(solos):
        weights = loops[k].model.state_dict()
        if stacked:
            assert max((weights[n] - v).abs().max().item() for n, v in solo_model.state_dict().items()) \
                <= WEIGHT_TOLERANCE
            torch.testing.assert_close(objectives[k], solo_objectives, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(norms[k], solo_norms, rtol=1e-4, atol=1e-6)
        else:
            assert all(torch.equal(weights[n], v) for n, v in solo_model.state_dict().items())
            assert torch.equal(objectives[k], solo_objectives) and torch.equal(norms[k], solo_norms)


def test_a_compiled_stacked_pack_is_compiled_and_matches_its_eager_solo_runs(solo_runs):
    """training_kwargs.compile=true compiles the stacked forward (vmap inside the graph) instead of dropping it."""
    from torch._dynamo.utils import counters

    solos = solo_runs("balls_and_urns", "transformer", "sp")
    configs = [dataclasses.replace(c, training_kwargs=dataclasses.replace(c.training_kwargs, compile=True))
               for c in pack_configs("balls_and_urns", "transformer", "sp")]
    counters.clear()
    loops, _, _ = train_loops(configs, stacked=True)
    assert counters["stats"]["unique_graphs"] == 1 and counters["inductor"]  # one graph, made by inductor
    assert max((loops[k].model.state_dict()[n] - v).abs().max().item()
               for k, (model, *_) in enumerate(solos) for n, v in model.state_dict().items()) <= WEIGHT_TOLERANCE


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state whose mixed precision cannot change; bf16 runs need it cleared."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("setting,model", [("balls_and_urns", "transformer"), ("classification", "transformer")])
def test_a_bf16_stacked_pack_is_as_close_to_its_solo_runs_as_bf16_is_to_fp32(fresh_accelerator_state, setting, model):
    """bf16 autocast: stacked and solo round differently, but packing adds less than bf16 itself (max weight
    differences after 50 steps on CPU: urns 7e-4 against 2.1e-3, classification 2.5e-3 against 3.3e-3)."""
    from accelerate.state import AcceleratorState

    def weights_apart(a, b):
        return max((x.model.state_dict()[n] - v).abs().max().item() for x, y in zip(a, b)
                   for n, v in y.model.state_dict().items())

    fp32 = pack_configs(setting, model, "sp")
    bf16 = [dataclasses.replace(c, training_kwargs=dataclasses.replace(c.training_kwargs, precision="bf16")) for c in fp32]
    solo_bf16, _, _ = train_loops(bf16, stacked=False)
    packed_bf16, _, _ = train_loops(bf16, stacked=True)
    AcceleratorState._reset_state(True)
    solo_fp32, _, _ = train_loops(fp32, stacked=False)
    packing, precision = weights_apart(packed_bf16, solo_bf16), weights_apart(solo_bf16, solo_fp32)
    print(f"{setting} bf16: packed vs solo {packing:.2e}, bf16 vs fp32 solo {precision:.2e}")
    assert 0 < packing < precision


def test_run_state_round_trips_in_the_solo_formats(solo_runs):
    """Run k's weights load into a solo model; its AdamW state fills a solo torch.optim.AdamW whose state_dict has the
    solo layout and close values, and reads back into a fresh pack."""
    configs = pack_configs("linear_regression", "transformer", "sp")
    solos = solo_runs("linear_regression", "transformer", "sp")
    engine, _, _ = train_pack(configs)
    for k, (solo_model, solo_optimizer, _, _) in enumerate(solos):
        model = engine.model.unstack(k)
        model.load_state_dict(solo_model.state_dict())  # same names, strict
        t = configs[k].training_kwargs
        optimizer = torch.optim.AdamW(optimizer_groups(model, t.learning_rate, t.weight_decay),
                                      betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
        engine.optimizer.write_run_state(k, model, optimizer)
        exported, reference = optimizer.state_dict(), solo_optimizer.state_dict()
        assert exported["state"].keys() == reference["state"].keys()
        for index, state in reference["state"].items():
            assert state.keys() == exported["state"][index].keys()
            assert torch.equal(state["step"], exported["state"][index]["step"])
            for name in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(exported["state"][index][name], state[name], rtol=1e-3, atol=1e-9)

        fresh, _, _ = train_pack([dataclasses.replace(
            c, training_kwargs=dataclasses.replace(c.training_kwargs, max_steps=1)) for c in configs])
        fresh.model.load_state_dict(k, engine.state_dict(k))
        fresh.optimizer.read_run_state(k, model, optimizer)
        assert fresh.optimizer.steps[k] == engine.steps[k]
        assert all(torch.equal(fresh.state_dict(k)[n], v) for n, v in engine.state_dict(k).items())
        assert all(torch.equal(fresh.optimizer.exp_avg_sq[n][k], engine.optimizer.exp_avg_sq[n][k])
                   for n in engine.model.params)


def test_a_pack_refuses_models_of_another_shape():
    configs = pack_configs("balls_and_urns", "transformer", "sp")
    models = [run_pieces(c)[2] for c in configs[:2]]
    other = dataclasses.replace(configs[0], model_kwargs=dataclasses.replace(configs[0].model_kwargs, num_heads=1))
    with pytest.raises(ValueError, match="differs from model 0"):
        stacked_module.StackedModel([*models, run_pieces(other)[2]])


def test_stack_batches_fills_finished_runs():
    batches = [{"x": torch.ones(2)}, None]
    assert torch.equal(stack_batches(batches)["x"], torch.ones(2, 2))
