"""Training loop: steps/s of normscale's loop against transformers' Trainer, the same model and data, in one run.

The canonical balls-and-urns setting (V=8, C=128, batch 64), its step-indexed shards made by normscale's own data
path, trained for --steps steps by:
  normscale        `python -m normscale.train` as users run it (no wandb, checkpoints at the start and end only, no
                   eval before the end), model=transformer (normscale's GPT-NeoX-like model) and model=hf_gpt_neox
                   (transformers' GPTNeoXForCausalLM inside normscale's loop): loop overhead and model speed apart
  Trainer          transformers' Trainer on GPTNeoXForCausalLM of the same size (the model normscale's hf_gpt_neox
                   wraps), the same AdamW and schedule, fp32, CPU, nothing saved or evaluated; batch i is step i's
                   batch (an IterableDataset over ShardReader, tokens as input_ids and labels); untuned (defaults)
                   and with the speed options a user would flip; and untuned under the glibc malloc settings
                   that normscale's training process applies to itself (normscale.dist.accel.keep_freed_memory),
                   given through the environment
  bare step        the ceiling for any loop: each model's forward, loss, backward, clipping and AdamW step called by
                   hand in a bare `for` loop over the same batches (no logging, no progress bar, no checks), under
                   normscale's malloc settings
Each configuration runs in its own process, --rounds times in alternating order (the median is shown).
With --baseline-code DIR (a checkout of another commit, e.g. `git worktree add --detach /tmp/base <commit>`), only
normscale's loop runs, from this checkout and from DIR alike, interleaved: a change's cost in steps/s, as a ratio.
Steady state: steps per second over all steps after the first --window (warm-up), from train_metrics.jsonl's
seconds_per_step for normscale and from a callback's time stamps at each step's end for the Trainer (the same
quantity: wall time of steps window+1..steps over their number). On a machine with a GPU everything runs on it
(the Trainer without use_cpu; normscale picks the GPU itself); the table then has the GPU figures.

    .venv/bin/python bench/bench_train.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from normscale import settings  # noqa: E402
from normscale.cli import CONF_DIR, to_config  # noqa: E402
from normscale.layout import TRAIN_METRICS, run_directory  # noqa: E402
from normscale.data import ShardReader, prepare_data  # noqa: E402
from normscale.dist.accel import MALLOC_SETTINGS  # noqa: E402
from normscale.model import build_model  # noqa: E402

# The Trainer's speed options that work on this CPU: no per-step NaN/inf check of the loss, torch.compile.
# Already on by default here: fused AdamW (optim=adamw_torch_fused), pin_memory off (use_cpu=True). Tried and left
# out: dataloader_num_workers >= 1 (slower on 2 cores: the worker competes with the step's threads), bf16 (not fp32).
TRAINER_OPTIONS = {"untuned": {}, "tuned": {"logging_nan_inf_filter": False, "torch_compile": True}}
MALLOC_ENV = {f"MALLOC_{name}_": str(value) for name, (_, value) in MALLOC_SETTINGS.items()}
NORMSCALE_RUNS = (["model=transformer"], ["model=hf_gpt_neox"], ["model=transformer", "training_kwargs.compile=true"])


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(hydra_compose("config", overrides=overrides))


def normscale_overrides(cache_dir: Path, steps: int, window: int) -> list[str]:
    return [f"cache_dir={cache_dir}", "name=bench", "setting=balls_and_urns", f"training_kwargs.max_steps={steps}",
            f"training_kwargs.log_every={window}", f"training_kwargs.eval_every={10 * steps}",
            "training_kwargs.save_steps.schedule=end_only", "logging.wandb=false"]


def run(command: list[str], env: dict | None = None, code: Path = ROOT) -> str:
    """Run a configuration in its own process (with the normscale of checkout `code`); its stdout, or exit with its
    error."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(code)}
    done = subprocess.run(command, cwd=code, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def normscale_records(cache_dir: Path, extra: list[str], steps: int, window: int, code: Path = ROOT) -> list[dict]:
    """Run `python -m normscale.train` from checkout `code` (another checkout runs in a cache directory of its own,
    whose only run is this one); its train_metrics.jsonl records, one per window."""
    if code != ROOT:
        cache_dir = cache_dir / "baseline"
    overrides = [*normscale_overrides(cache_dir, steps, window), "overwrite=true", *extra]
    run([sys.executable, "-m", "normscale.train", *overrides], code=code)
    metrics = run_directory(compose(overrides), overrides) / TRAIN_METRICS if code == ROOT else \
        next(cache_dir.glob(f"experiments/*/bench/*/*/{TRAIN_METRICS}"))
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def steady_rate(records: list[dict]) -> float:
    """Steps/s over every window but the first (warm-up)."""
    return 1 / (sum(r["seconds_per_step"] for r in records[1:]) / len(records[1:]))


def normscale_rate(cache_dir: Path, extra: list[str], steps: int, window: int, code: Path = ROOT) -> float:
    """Steady-state steps/s of `python -m normscale.train` (normscale_records)."""
    return steady_rate(normscale_records(cache_dir, extra, steps, window, code))


def trainer_label(option: str, malloc: bool = False) -> str:
    options = " ".join(f"{k}={v}" for k, v in TRAINER_OPTIONS[option].items()) or "untuned (defaults)"
    return f"Trainer, {options}" + (", normscale's malloc settings" if malloc else "")


def child_rate(cache_dir: Path, steps: int, window: int, *mode: str, env: dict | None = None) -> float:
    """steps/s of this script run as a child process in `mode` (--trainer OPTION or --bare MODEL)."""
    out = run([sys.executable, __file__, *mode, "--cache-dir", str(cache_dir), "--steps", str(steps),
               "--window", str(window)], env=env)
    return float(out.strip().splitlines()[-1])


class StepBatches(torch.utils.data.IterableDataset):
    """Sequences in step order: with batch size B and no shuffling, the Trainer's batch i is step i's batch.
    Worker w of W reads steps w, w+W, ...; the DataLoader takes batches from its workers in turn, so order holds."""

    def __init__(self, directory: Path, setting, steps: int):
        self.directory, self.setting, self.steps = directory, setting, steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first, stride = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardReader(self.directory, self.setting)
        for step in range(first, self.steps, stride):
            for tokens in reader.batch(step)["tokens"]:
                yield {"input_ids": tokens, "labels": tokens}


def run_bare(cache_dir: Path, model_name: str, steps: int, window: int) -> float:
    """Child process: the bare training step of `model=model_name`, stepped by hand; steady-state steps/s."""
    from normscale.dist.accel import keep_freed_memory
    from normscale.model import optimizer_groups

    keep_freed_memory()
    config = compose([*normscale_overrides(cache_dir, steps, window), f"model={model_name}"])
    training, device = config.training_kwargs, "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(optimizer_groups(model, training.learning_rate, training.weight_decay),
                                  betas=(training.adam_beta1, training.adam_beta2), eps=training.adam_eps)
    setting = settings.get(config.setting, config.task_kwargs)
    reader = ShardReader(prepare_data(config).plan.directory, setting, device=device)
    for step in range(steps):
        if step == window:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = reader.batch(step)
        setting.objective(model(batch), batch).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return (steps - window) / (time.perf_counter() - start)


def run_trainer(cache_dir: Path, option: str, steps: int, window: int) -> float:
    """Child process: train with transformers' Trainer, return steady-state steps/s."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    config = compose([*normscale_overrides(cache_dir, steps, window), "model=hf_gpt_neox"])
    training = config.training_kwargs
    ends = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(cache_dir / f"trainer-{option}"), use_cpu=not torch.cuda.is_available(), report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=steps, max_steps=steps,
        per_device_train_batch_size=training.batch_size,
        learning_rate=training.learning_rate, adam_beta1=training.adam_beta1, adam_beta2=training.adam_beta2,
        adam_epsilon=training.adam_eps, weight_decay=training.weight_decay, max_grad_norm=training.max_grad_norm,
        lr_scheduler_type="constant_with_warmup", warmup_steps=training.warmup_steps,
        **TRAINER_OPTIONS[option])
    model = build_model(config).net  # GPTNeoXForCausalLM: vocab V+1, hidden 64, 1 layer, 1 head, MLP 256, no dropout
    dataset = StepBatches(prepare_data(config).plan.directory, settings.get(config.setting, config.task_kwargs), steps)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[StepEnds()]).train()
    return (steps - window) / (ends[steps - 1] - ends[window - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per configuration")
    parser.add_argument("--window", type=int, default=50, help="logging window; the first one is warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every configuration, interleaved")
    parser.add_argument("--trainer", choices=TRAINER_OPTIONS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--bare", choices=("transformer", "hf_gpt_neox"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-code", type=Path, help="a checkout of another commit: compare normscale's loop "
                        "from here and from there, nothing else")
    args = parser.parse_args()
    if args.steps % args.window or args.steps < 2 * args.window:
        parser.error("--steps must be a multiple of --window, and at least two windows")
    if args.trainer:
        print(run_trainer(args.cache_dir, args.trainer, args.steps, args.window))
        return
    if args.bare:
        print(run_bare(args.cache_dir, args.bare, args.steps, args.window))
        return

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {device}; "
          f"{args.steps} steps (the first {args.window} are warm-up), {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp)
        prepare_data(compose(normscale_overrides(cache_dir, args.steps, args.window)))

        def child(*mode: str, env: dict | None = None):
            return partial(child_rate, cache_dir, args.steps, args.window, *mode, env=env)

        if args.baseline_code:
            configs = {f"normscale at {args.baseline_code}": partial(normscale_rate, cache_dir, [], args.steps,
                                                                     args.window, args.baseline_code.resolve()),
                       "normscale, this checkout": partial(normscale_rate, cache_dir, [], args.steps, args.window)}
        else:
            configs = {trainer_label(o): child("--trainer", o) for o in TRAINER_OPTIONS}
            configs[trainer_label("untuned", malloc=True)] = child("--trainer", "untuned", env=MALLOC_ENV)
            configs |= {f"normscale, {' '.join(extra)}": partial(normscale_rate, cache_dir, extra, args.steps,
                                                                 args.window) for extra in NORMSCALE_RUNS}
            configs |= {f"bare step, model={m}": child("--bare", m) for m in ("transformer", "hf_gpt_neox")}
        rates = {name: [] for name in configs}
        for r in range(args.rounds):  # alternate the order, so that drift in the machine's load hits all alike
            for name in (configs if r % 2 == 0 else reversed(configs)):
                rates[name].append(configs[name]())
                print(f"  round {r + 1}: {name}: {rates[name][-1]:.2f} steps/s", flush=True)
    reference = next(iter(rates)) if args.baseline_code else trainer_label("untuned")
    baseline = statistics.median(rates[reference])
    print(f"\n| configuration | steps/s, median of {args.rounds} | every round | vs {reference} |\n"
          f"|---|---:|---:|---:|")
    for name, values in rates.items():
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} | {rounds} | {statistics.median(values) / baseline:.2f}x |")


if __name__ == "__main__":
    main()
