"""Train one run: `python -m normscale.train <overrides>` or `accelerate launch ... -m normscale.train <overrides>`.

config -> data (step-indexed batches) -> model -> Accelerate (DDP | FSDP | DeepSpeed by launch config) -> loop:
checkpoints on the schedule (step 0 included) with the rolling resume state, per-task training metrics at logging
steps, ID/OOD evaluation every `eval_every` steps, SIGTERM/SIGUSR1 -> save resume state and exit cleanly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from normscale.checkpoints import append_jsonl, commit_pack, remove_temporaries, roll_forward, truncate_metrics
from normscale.config import (Config, ConfigError, InterruptedRunError, NormscaleError, RunFailedError, RunHeldError,
                              RunRefusedError, lr_factor)
from normscale.data import load_eval_splits, open_train_batches, plan_data, prepare_data
from normscale.data.seeds import stream_seed
from normscale.data.store import check_budget, rank_rows, to_torch
from normscale.dist import process_info
from normscale.dist.accel import (check_replicas_identical, decided_on_main, finish_process, keep_freed_memory,
                                  load_resume, make_accelerator, prepare, resume_info, save_checkpoint, save_resume,
                                  stage_resume)
from normscale.fileio import write_json
from normscale.layout import (CONFIG_FILE, EVAL_METRICS, FAILED_FILE, LOCK_FILE, TRAIN_METRICS, identity_diff,
                              identity_hash, list_checkpoints, max_steps_change, read_config, read_failure,
                              resume_states, resume_step, run_directory, write_config)
from normscale.metrics import metric_sums, predict
from normscale.model import build_model
from normscale.model.mup import optimizer_groups
from normscale.pack.forming import stacked
from normscale.pack.memory import check_fits
from normscale.pack.stacked import StackedLoops
from normscale.provenance import provenance
from normscale.runlock import RunLock
from normscale.settings import get as get_setting


class Preemption:
    """SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT set a flag; the loop saves its resume state at the next step boundary and
    stops (SIGINT, Ctrl-C, then exits 130). A handler installed before ours for that signal (submitit's
    checkpoint-and-requeue on USR2, under hydra/launcher=slurm) runs once the state is saved: that is submitit's
    checkpoint/requeue contract."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.training = False  # before the loop, Ctrl-C interrupts at once (data generation can take minutes)
        self.handed_over = False
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
        """Run the signal's previous handler, once per process (a pack's runs stop together)."""
        previous = self.previous.get(self.signum)
        if callable(previous) and not self.interrupted and not self.handed_over:  # Python's SIGINT handler would raise
            self.handed_over = True
            previous(self.signum, None)

    def restore(self) -> None:
        """The handlers from before this run (the next run of a -m sweep in this process installs its own)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def init_wandb(config: Config, run_dir: Path, name: str):
    """A wandb run whose id derives from the run directory (a resumed run continues it); offline without a key."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    print(f"normscale: wandb {mode} (online needs WANDB_API_KEY; logging.wandb=false turns it off)", flush=True)
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=config.logging.project, name=f"{config.name}/{name}", id=run_id, resume="allow",
                      dir=str(run_dir), mode=mode, config=dataclasses.asdict(config))


@torch.no_grad()
def evaluate(model, setting, config: Config, splits: dict, accelerator) -> dict[str, dict[str, float]]:
    """SPEC C's loss and task metric (normscale.metrics, as normscale.eval scores them) on the first
    num_eval_batches of each eval split (load_eval_splits); every rank scores its rows of each batch (so FSDP/ZeRO-3
    forwards stay collective), sums and counts are reduced."""
    ev = config.eval_kwargs
    rows = rank_rows(ev.batch_size, accelerator.process_index, accelerator.num_processes)
    model.eval()
    results = {}
    for split, arrays in splits.items():
        totals, names = None, None
        for b in range(ev.num_eval_batches):
            start = b * ev.batch_size
            batch = {n: t[start:start + ev.batch_size][rows] for n, t in arrays.items()}
            sums, count = metric_sums(setting, predict(setting, model, batch), batch)
            names = list(sums)
            sums = torch.stack([*sums.values(), torch.tensor(count, dtype=torch.float64, device=accelerator.device)])
            totals = sums if totals is None else totals + sums
        totals = accelerator.reduce(totals, "sum")
        results[split] = dict(zip(names, (totals[:-1] / totals[-1]).tolist()))
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
    """One run: config -> data -> model -> wrap -> loop, in the run directory the overrides name."""
    preemption = Preemption()  # first: a signal during start-up stops the run at its first step boundary
    keep_freed_memory()
    try:
        with ExitStack() as held:
            loop = open_run(config, overrides, preemption, held)
            if loop is not None:
                preemption.training = True
                for _, error in run_loops([loop]):
                    raise error
                finish(loop, preemption)
    finally:
        preemption.restore()
    return run_directory(config, overrides)


def train_pack(jobs: list[tuple[Config, list[str]]]) -> list[tuple[NormscaleError, list[str]]]:
    """Runs of one shape (normscale.pack.forming) trained in one process, each as `train` trains it alone and in its
    own run directory: stacked (one model with a leading run axis; equal to solo up to fp32 rounding) or their steps
    in turn (bit-identical), as pack_execution says. A run that cannot start (held elsewhere, refused) is left out
    with one line and one that fails (non-finite) leaves the pack; the others go on. Returns those errors, each with
    its run's overrides."""
    world = process_info().world_size
    if world > 1:
        raise ConfigError(f"pack={jobs[0][0].pack} under a launch of {world} processes: packs train in one process "
                          "for now (multi-process packs are not built); launch one process, or drop pack=")
    accelerator = make_accelerator(jobs[0][0])
    stack = stacked(jobs[0][0].pack_execution, accelerator.device.type)
    check_fits(jobs[0][0], len(jobs), stack, accelerator.device)
    preemption = Preemption()
    keep_freed_memory()
    problems = []
    try:
        with ExitStack() as held:
            def left_out(error, overrides):
                print(f"normscale: left out of the pack: {error}", file=sys.stderr, flush=True)
                problems.append((error, overrides))

            claims, loops = [], []
            for config, overrides in jobs:  # every run's data checked before any run writes a file
                try:
                    claims.append(claim_run(config, overrides, held))
                except (RunHeldError, RunRefusedError) as error:  # the rest of the pack trains
                    left_out(error, overrides)
            for claim in filter(None, claims):
                try:
                    loops.append((start_run(claim, preemption), claim.overrides))
                except RunRefusedError as error:  # e.g. a resume state of another identity
                    left_out(error, claim.overrides)
            print(f"normscale: training {len(loops)} run(s) as one pack, "
                  f"{'stacked' if stack else 'their steps in turn'}", flush=True)
            preemption.training = True
            failed = run_loops([loop for loop, _ in loops], stack, together=True)
            failed = {id(loop): error for loop, error in failed}
            for loop, overrides in loops:
                if id(loop) in failed:
                    print(f"normscale: {failed[id(loop)]}", file=sys.stderr, flush=True)
                    problems.append((failed[id(loop)], overrides))
                else:
                    finish(loop, preemption)
    finally:
        preemption.restore()
    return problems


def open_run(config: Config, overrides: list[str], preemption: Preemption, held: ExitStack) -> Loop | None:
    """Everything before the loop for one run (claim_run, then start_run). None when the run is complete."""
    claim = claim_run(config, overrides, held)
    return None if claim is None else start_run(claim, preemption)


@dataclasses.dataclass
class Claim:
    """A run whose lock is held and whose data are checked, nothing of it written yet."""
    config: Config
    overrides: list[str]
    accelerator: object
    run_dir: Path
    plan: object
    prepared: object
    lock: RunLock | None
    replacing: bool


def claim_run(config: Config, overrides: list[str], held: ExitStack) -> Claim | None:
    """The run's lock (released by `held`), the checks that refuse it, and its data (prepared, or refused when
    damaged) before anything of the run is written. None when the run is complete."""
    accelerator = make_accelerator(config)
    run_dir = run_directory(config, overrides)
    plan = plan_data(config)
    check_budget(config, plan)  # data problems surface before anything is written
    lock = RunLock(run_dir) if accelerator.is_main_process else None
    if lock is not None:
        held.callback(lock.release)
    note = decided_on_main(accelerator, lambda: lock.acquire())
    if note:
        accelerator.print(f"normscale: {note}")
    for note in decided_on_main(accelerator, lambda: roll_forward(run_dir)):  # a pack's save, committed before a kill
        accelerator.print(f"normscale: {run_dir.name}: {note}")
    done = decided_on_main(accelerator, lambda: inspect_run(config, run_dir))
    if done == config.training_kwargs.max_steps:  # a finished sweep point: skip before touching data
        accelerator.print(f"normscale: {run_dir} is complete ({done} steps); overwrite=true trains it again")
        return None
    replacing = config.overwrite and (run_dir / CONFIG_FILE).exists()
    prepared = prepare_data(config, plan, verify=replacing)  # one process generates, the others wait and reuse
    return Claim(config, overrides, accelerator, run_dir, plan, prepared, lock, replacing)


def start_run(claim: Claim, preemption: Preemption) -> Loop:
    """The run's files, model, wrapping and resume: its loop, ready to step."""
    config, accelerator, run_dir = claim.config, claim.accelerator, claim.run_dir
    decided_on_main(accelerator, lambda: prepare_run_files(config, run_dir, claim.overrides, claim.replacing))
    accelerator.print(f"normscale: run {run_dir} on {accelerator.num_processes} process(es), "
                      f"{accelerator.distributed_type}, device {accelerator.device}")

    setting = get_setting(config.setting, config.task_kwargs)
    batches = open_train_batches(config, claim.prepared, accelerator.process_index, accelerator.num_processes,
                                 accelerator.device)
    ev = config.eval_kwargs
    splits = {s: to_torch(a, setting, accelerator.device)
              for s, a in load_eval_splits(claim.plan.directory, ev.batch_size * ev.num_eval_batches).items()}
    torch.manual_seed(stream_seed(config.seed, "init"))
    model = build_model(config)
    model, optimizer, scheduler = wrap(model, config.training_kwargs, accelerator)
    hooks = [LogTraining(), Evaluate(splits), WandbLog(), ProgressBar(),
             SaveState(preemption, set(config.checkpoint_steps))]
    loop = Loop(config, setting, run_dir, accelerator, model, optimizer, scheduler, claim.lock, batches, hooks)
    loop.resume()
    return loop


def wrap(model, training, accelerator):
    """The optimizer and schedule of `model` (muP groups), all prepared by Accelerate (DDP | FSDP | DeepSpeed)."""
    if training.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay those of the plain model
    optimizer = torch.optim.AdamW(optimizer_groups(model, training.learning_rate, training.weight_decay),
                                  betas=(training.adam_beta1, training.adam_beta2), eps=training.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, training.warmup_steps, training.max_steps, training.lr_schedule))
    return prepare(accelerator, model, optimizer, scheduler)


def train_step(loop: Loop, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step on this rank's rows of a global batch, in gradient_accumulation_steps chunks: forward, the
    setting's objective, backward, clipping, AdamW, the schedule. Returns each chunk's (task_ids, objectives) and
    sets loop.grad_norm (None until gradients are synchronised)."""
    training, accelerator, model = loop.config.training_kwargs, loop.accelerator, loop.model
    micro = training.gradient_accumulation_steps
    chunks = []
    for part in range(micro):
        chunk = {n: t.chunk(micro)[part] for n, t in batch.items()}
        with accelerator.accumulate(model):
            losses = loop.setting.objective(model(chunk), chunk)
            accelerator.backward(losses.mean())
            loop.grad_norm = accelerator.clip_grad_norm_(model.parameters(), training.max_grad_norm) \
                if accelerator.sync_gradients else None
            loop.optimizer.step()
            loop.optimizer.zero_grad(set_to_none=True)
        chunks.append((chunk["task_ids"], losses))
    loop.scheduler.step()
    return chunks


def run_loops(loops: list[Loop], stacked: bool = False, together: bool = False) -> list[tuple[Loop, RunFailedError]]:
    """Step every loop until each is done (max_steps, or stopped by preemption): in turn, each by its own
    train_step, or (stacked) all at once as one model with a leading run axis (normscale.pack.stacked); after each
    step its hooks run in order, then (together: a pack's runs) the pack's save if due (PackSaves). A run whose
    training turns non-finite leaves with its error (returned); the others go on."""
    active, failed = list(loops), []
    stack = StackedLoops(loops) if stacked and loops else None
    saves = PackSaves(loops) if together and loops else None
    try:
        while active:
            if stack is not None:
                stack.step(active)
            for loop in list(active):
                try:
                    loop.advance(stepped=stack is not None)
                except RunFailedError as error:  # recorded in its run directory already
                    failed.append((loop, error))
                    active.remove(loop)
            for loop, error in saves.after_step(active) if saves else []:
                failed.append((loop, error))
                active.remove(loop)
            active = [loop for loop in active if not loop.done]
    finally:  # closed before any error line is printed
        for loop in loops:
            loop.close()
    return failed


class PackSaves:
    """A pack's resume states: saved for every run still training at once and committed as one transaction
    (checkpoints.commit_pack), so a kill never leaves its runs at different saves. A save is due at the checkpoint
    steps of the run that finishes last, at any run's last step, and when the pack stops (a signal stops all its runs
    at the same step). Checkpoints stay on each run's own schedule."""

    def __init__(self, loops: list[Loop]):
        for loop in loops:
            loop.packed = True
        self.lead(loops)

    def lead(self, loops: list[Loop]) -> None:
        self.leader = max(loops, key=lambda loop: loop.config.training_kwargs.max_steps - loop.step)
        self.leader_steps = set(self.leader.config.checkpoint_steps)

    def after_step(self, loops: list[Loop]) -> list[tuple[Loop, RunFailedError]]:
        """After every run's hooks: save if due. Returns the runs found non-finite on the way, which leave."""
        if not loops:
            return []
        if any(loop.stopping for loop in loops):  # the signal came while the pack's runs were taking their turns
            for loop in loops:
                loop.stopping = loop.step < loop.config.training_kwargs.max_steps
        if self.leader not in loops:  # it failed
            self.lead(loops)
        if not (self.leader.step in self.leader_steps
                or any(loop.stopping or loop.step == loop.config.training_kwargs.max_steps for loop in loops)):
            return []
        saving, failed = [], []
        for loop in loops:
            try:
                loop.check_saveable()
            except RunFailedError as error:
                failed.append((loop, error))
                continue
            stage_resume(loop.accelerator, loop.run_dir, loop.step, loop.metrics.state)
            saving.append(loop)
        if saving:
            commit_pack([(loop.run_dir, loop.step, resume_info(loop.accelerator, loop.identity)) for loop in saving])
        for loop in saving:
            if loop.stopping:
                loop.accelerator.print(f"normscale: preempted; resume state saved at step {loop.step} "
                                       f"({loop.run_dir.name})")
        return failed


def finish(loop: Loop, preemption: Preemption) -> None:
    """After the loop: a stopped run hands the signal on (submitit's requeue, once per process), the replica check,
    Ctrl-C's exit, the final line."""
    if loop.stopping:
        preemption.hand_over()
    loop.sync()
    check_replicas_identical(loop.accelerator, loop.model)
    done, max_steps = loop.step, loop.config.training_kwargs.max_steps
    if preemption.interrupted and done < max_steps:
        raise InterruptedRunError(f"interrupted (Ctrl-C) at step {done}: resume state saved in {loop.run_dir}; "
                                  "the same command resumes it")
    if done == max_steps and loop.results is not None:
        summary = ", ".join(f"{s} {k} {v:.4f}" for s, r in loop.results.items() for k, v in r.items())
        loop.accelerator.print(f"normscale: trained {done} steps; {summary}; checkpoints in {loop.run_dir}")


class Loop:
    """What the step and the hooks share: the run's objects and where training stands."""

    def __init__(self, config: Config, setting, run_dir: Path, accelerator, model, optimizer, scheduler,
                 lock: RunLock | None, batches, hooks: list[Hook]):
        self.config, self.setting, self.run_dir, self.accelerator = config, setting, run_dir, accelerator
        self.model, self.optimizer, self.scheduler, self.lock = model, optimizer, scheduler, lock
        self.batches, self.hooks, self.closed = batches, hooks, False
        self.metrics = TrainingMetrics(config.task_kwargs.num_tasks, accelerator.device)
        self.identity = {"identity_hash": identity_hash(config), "provenance": provenance()}
        self.step = self.last_finite = 0
        self.grad_norm = None
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.logged: dict[str, dict] = {}  # what this step logged, by kind ("train", "eval"), for the sinks
        self.results: dict | None = None  # the last evaluation
        self.stopping = False
        self.stack: StackedLoops | None = None  # a stacked pack's loop: its weights live there between syncs
        self.stale = False
        self.packed = False  # a pack's run: its resume states are the pack's (PackSaves)

    def advance(self, stepped: bool = False) -> None:
        """One training step (unless a stacked pack has just made it), then every hook."""
        if not stepped:
            self.chunks = train_step(self, self.batches.batch(self.step))
        self.step, self.logged = self.step + 1, {}
        for hook in self.hooks:
            hook.after_step(self)

    @property
    def done(self) -> bool:
        return self.stopping or self.step >= self.config.training_kwargs.max_steps

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for hook in self.hooks:
                hook.close(self)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def sync(self) -> None:
        """Bring the model and optimizer up to date before a hook reads them (only a stacked pack's lag)."""
        if self.stack is not None:
            self.stack.sync(self)

    def is_due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.config.training_kwargs.max_steps

    def seen(self, step: int) -> dict[str, int]:
        B = self.config.training_kwargs.batch_size
        return {"sequences_seen": step * B, "tokens_seen": step * B * self.setting.tokens_per_sequence}

    def resume(self) -> None:
        """Continue from the run's resume state, if any (else write checkpoint 0)."""
        start, accumulators, record = load_resume(self.accelerator, self.run_dir, self.identity["identity_hash"])
        self.metrics.load(accumulators)
        self.step = self.last_finite = start
        if self.is_main:
            truncate_metrics(self.run_dir, start)
        if start:
            self.accelerator.print(f"normscale: resumed at step {start}")
            origin = self.identity["provenance"]["code_version"]
            saved = record.get("provenance", self.identity["provenance"])["code_version"]
            if saved != origin:
                self.accelerator.print(f"normscale: note: the code changed since this run was saved ({saved} -> {origin})")
        else:
            self.save_checkpoint()

    def check_finite(self, finite: bool) -> None:
        """Record the run as failed (RunFailedError) if anything since the last check was not finite."""
        if finite:
            self.last_finite = self.step
            return
        reason = f"the training loss or gradient norm is not finite between steps {self.last_finite} and {self.step}"
        if self.is_main:
            fail_run(self.run_dir, self.step, self.last_finite, reason)
        raise RunFailedError(f"run {self.run_dir} failed: {reason}; recorded in {FAILED_FILE}, checkpoints up to step "
                             f"{self.last_finite} kept; lower training_kwargs.learning_rate, then train it again with "
                             "overwrite=true")

    def check_saveable(self) -> None:
        """Bring the model up to date and check that nothing non-finite would be saved (RunFailedError)."""
        self.sync()
        if "train" not in self.logged:  # a logging step has just checked
            self.check_finite(self.metrics.reduced(self.accelerator)[2])

    def save_checkpoint(self) -> None:
        training = self.config.training_kwargs
        meta = {**self.identity, "setting": self.config.setting, "model": self.config.model,
                "batch_size": training.batch_size, "world_size": self.accelerator.num_processes, "step": self.step,
                **self.seen(self.step)}
        save_checkpoint(self.accelerator, self.model, self.run_dir, self.step, meta)


class Hook:
    """A side effect of training: `after_step` runs after every optimizer step, `close` once the loop ends."""

    def after_step(self, loop: Loop) -> None:
        pass

    def close(self, loop: Loop) -> None:
        pass


class LogTraining(Hook):
    """Per-task objectives and gradient norms accumulate every step; at logging steps they are reduced, checked to be
    finite, and written to train_metrics.jsonl. Also where a run that lost its lock stops."""

    def __init__(self):
        self.last_log = time.perf_counter()

    def after_step(self, loop):
        for task_ids, losses in loop.chunks:
            loop.metrics.add(task_ids, losses, loop.grad_norm)
        if not loop.is_due(loop.config.training_kwargs.log_every):
            return
        loss, count, finite = loop.metrics.reduced(loop.accelerator)
        loop.check_finite(finite)
        every = loop.config.training_kwargs.log_every
        record = {"step": loop.step, "objective": (loss.sum() / count.sum()).item(), "lr": loop.scheduler.get_last_lr()[0],
                  "grad_norm": None if loop.grad_norm is None else float(loop.grad_norm), **loop.seen(loop.step),
                  "seconds_per_step": (time.perf_counter() - self.last_log) / every,
                  "per_task_objective": (loss / count.clamp_min(1)).tolist(), "per_task_count": count.tolist()}
        loop.metrics.reset()
        self.last_log = time.perf_counter()
        if decided_on_main(loop.accelerator, lambda: loop.lock.lost):
            raise RunHeldError(f"run {loop.run_dir}: another process took over its lock (this one was judged "
                               "dead); stopping without saving")
        if loop.is_main:
            append_jsonl(loop.run_dir / TRAIN_METRICS, record)
        loop.logged["train"] = record


class Evaluate(Hook):
    """Every eval_every steps (and at the end): SPEC C's metrics on the saved eval splits, to eval_metrics.jsonl."""

    def __init__(self, splits: dict[str, dict[str, torch.Tensor]]):
        self.splits = splits

    def after_step(self, loop):
        if loop.is_due(loop.config.training_kwargs.eval_every):
            loop.sync()
            loop.results = evaluate(loop.model, loop.setting, loop.config, self.splits, loop.accelerator)
            if loop.is_main:
                append_jsonl(loop.run_dir / EVAL_METRICS, {"step": loop.step, **loop.results})
            loop.logged["eval"] = loop.results


class WandbLog(Hook):
    """What this step logged, to wandb (main process, logging.wandb=true; offline without WANDB_API_KEY)."""

    def __init__(self):
        self.run = None

    def after_step(self, loop):
        if not (loop.config.logging.wandb and loop.is_main) or not loop.logged:
            return
        if self.run is None:
            self.run = init_wandb(loop.config, loop.run_dir, loop.run_dir.name)
        values = {}
        if "train" in loop.logged:
            values |= {k: v for k, v in loop.logged["train"].items() if not k.startswith("per_task")}
        if "eval" in loop.logged:
            values |= {f"eval/{s}/{k}": v for s, r in loop.logged["eval"].items() for k, v in r.items()}
        self.run.log(values, step=loop.step)

    def close(self, loop):
        if self.run is not None:
            self.run.finish()


class ProgressBar(Hook):
    def __init__(self):
        self.bar = None

    def after_step(self, loop):
        if self.bar is None:
            from tqdm.auto import tqdm

            training = loop.config.training_kwargs
            self.bar = tqdm(total=training.max_steps, initial=loop.step - 1, dynamic_ncols=True,
                            desc=f"{loop.config.name} seed={loop.config.seed}", disable=not loop.is_main)
        self.bar.update(1)
        if "train" in loop.logged:
            self.bar.set_postfix(objective=f"{loop.logged['train']['objective']:.4f}")

    def close(self, loop):
        if self.bar is not None:
            self.bar.close()


class SaveState(Hook):
    """Checkpoints on the schedule, the resume state with them (a pack's: PackSaves), and preemption: on a signal
    every rank agrees to stop at the same step, saves the resume state, and the signal's previous handler (submitit's
    requeue) runs. Nothing non-finite is ever saved."""

    def __init__(self, preemption: Preemption, checkpoint_steps: set[int]):
        self.preemption, self.checkpoint_steps = preemption, checkpoint_steps

    def after_step(self, loop):
        training = loop.config.training_kwargs
        checkpoint = loop.step in self.checkpoint_steps
        loop.stopping = loop.step < training.max_steps and preemption_agreed(
            self.preemption, loop.accelerator, loop.step, training.log_every)
        if not (checkpoint or loop.stopping):
            return
        loop.check_saveable()
        if checkpoint:
            loop.save_checkpoint()
        if loop.packed:  # the pack saves its runs' resume states together
            return
        save_resume(loop.accelerator, loop.run_dir, loop.step, loop.metrics.state, loop.identity)
        if loop.stopping:
            loop.accelerator.print(f"normscale: preempted; resume state saved at step {loop.step} ({loop.run_dir.name})")


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

    hydra_main(train, with_overrides=True, packed=train_pack)
    finish_process()


if __name__ == "__main__":
    main()
