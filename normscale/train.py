"""Train one run: `python -m normscale.train <overrides>` or `accelerate launch ... -m normscale.train <overrides>`.

config -> data (step-indexed batches) -> model -> Accelerate (DDP | FSDP | DeepSpeed by launch config) -> loop:
checkpoints on the schedule (step 0 included) with the rolling resume state, per-task training metrics at logging
steps, ID/OOD evaluation every `eval_every` steps, SIGTERM/SIGUSR1 -> save resume state and exit cleanly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch

from normscale.checkpoints import append_jsonl, remove_temporaries, truncate_metrics
from normscale.config import Config, InterruptedRunError, RunFailedError, RunHeldError, RunRefusedError
from normscale.data import load_eval_splits, open_train_batches, plan_data, prepare_data
from normscale.data.seeds import stream_seed
from normscale.data.store import check_budget, rank_rows, to_torch
from normscale.dist.accel import (check_replicas_identical, decided_on_main, finish_process, keep_freed_memory,
                                  load_resume, make_accelerator, prepare, save_checkpoint, save_resume)
from normscale.fileio import write_json
from normscale.layout import (CONFIG_FILE, EVAL_METRICS, FAILED_FILE, TRAIN_METRICS, identity_diff, identity_hash,
                              list_checkpoints, max_steps_change, read_config, read_failure, resume_states, resume_step,
                              run_directory, write_config)
from normscale.metrics import sequence_losses, task_metrics
from normscale.model import build_model
from normscale.model.mup import optimizer_groups
from normscale.provenance import provenance
from normscale.layout import LOCK_FILE
from normscale.runlock import RunLock


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
    """SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT set a flag; the loop saves its resume state at the next step boundary and
    stops (SIGINT, Ctrl-C, then exits 130). A handler installed before ours for that signal (submitit's
    checkpoint-and-requeue on USR2, under hydra/launcher=slurm) runs once the state is saved: that is submitit's
    checkpoint/requeue contract."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.training = False  # before the loop, Ctrl-C interrupts at once (data generation can take minutes)
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def interrupted(self) -> bool:
        return self.signum == signal.SIGINT

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and (not self.training or self.interrupted):  # before the loop, or a second Ctrl-C
            raise KeyboardInterrupt
        self.signum = signum

    def hand_over(self) -> None:
        previous = self.previous.get(self.signum)
        if callable(previous) and not self.interrupted:  # Python's own SIGINT handler would raise KeyboardInterrupt
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


class TrainingMetrics:
    """Per-task loss sums and counts since the last logging step, and the number of non-finite gradient norms: tensors
    on the device, so accumulating them costs no host synchronisation. They travel with the resume state, so a run
    resumed between logging steps writes the records an uninterrupted one would."""

    def __init__(self, num_tasks: int, device):
        self.state = {"task_loss": torch.zeros(num_tasks, device=device),
                      "task_count": torch.zeros(num_tasks, device=device),
                      "nonfinite_grads": torch.zeros(1, device=device)}

    def add(self, task_ids: torch.Tensor, losses: torch.Tensor, grad_norm) -> None:
        self.state["task_loss"].index_add_(0, task_ids, losses.detach().float())
        self.state["task_count"].index_add_(0, task_ids, torch.ones_like(losses, dtype=torch.float32))
        if grad_norm is not None:
            self.state["nonfinite_grads"] += ~torch.isfinite(torch.as_tensor(grad_norm, device=self.state["task_loss"].device))

    def load(self, state: dict[str, torch.Tensor] | None) -> None:
        for name, tensor in (state or {}).items():
            self.state[name].copy_(tensor)

    def reduced(self, accelerator) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(per-task loss sums, counts, whether everything since the last reset is finite) over all ranks: a host
        synchronisation, so only at logging steps and before saves."""
        sums = accelerator.reduce(torch.cat([self.state["task_loss"], self.state["task_count"],
                                             self.state["nonfinite_grads"]]), "sum")
        D = len(self.state["task_loss"])
        loss, count, nonfinite = sums[:D], sums[D:2 * D], sums[2 * D]
        return loss, count, bool(torch.isfinite(loss).all()) and nonfinite.item() == 0

    def reset(self) -> None:
        for tensor in self.state.values():
            tensor.zero_()


def inspect_run(config: Config, run_dir: Path) -> int:
    """The steps a run directory has trained (0 for a new run, or one that overwrite=true replaces), after refusing
    what must not continue it: a failed run, another identity, a max_steps the schedule cannot follow."""
    if config.overwrite:
        return 0
    if not (run_dir / CONFIG_FILE).exists():
        if resume_states(run_dir) or list_checkpoints(run_dir):
            raise RunRefusedError(f"run {run_dir} has checkpoints or a resume state but no {CONFIG_FILE}, so what it "
                                  "trained is unknown; overwrite=true replaces it, or choose another name=")
        return 0
    failure = read_failure(run_dir)
    if failure:
        raise RunRefusedError(f"run {run_dir} failed at step {failure['step']} ({failure['reason']}); overwrite=true "
                          "trains it again (or train the changed config under another name=)")
    saved = read_config(run_dir)
    differ = identity_diff(saved, config, ignore=("training_kwargs.max_steps",))
    if differ:
        raise RunRefusedError(f"run {run_dir} was trained with another config ({'; '.join(differ)}); choose another "
                          "name= for this one, or overwrite=true to replace that run")
    done = resume_step(run_dir) or 0
    reason = max_steps_change(saved, config, done)
    if reason:
        raise RunRefusedError(f"run {run_dir} cannot continue: {reason}; choose another name=, or overwrite=true")
    return done


def replace_run(run_dir: Path) -> None:
    """overwrite=true, once everything is validated: remove the old run's files (the lock stays, it is ours)."""
    for path in run_dir.iterdir():
        if path.name != LOCK_FILE:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def prepare_run_files(config: Config, run_dir: Path, overrides: list[str], replacing: bool) -> None:
    """The main process, holding the lock, once everything is validated: replace the old run (overwrite=true), drop
    what killed writers left, write the config."""
    if replacing:
        replace_run(run_dir)
    remove_temporaries(run_dir)
    write_config(run_dir, config, overrides)


def fail_run(run_dir: Path, step: int, last_finite: int, reason: str) -> None:
    """Record the run as failed and drop checkpoints written after the last finite check (main process)."""
    write_json(run_dir / FAILED_FILE, {"step": step, "last_finite_step": last_finite, "reason": reason})
    for saved_step, path in list_checkpoints(run_dir):
        if saved_step > last_finite:
            shutil.rmtree(path)


def train(config: Config, overrides: list[str]) -> Path:
    preemption = Preemption()  # first: a signal during start-up stops the run at its first step boundary
    keep_freed_memory()
    accelerator = make_accelerator(config)
    run_dir = run_directory(config, overrides)
    check_budget(config, plan_data(config))  # data problems surface before anything is written
    lock = RunLock(run_dir) if accelerator.is_main_process else None
    try:
        note = decided_on_main(accelerator, lambda: lock.acquire())
        if note:
            accelerator.print(f"normscale: {note}")
        done = decided_on_main(accelerator, lambda: inspect_run(config, run_dir))
        if done == config.training_kwargs.max_steps:  # a finished sweep point: skip before touching data
            accelerator.print(f"normscale: {run_dir} is complete ({done} steps); overwrite=true trains it again")
            return run_dir
        replacing = config.overwrite and (run_dir / CONFIG_FILE).exists()
        prepared = prepare_data(config, verify=replacing)  # one process generates, the others wait and reuse
        decided_on_main(accelerator, lambda: prepare_run_files(config, run_dir, overrides, replacing))
        run_loop(config, run_dir, prepared, accelerator, preemption, lock)
    finally:
        if lock is not None:
            lock.release()
        preemption.restore()
    return run_dir


def run_loop(config: Config, run_dir: Path, prepared, accelerator, preemption: Preemption, lock: RunLock | None) -> None:
    training = config.training_kwargs
    rank, world = accelerator.process_index, accelerator.num_processes
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
    metrics = TrainingMetrics(config.task_kwargs.num_tasks, accelerator.device)
    start, accumulators, record = load_resume(accelerator, run_dir, identity_hash(config))
    metrics.load(accumulators)
    origin = provenance()
    if accelerator.is_main_process:
        truncate_metrics(run_dir, start)
    if start:
        accelerator.print(f"normscale: resumed at step {start}")
        if record.get("provenance", origin)["code_version"] != origin["code_version"]:
            accelerator.print(f"normscale: note: the code changed since this run was saved "
                              f"({record['provenance']['code_version']} -> {origin['code_version']})")

    batches = open_train_batches(config, prepared, rank, world, accelerator.device)
    splits = {s: to_torch(a, config.setting, accelerator.device) for s, a in load_eval_splits(prepared.plan.directory).items()}
    schedule = set(config.checkpoint_steps) | {0}
    B = training.batch_size
    identity = {"identity_hash": identity_hash(config), "provenance": origin}
    meta = {**identity, "setting": config.setting, "model": config.model, "batch_size": B, "world_size": world}

    def checkpoint(step: int) -> None:
        save_checkpoint(accelerator, model, run_dir, step,
                        {**meta, "step": step, "sequences_seen": step * B, "tokens_seen": step * B * tokens_per_sequence(config)})

    from tqdm.auto import tqdm
    progress = tqdm(total=training.max_steps, initial=start, desc=f"{config.name} seed={config.seed}",
                    dynamic_ncols=True, disable=not accelerator.is_main_process)
    last_finite = start

    def check_finite(step: int, finite: bool) -> None:
        nonlocal last_finite
        if finite:
            last_finite = step
            return
        reason = f"the training loss or gradient norm is not finite between steps {last_finite} and {step}"
        if accelerator.is_main_process:
            fail_run(run_dir, step, last_finite, reason)
        raise RunFailedError(f"run {run_dir} failed: {reason}; recorded in {FAILED_FILE}, checkpoints up to step "
                             f"{last_finite} kept; lower training_kwargs.learning_rate, then train it again with "
                             "overwrite=true")

    if start == 0:
        checkpoint(0)
    wandb_run = init_wandb(config, run_dir, run_dir.name) if config.logging.wandb and accelerator.is_main_process else None
    micro = training.gradient_accumulation_steps
    last_log = time.perf_counter()
    done, results = start, None
    preemption.training = True

    with progress:  # closed before any error line is printed
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
                metrics.add(chunk["task_ids"], losses, grad_norm)
            scheduler.step()
            done = step + 1
            progress.update(1)

            logging_step = done % training.log_every == 0 or done == training.max_steps
            if logging_step:
                loss, count, finite = metrics.reduced(accelerator)
                check_finite(done, finite)
                record = {"step": done, "loss": (loss.sum() / count.sum()).item(), "lr": scheduler.get_last_lr()[0],
                          "grad_norm": None if grad_norm is None else float(grad_norm),
                          "sequences_seen": done * B, "tokens_seen": done * B * tokens_per_sequence(config),
                          "seconds_per_step": (time.perf_counter() - last_log) / training.log_every,
                          "per_task_loss": (loss / count.clamp_min(1)).tolist(), "per_task_count": count.tolist()}
                metrics.reset()
                last_log = time.perf_counter()
                if decided_on_main(accelerator, lambda: lock.lost):
                    raise RunHeldError(f"run {run_dir}: another process took over its lock (this one was judged "
                                       "dead); stopping without saving")
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
            stopping = done < training.max_steps and preemption_agreed(preemption, accelerator, done, training.log_every)
            if (done in schedule or stopping) and not logging_step:
                check_finite(done, metrics.reduced(accelerator)[2])  # nothing non-finite is ever saved
            if done in schedule:
                checkpoint(done)
            if done in schedule or stopping:
                save_resume(accelerator, run_dir, done, metrics.state, identity)
            if stopping:
                accelerator.print(f"normscale: preempted; resume state saved at step {done}")
                preemption.hand_over()
                break

    check_replicas_identical(accelerator, model)
    if wandb_run:
        wandb_run.finish()
    if preemption.interrupted and done < training.max_steps:
        raise InterruptedRunError(f"interrupted (Ctrl-C) at step {done}: resume state saved in {run_dir}; "
                                  "the same command resumes it")
    if done == training.max_steps and results is not None:
        summary = ", ".join(f"{s} {k} {v:.4f}" for s, r in results.items() for k, v in r.items())
        accelerator.print(f"normscale: trained {done} steps; {summary}; checkpoints in {run_dir}")


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
