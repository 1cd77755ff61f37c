"""What the integrity checks of issue 11 cost, measured directly, as a fraction of a training step's time.

End-to-end step timings on these machines are too noisy to show 2%, so each added piece is timed on its own (median
of interleaved rounds) on the canonical balls-and-urns model (V=8, C=128, batch 64, hidden 64, 1 layer), and
amortised over a run's steps with the run's checkpoint schedule:
  step               forward, loss, backward, clipping, AdamW (the bare step; no loop overhead)
  finite flag        the per-step non-finite gradient-norm count (one tiny op on the device, no host sync)
  reduce             the extra all-reduce + host sync of the finiteness check before a save off a logging step
  checkpoint hash    sha256 of model.safetensors when it is written (and again when eval loads it)
  resume hash        sha256 of every file of the resume state when it is published (and when a run resumes)
  heartbeat          one rewrite of the lock record, every 60 s

    .venv/bin/python bench/bench_integrity.py
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_bayes import write_section  # noqa: E402
from safetensors.torch import save  # noqa: E402

from normscale import settings  # noqa: E402
from normscale.checkpoints import _file_hashes, damage  # noqa: E402
from normscale.cli import CONF_DIR, to_config  # noqa: E402
from normscale.dist.accel import make_accelerator, save_resume  # noqa: E402
from normscale.fileio import sha256_bytes  # noqa: E402
from normscale.layout import resume_state_dir  # noqa: E402
from normscale.model import build_model  # noqa: E402
from normscale.model.mup import optimizer_groups  # noqa: E402
from normscale.runlock import HEARTBEAT_SECONDS, RunLock  # noqa: E402
from normscale.train import TrainingMetrics  # noqa: E402

# (label, max_steps, logging every, checkpoints incl. step 0): the default config and `make demo`'s runs
RUNS = (("default config (1e5 steps, 101 checkpoints)", 100_000, 100, 101), ("demo (2000 steps, 13 checkpoints)", 2000, 100, 13))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(hydra_compose("config", overrides=overrides))


def timed(fn, repeat: int) -> float:
    """Median seconds of one call of `fn` over `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-integrity-"))
    config = compose([f"cache_dir={work}", "setting=balls_and_urns", "logging.wandb=false"])
    accelerator = make_accelerator(config)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.AdamW(optimizer_groups(model, 1e-3, 0.0))
    model, optimizer = accelerator.prepare(model, optimizer)
    B, C, V = config.training_kwargs.batch_size, config.task_kwargs.context_length, config.task_kwargs.num_dims
    batch = {"tokens": torch.randint(0, V, (B, C + 1)), "task_ids": torch.randint(0, config.task_kwargs.num_tasks, (B,))}
    metrics = TrainingMetrics(config.task_kwargs.num_tasks, accelerator.device)
    grad_norm = torch.tensor(1.0)
    objective = settings.get(config.setting, config.task_kwargs).objective

    def step():
        nonlocal grad_norm
        losses = objective(model(batch), batch)
        accelerator.backward(losses.mean())
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def finite_flag():
        metrics.state["nonfinite_grads"] += ~torch.isfinite(torch.as_tensor(grad_norm))

    weights = save({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    for _ in range(5):
        step()
    save_resume(accelerator, work, 5, metrics.state, {})
    state = resume_state_dir(work, 5)
    lock = RunLock(work / "lock")
    lock.acquire()
    rounds = {name: [] for name in ("step", "finite flag", "reduce", "checkpoint hash", "resume hash", "resume verify",
                                    "heartbeat")}
    for _ in range(args.rounds):  # interleaved: every piece once per round
        rounds["step"].append(timed(step, 20))
        rounds["finite flag"].append(timed(finite_flag, 200))
        rounds["reduce"].append(timed(lambda: metrics.reduced(accelerator), 200))
        rounds["checkpoint hash"].append(timed(lambda: sha256_bytes(weights), 20))
        rounds["resume hash"].append(timed(lambda: _file_hashes(state), 20))
        rounds["resume verify"].append(timed(lambda: damage(state), 20))
        rounds["heartbeat"].append(timed(lock.heartbeat, 50))
    lock.release()
    cost = {name: statistics.median(values) for name, values in rounds.items()}
    step_time = cost["step"]

    lines = [f"| piece | median time | relative to one step ({step_time * 1e3:.1f} ms) |", "|---|---|---|"]
    for name, seconds in cost.items():
        lines.append(f"| {name} | {seconds * 1e6:.1f} us | {seconds / step_time:.4%} |")
    lines += ["", "| run | added time per step, amortised | of a step |", "|---|---|---|"]
    for label, steps, log_every, saves in RUNS:
        beats = steps * step_time / HEARTBEAT_SECONDS
        added = (steps * cost["finite flag"] + saves * (cost["reduce"] + cost["checkpoint hash"] + cost["resume hash"])
                 + cost["resume verify"] + beats * cost["heartbeat"]) / steps
        lines.append(f"| {label} | {added * 1e6:.2f} us | {added / step_time:.3%} |")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    text = (f"## Integrity checks (bench/bench_integrity.py)\n\n"
            f"`.venv/bin/python bench/bench_integrity.py --rounds {args.rounds}` on {machine}, device "
            f"{accelerator.device}; medians of {args.rounds} interleaved rounds. The canonical model "
            f"({sum(p.numel() for p in model.parameters())} parameters: checkpoint {len(weights) / 1e3:.0f} kB, resume "
            f"state {sum(e['bytes'] for e in _file_hashes(state).values()) / 1e3:.0f} kB). Amortised: the finite flag "
            "every step; at every save the extra reduce (counted even where the save falls on a logging step), the "
            "checkpoint and resume-state hashes; one verification of the resume state per start; a heartbeat every "
            f"{HEARTBEAT_SECONDS:.0f} s.\n\n" + "\n".join(lines) + "\n")
    print(text)
    write_section(args.out, "## Integrity checks (bench/bench_integrity.py)", text)


if __name__ == "__main__":
    main()
