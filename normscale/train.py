"""Train one run: `python -m normscale.train <overrides>` or `accelerate launch ... -m normscale.train <overrides>`.

config -> data (step-indexed batches) -> model -> Accelerate (DDP | FSDP | DeepSpeed by launch config) -> loop:
checkpoints on the schedule (step 0 included) with the rolling resume state, per-task training metrics at logging
steps, ID/OOD evaluation every `eval_every` steps, SIGTERM/SIGUSR1 -> save resume state and exit cleanly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch

import normscale
from normscale.checkpoints import (EVAL_METRICS, TRAIN_METRICS, append_jsonl, resume_step, truncate_metrics,
                                   write_config)
from normscale.config import Config
from normscale.data import load_eval_splits, open_train_batches, plan_data, prepare_data
from normscale.data.seeds import stream_seed
from normscale.data.store import check_budget, rank_rows, to_torch
from normscale.layout import run_name
from normscale.dist.accel import (check_replicas_identical, finish_process, keep_freed_memory, load_resume,
                                  make_accelerator, prepare, save_checkpoint, save_resume)
from normscale.metrics import sequence_losses, task_metrics
from normscale.model import build_model
from normscale.model.mup import optimizer_groups


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup over `warmup` steps, then constant, linear decay to 0, or cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Preemption:
    """SIGTERM / SIGUSR1 / SIGUSR2 set a flag; the loop saves its resume state at the next step boundary and exits.
    A handler installed before ours for that signal (submitit's checkpoint-and-requeue on USR2, under
    hydra/launcher=slurm) runs once the state is saved: that is submitit's checkpoint/requeue contract."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.signum: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        self.signum = signum

    def hand_over(self) -> None:
        previous = self.previous.get(self.signum)
        if callable(previous):
            previous(self.signum, None)

    def restore(self) -> None:
        """The handlers from before this run (the next run of a -m sweep in this process installs its own)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def tokens_per_sequence(config: Config) -> int:
    C = config.task_kwargs.context_length
    return {"balls_and_urns": C + 1, "linear_regression": 2 * C, "classification": 2 * C - 1}[config.setting]


def init_wandb(config: Config, run_dir: Path, name: str):
    """A wandb run whose id derives from the run directory (a resumed run continues it); offline without a key."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    print(f"normscale: wandb {mode} (online needs WANDB_API_KEY; logging.wandb=false turns it off)", flush=True)
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=config.logging.project, name=f"{config.name}/{name}", id=run_id, resume="allow",
                      dir=str(run_dir), mode=mode, config=dataclasses.asdict(config))


@torch.no_grad()
def evaluate(model, config: Config, splits: dict, accelerator) -> dict[str, dict[str, float]]:
    """Mean loss and task metrics of SPEC C on the first num_eval_batches of each saved eval split; every rank
    scores its rows of each batch (so FSDP/ZeRO-3 forwards stay collective), sums are reduced."""
    ev = config.eval_kwargs
    rows = rank_rows(ev.batch_size, accelerator.process_index, accelerator.num_processes)
    model.eval()
    results = {}
    for split, arrays in splits.items():
        totals = None
        for b in range(ev.num_eval_batches):
            start = b * ev.batch_size
            batch = {n: t[start:start + ev.batch_size][rows] for n, t in arrays.items()}
            metrics = task_metrics(config.setting, model(batch), batch)
            sums = torch.stack([m.sum() for m in metrics.values()])
            totals = sums if totals is None else totals + sums
        totals = accelerator.reduce(totals, "sum") / (ev.batch_size * ev.num_eval_batches)
        results[split] = dict(zip(metrics, totals.tolist()))
    model.train()
    return results


def prepare_run_dir(config: Config, run_dir: Path, accelerator) -> None:
    if config.overwrite and accelerator.is_main_process and run_dir.exists():
        shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()
    run_dir.mkdir(parents=True, exist_ok=True)


def train(config: Config, overrides: list[str]) -> Path:
    preemption = Preemption()  # first: a signal during start-up stops the run at its first step boundary
    keep_freed_memory()
    accelerator = make_accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    name = run_name(overrides, config.seed)
    run_dir = config.experiment_dir / "runs" / name
    training = config.training_kwargs
    check_budget(config, plan_data(config))  # data problems surface before anything is written
    prepare_run_dir(config, run_dir, accelerator)
    done = resume_step(run_dir)
    if done == training.max_steps:  # a finished sweep point: skip before touching data
        accelerator.print(f"normscale: {run_dir} is complete ({done} steps); overwrite=true trains it again")
        preemption.restore()
        return run_dir
    prepared = prepare_data(config)  # one process generates, the others wait on the lock and reuse
    if accelerator.is_main_process:
        write_config(run_dir, config, overrides)
    accelerator.print(f"normscale: run {run_dir} on {world} process(es), {accelerator.distributed_type}, "
                      f"device {accelerator.device}")

    torch.manual_seed(stream_seed(config.seed, "init"))
    model = build_model(config)
    if training.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay those of the plain model
    optimizer = torch.optim.AdamW(optimizer_groups(model, training.learning_rate, training.weight_decay),
                                  betas=(training.adam_beta1, training.adam_beta2), eps=training.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, training.warmup_steps, training.max_steps, training.lr_schedule))
    model, optimizer, scheduler = prepare(accelerator, model, optimizer, scheduler)
    start = load_resume(accelerator, run_dir)
    if accelerator.is_main_process:
        truncate_metrics(run_dir, start)
    if start:
        accelerator.print(f"normscale: resumed at step {start}")

    batches = open_train_batches(config, prepared, rank, world, accelerator.device)
    splits = {s: to_torch(a, config.setting, accelerator.device) for s, a in load_eval_splits(prepared.plan.directory).items()}
    schedule = set(config.checkpoint_steps) | {0}
    B, D = training.batch_size, config.task_kwargs.num_tasks
    meta = {"config_hash": hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()[:16],
            "code_version": normscale.__version__, "setting": config.setting, "model": config.model,
            "batch_size": B, "world_size": world}

    def checkpoint(step: int) -> None:
        save_checkpoint(accelerator, model, run_dir, step,
                        {**meta, "step": step, "sequences_seen": step * B, "tokens_seen": step * B * tokens_per_sequence(config)})

    if start == 0:
        checkpoint(0)
    wandb_run = init_wandb(config, run_dir, name) if config.logging.wandb and accelerator.is_main_process else None
    task_loss = torch.zeros(D, device=accelerator.device)
    task_count = torch.zeros(D, device=accelerator.device)
    micro = training.gradient_accumulation_steps
    progress = None
    if accelerator.is_main_process:
        from tqdm.auto import tqdm
        progress = tqdm(total=training.max_steps, initial=start, desc=f"{config.name} seed={config.seed}", dynamic_ncols=True)
    last_log = time.perf_counter()

    for step in range(start, training.max_steps):
        batch = batches.batch(step)
        for part in range(micro):
            chunk = {n: t.chunk(micro)[part] for n, t in batch.items()}
            with accelerator.accumulate(model):
                losses = sequence_losses(config.setting, model(chunk), chunk)
                accelerator.backward(losses.mean())
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), training.max_grad_norm) \
                    if accelerator.sync_gradients else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            task_loss.index_add_(0, chunk["task_ids"], losses.detach().float())
            task_count.index_add_(0, chunk["task_ids"], torch.ones_like(losses, dtype=torch.float32))
        scheduler.step()
        done = step + 1
        if progress is not None:
            progress.update(1)

        if done % training.log_every == 0 or done == training.max_steps:
            sums = accelerator.reduce(torch.stack([task_loss, task_count]), "sum")
            per_task = (sums[0] / sums[1].clamp_min(1)).tolist()
            record = {"step": done, "loss": (sums[0].sum() / sums[1].sum()).item(), "lr": scheduler.get_last_lr()[0],
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "sequences_seen": done * B, "tokens_seen": done * B * tokens_per_sequence(config),
                      "seconds_per_step": (time.perf_counter() - last_log) / training.log_every,
                      "per_task_loss": per_task, "per_task_count": sums[1].tolist()}
            task_loss.zero_()
            task_count.zero_()
            last_log = time.perf_counter()
            if accelerator.is_main_process:
                append_jsonl(run_dir / TRAIN_METRICS, record)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                if wandb_run:
                    wandb_run.log({k: v for k, v in record.items() if not k.startswith("per_task")}, step=done)
        if done % training.eval_every == 0 or done == training.max_steps:
            results = evaluate(model, config, splits, accelerator)
            if accelerator.is_main_process:
                append_jsonl(run_dir / EVAL_METRICS, {"step": done, **results})
                if wandb_run:
                    wandb_run.log({f"eval/{s}/{k}": v for s, r in results.items() for k, v in r.items()}, step=done)
        if done in schedule:
            checkpoint(done)
            save_resume(accelerator, run_dir, done)
        if done < training.max_steps and preemption_agreed(preemption, accelerator, done, training.log_every):
            if done not in schedule:
                save_resume(accelerator, run_dir, done)
            accelerator.print(f"normscale: preempted; resume state saved at step {done}")
            preemption.hand_over()
            break

    preemption.restore()
    if progress is not None:
        progress.close()
    check_replicas_identical(accelerator, model)
    if wandb_run:
        wandb_run.finish()
    if done == training.max_steps:
        summary = ", ".join(f"{s} {k} {v:.4f}" for s, r in results.items() for k, v in r.items())
        accelerator.print(f"normscale: trained {done} steps; {summary}; checkpoints in {run_dir}")
    return run_dir


def preemption_agreed(preemption: Preemption, accelerator, step: int, every: int) -> bool:
    """Whether all ranks stop now. One process checks its flag every step; several agree (a collective, so a host
    sync) only at logging steps, so that every rank stops at the same step."""
    if accelerator.num_processes == 1:
        return preemption.requested
    if step % every:
        return False
    flag = torch.tensor([float(preemption.requested)], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def main() -> None:
    from normscale.cli import hydra_main

    hydra_main(train, with_overrides=True)
    finish_process()


if __name__ == "__main__":
    main()
