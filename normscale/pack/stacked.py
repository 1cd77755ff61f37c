"""Packs (DESIGN, "Packs"): N runs of one shape trained as one model whose parameters carry a leading run axis.

Each run keeps what its solo run has: its own initialisation (the caller builds its solo model under its init seed),
its own batches, learning-rate schedule (config.lr_factor with muP's per-parameter scales), clipping by its own
gradient norm, and its own AdamW state. StackedRuns steps them (`step(batches) -> PackStep`): one forward and
backward for all runs, torch.func.functional_call over a meta-device template under torch.func.vmap (stacked
matmuls; compiled with it under training_kwargs.compile), per-run clipping and a per-run AdamW on the stacked
tensors. Equal to solo up to fp32 rounding (batched
kernels sum in another order). StackedLoops steps normscale.train's Loops that way; a pack's other execution, its
runs in turn, is normscale.train's own step (run_loops).

A run steps when it is given a batch; pass None for one that does not (finished, stopped or failed): it is masked,
its rows still computed (the first given batch fills in) but its parameters, AdamW state and step count unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from normscale.config import TrainingConfig, lr_factor


@dataclass
class PackStep:
    """What one pack step gives per run: rows of runs that were not active are NaN (objectives, grad norms)."""
    active: list[bool]
    task_ids: torch.Tensor  # (N, B)
    objectives: torch.Tensor  # (N, B) per-sequence objectives, detached
    grad_norms: torch.Tensor  # (N,) each run's total gradient norm before clipping (what it logs)


def module_signature(model: nn.Module) -> list:
    """What besides parameter values defines a model's function: parameter names and shapes, muP scales, and every
    module's plain attributes (attention scale, readout multiplier, heads, context length...)."""
    plain = (int, float, str, bool, type(None))
    signature = [(name, tuple(p.shape), p.dtype) for name, p in model.named_parameters()]
    signature += [(name, type(m).__name__, sorted((k, v) for k, v in vars(m).items()
                                                   if not k.startswith("_") and isinstance(v, plain)))
                  for name, m in model.named_modules()]
    return signature + [sorted(getattr(model, "lr_scales", {}).items())]


def stack_batches(batches: Sequence[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Per-run batches -> one dict of (N, B, ...) tensors; None (a finished run) is filled with the first batch."""
    filler = next(b for b in batches if b is not None)
    batches = [filler if b is None else b for b in batches]
    return {name: torch.stack([b[name] for b in batches]) for name in filler}


def stepping(batches: Sequence[dict[str, torch.Tensor] | None], unfinished: list[bool]) -> list[bool]:
    """Which runs step: those given a batch, which must not have reached their max_steps."""
    given = [b is not None for b in batches]
    if any(g and not u for g, u in zip(given, unfinished)):
        raise ValueError(f"a batch was given to a run past its max_steps (runs given {given}, unfinished {unfinished})")
    return given


def run_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) per-run values shaped to broadcast against a stacked tensor (N, ...)."""
    return values.view(-1, *([1] * (like.ndim - 1)))


class StackedModel:
    """N models of one shape as stacked tensors: params[name] is (N, *solo shape), a leaf requiring grad."""

    def __init__(self, models: Sequence[nn.Module], compile: bool = False):
        signature = module_signature(models[0])
        for k, model in enumerate(models[1:], 1):
            if module_signature(model) != signature:
                raise ValueError(f"model {k} differs from model 0 in more than parameter values; a pack holds runs of "
                                 "one shape (and one parametrisation, base width, heads)")
        self.num_runs = len(models)
        self.params, self.buffers = stack_module_state(list(models))
        self.template = copy.deepcopy(models[0]).to("meta")  # the function; the values come from params
        self.lr_scales = dict(models[0].lr_scales)
        self.forward = torch.compile(self.stacked_forward) if compile else self.stacked_forward

    def stacked_forward(self, params, buffers, batch):
        def one_run(run_params, run_buffers, run_batch):
            return functional_call(self.template, (run_params, run_buffers), (run_batch,))
        return vmap(one_run)(params, buffers, batch)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, B, ...) batch tensors -> (N, B, ...) outputs, run k through its own parameters (compiled, vmap
        included, when the runs train compiled)."""
        return self.forward(self.params, self.buffers, batch)

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Run k's weights under the solo model's names (a solo checkpoint; loads into build_model's model)."""
        values = {**self.params, **self.buffers}
        return {name: values[name][k].detach().clone() for name in self.template.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Put a solo state dict (exactly the solo model's keys) into run k's slice."""
        values = {**self.params, **self.buffers}
        if set(state) != set(values):
            raise ValueError(f"state keys differ from the model's: missing {sorted(set(values) - set(state))}, "
                             f"unexpected {sorted(set(state) - set(values))}")
        for name, tensor in state.items():
            values[name][k].copy_(tensor)

    @torch.no_grad()
    def write_run(self, k: int, model: nn.Module) -> None:
        """Run k's values into `model`, a solo model of this shape, in place."""
        values = {**self.params, **self.buffers}
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(values[name][k])

    def unstack(self, k: int) -> nn.Module:
        """Run k as a solo model (a copy)."""
        model = copy.deepcopy(self.template).to_empty(device=next(iter(self.params.values())).device)
        model.load_state_dict(self.state_dict(k))
        return model


def clip_grad_norms_per_run(grads: dict[str, torch.Tensor], max_norms: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ for each run on its own slices: run k's total 2-norm over all its gradient slices, scaled by
    min(1, max_norm_k / (norm_k + 1e-6)). Returns the (N,) norms before clipping."""
    per_param = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()], dim=1)
    norms = torch.linalg.vector_norm(per_param, dim=1)
    coefficients = torch.clamp(max_norms / (norms + 1e-6), max=1.0)
    for g in grads.values():
        g.mul_(run_view(coefficients, g))
    return norms


class StackedAdamW:
    """torch.optim.AdamW (amsgrad off, maximize off; the per-tensor CPU implementation's order of operations) for each
    run on its slice of stacked parameters, with per-run hyperparameters and muP's per-parameter lr / wd scales.
    The schedule is config.lr_factor of each run's own step count, applied as LambdaLR does."""

    def __init__(self, params: dict[str, torch.Tensor], lr_scales: dict[str, tuple[float, float]],
                 trainings: Sequence[TrainingConfig]):
        self.params, self.lr_scales, self.trainings = params, lr_scales, list(trainings)
        self.steps = [0] * len(trainings)
        self.exp_avg = {name: torch.zeros_like(p) for name, p in params.items()}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in params.items()}
        device = next(iter(params.values())).device
        per_run = lambda f: torch.tensor([f(t) for t in self.trainings], dtype=torch.float32, device=device)
        self.one_minus_beta1 = per_run(lambda t: 1 - t.adam_beta1)
        self.beta2 = per_run(lambda t: t.adam_beta2)
        self.one_minus_beta2 = per_run(lambda t: 1 - t.adam_beta2)
        self.eps = per_run(lambda t: t.adam_eps)

    def learning_rate(self, k: int, lr_scale: float) -> float:
        """Run k's lr of a parameter group now: LambdaLR's base_lr * factor(step), base_lr = lr * muP scale."""
        t = self.trainings[k]
        return (t.learning_rate * lr_scale) * lr_factor(self.steps[k], t.warmup_steps, t.max_steps, t.lr_schedule)

    def scalars(self, active: list[bool], lr_scale: float, wd_scale: float) -> dict[str, torch.Tensor]:
        """(N,) fp32 step sizes, decay factors and sqrt bias corrections, computed in float64 as AdamW does."""
        step_size, decay, bias2_sqrt = [], [], []
        for k, t in enumerate(self.trainings):
            step = self.steps[k] + 1 if active[k] else max(self.steps[k], 1)  # inactive runs: any finite value
            lr = self.learning_rate(k, lr_scale)
            step_size.append(-(lr / (1 - t.adam_beta1 ** step)))
            decay.append(1 - lr * (t.weight_decay * wd_scale))
            bias2_sqrt.append((1 - t.adam_beta2 ** step) ** 0.5)
        device = self.eps.device
        return {name: torch.tensor(values, dtype=torch.float32, device=device)
                for name, values in (("step_size", step_size), ("decay", decay), ("bias2_sqrt", bias2_sqrt))}

    @torch.no_grad()
    def step(self, active: list[bool]) -> None:
        mask = torch.tensor(active, device=self.eps.device)
        by_scale = {scales: self.scalars(active, *scales) for scales in set(self.lr_scales.values())}
        for name, p in self.params.items():
            g, m, v = p.grad, self.exp_avg[name], self.exp_avg_sq[name]
            s = by_scale[self.lr_scales[name]]
            r = lambda values: run_view(values, p)
            new_p = p * r(s["decay"])
            new_m = torch.lerp(m, g, r(self.one_minus_beta1))
            new_v = torch.addcmul(v * r(self.beta2), r(self.one_minus_beta2) * g, g)  # addcmul_'s rounding
            denom = new_v.sqrt() / r(s["bias2_sqrt"]) + r(self.eps)
            new_p = new_p + (r(s["step_size"]) * new_m) / denom
            keep = r(mask)
            p.copy_(torch.where(keep, new_p, p))
            m.copy_(torch.where(keep, new_m, m))
            v.copy_(torch.where(keep, new_v, v))
        self.steps = [s + a for s, a in zip(self.steps, active)]

    def write_run_state(self, k: int, model: nn.Module, optimizer: torch.optim.AdamW) -> None:
        """Put run k's state into `optimizer`, a torch.optim.AdamW over `model` (run k's solo model, groups from
        optimizer_groups): its state_dict() is then the solo format."""
        for name, p in model.named_parameters():
            optimizer.state[p] = {"step": torch.tensor(float(self.steps[k])),
                                  "exp_avg": self.exp_avg[name][k].clone(),
                                  "exp_avg_sq": self.exp_avg_sq[name][k].clone()}

    @torch.no_grad()
    def read_run_state(self, k: int, model: nn.Module, optimizer: torch.optim.AdamW) -> None:
        """The reverse: run k's state from a solo AdamW over `model` (e.g. after optimizer.load_state_dict)."""
        steps = set()
        for name, p in model.named_parameters():
            state = optimizer.state[p]
            steps.add(int(state["step"]))
            self.exp_avg[name][k].copy_(state["exp_avg"])
            self.exp_avg_sq[name][k].copy_(state["exp_avg_sq"])
        if len(steps) != 1:
            raise ValueError(f"run {k}'s optimizer state holds several step counts {sorted(steps)}")
        self.steps[k] = steps.pop()


class StackedRuns:
    """N runs of one shape stepped together (see the module docstring). `autocast`: the forward's context, e.g.
    Accelerate's for bf16 mixed precision (solo runs get it from accelerator.prepare)."""

    def __init__(self, models: Sequence[nn.Module], settings: Sequence, trainings: Sequence[TrainingConfig],
                 autocast=contextlib.nullcontext):
        check_pack(models, settings, trainings)
        self.autocast = autocast
        self.model = StackedModel(models, compile=trainings[0].compile)
        self.setting = settings[0]  # its objective is per sequence and depends on the task only through shapes
        self.trainings = list(trainings)
        self.optimizer = StackedAdamW(self.model.params, self.model.lr_scales, trainings)
        self.max_norms = torch.tensor([t.max_grad_norm for t in trainings], dtype=torch.float32,
                                      device=self.optimizer.eps.device)

    @property
    def steps(self) -> list[int]:
        return self.optimizer.steps

    @property
    def active(self) -> list[bool]:
        return [s < t.max_steps for s, t in zip(self.steps, self.trainings)]

    def step(self, batches: Sequence[dict[str, torch.Tensor] | None]) -> PackStep:
        active = stepping(batches, self.active)
        batch = stack_batches(batches)
        with self.autocast():
            objectives = vmap(self.setting.objective)(self.model(batch), batch)
        objectives.mean(1).sum().backward()  # each run's parameters receive the gradient of its own mean
        grads = {name: p.grad for name, p in self.model.params.items()}
        norms = clip_grad_norms_per_run(grads, self.max_norms)
        self.optimizer.step(active)
        for p in self.model.params.values():
            p.grad = None
        mask = torch.tensor(active, device=norms.device)
        nan = torch.tensor(math.nan, device=norms.device)
        return PackStep(active, batch["task_ids"], torch.where(mask[:, None], objectives.detach(), nan),
                        torch.where(mask, norms.detach(), nan))

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        return self.model.state_dict(k)


def check_pack(models: Sequence[nn.Module], settings: Sequence, trainings: Sequence[TrainingConfig]) -> None:
    """One model, setting and training config per run; runs share the setting's class, batch size and compile."""
    if not len(models) == len(settings) == len(trainings) or not models:
        raise ValueError(f"a pack needs one model, setting and training config per run; got {len(models)}, "
                         f"{len(settings)}, {len(trainings)}")
    if len({type(s) for s in settings}) != 1 or len({(t.batch_size, t.compile) for t in trainings}) != 1:
        raise ValueError("runs of a pack share the setting, the batch size and training_kwargs.compile")
    if any(t.gradient_accumulation_steps != 1 for t in trainings):
        raise ValueError("packs train with gradient_accumulation_steps=1")


class StackedLoops:
    """A pack's training loops (normscale.train.Loop: model, optimizer and scheduler as Accelerate prepared them, a
    setting, a config, step-indexed batches, a step count) stepped as one StackedRuns. The stack holds the weights
    and AdamW state; each loop's solo model and optimizer are brought up to date from it by `sync` only where a
    hook reads them (evaluation, checkpoints, resume states), and its scheduler steps with it (the logged lr)."""

    def __init__(self, loops: Sequence):
        self.loops = list(loops)
        self.models = [loop.accelerator.unwrap_model(loop.model) for loop in self.loops]
        self.runs = StackedRuns(self.models, [loop.setting for loop in self.loops],
                                [loop.config.training_kwargs for loop in self.loops], self.loops[0].accelerator.autocast)
        for k, loop in enumerate(self.loops):
            if loop.step:  # resumed: its AdamW state continues in the stack
                self.runs.optimizer.read_run_state(k, self.models[k], loop.optimizer.optimizer)
            loop.stack, loop.stale = self, False

    def step(self, stepping: Sequence) -> None:
        """One step of the loops in `stepping` (the others are masked): each gets its chunks and grad_norm, as
        normscale.train.train_step gives them."""
        given = {id(loop) for loop in stepping}
        result = self.runs.step([loop.batches.batch(loop.step) if id(loop) in given else None for loop in self.loops])
        for k, loop in enumerate(self.loops):
            if result.active[k]:
                loop.chunks, loop.grad_norm = [(result.task_ids[k], result.objectives[k])], result.grad_norms[k]
                with warnings.catch_warnings():  # the stack stepped this run's weights, not its solo optimizer
                    warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                    loop.scheduler.step()
                loop.stale = True

    @torch.no_grad()
    def sync(self, loop) -> None:
        """Loop's solo model and optimizer state from the stack (then they are what a solo run would hold)."""
        if not loop.stale:
            return
        k = self.loops.index(loop)
        self.runs.model.write_run(k, self.models[k])
        self.runs.optimizer.write_run_state(k, self.models[k], loop.optimizer.optimizer)
        loop.stale = False
