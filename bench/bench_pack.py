"""Packed sweeps: aggregate run-steps/s of N runs stacked (one model with a leading run axis,
normscale.pack.StackedRuns) against the same N runs stepped one after another in one process (SequentialRuns: the
solo models, AdamW and LambdaLR in turn, which is what N solo runs sharing a device would at best do).

Canonical balls and urns (V=8, C=128, batch 64), the transformer (1 layer, 1 head, MLP x4), sp, widths --widths,
pack sizes --runs, --threads torch threads (1 by default: on a 2-core machine shared with other jobs, 2 OpenMP
threads spin against the other load and a step takes ~40x longer); runs differ in seed, D and learning rate. Each
(width, N, engine) runs in its own child process, --rounds times in alternating order (medians shown): --steps
timed steps after --warmup untimed ones, on batches made before timing (each run's own MixtureDataset,
DISTINCT_BATCHES step batches cycled). Memory: the peak resident set (ru_maxrss) of the child minus its peak before
the models were built (data and imports excluded), and the bytes of parameters + gradients + AdamW moments the
engine holds (analytic: 4 x parameters x N, fp32).

    .venv/bin/python bench/bench_pack.py            # --quick: widths 32, N 1 and 4, 1 round
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from normscale import settings  # noqa: E402
from normscale.config import Config, ModelConfig, TaskConfig, TrainingConfig  # noqa: E402
from normscale.data import MixtureDataset, draw_task_pools  # noqa: E402
from normscale.data.seeds import stream_seed  # noqa: E402
from normscale.dist.accel import keep_freed_memory  # noqa: E402
from normscale.model import build_model  # noqa: E402
from normscale.pack.stacked import SequentialRuns, StackedRuns  # noqa: E402

DISTINCT_BATCHES = 4
ENGINES = ("stacked", "sequential")  # this benchmark's; build_engine also knows "in_turn"


def pack_configs(width: int, num_runs: int, first: int = 0) -> list[Config]:
    """Runs first, ..., first + num_runs - 1 of a benchmark pack: canonical urns (V=8, C=128, batch 64), the transformer
    at `width`; run k differs in seed, D and learning rate."""
    return [dataclasses.replace(
        Config(), seed=k, task_kwargs=TaskConfig(num_tasks=2 ** (2 + k % 8), num_dims=8, context_length=128),
        model_kwargs=ModelConfig(hidden_size=width, num_layers=1, num_heads=1, mlp_expansion_factor=4.0),
        training_kwargs=TrainingConfig(learning_rate=5e-4 * (1 + k % 3), warmup_steps=100, batch_size=64,
                                       max_steps=10 ** 6)) for k in range(first, first + num_runs)]


def run_batches(configs: list, device: str = "cpu") -> tuple[list, list]:
    """Each run's setting and its DISTINCT_BATCHES first step batches (its own MixtureDataset), on `device`."""
    run_settings = [settings.get(c.setting, c.task_kwargs) for c in configs]
    batches = []
    for config, setting in zip(configs, run_settings):
        dataset = MixtureDataset(setting, draw_task_pools(setting, config.seed)["train"], config.task_kwargs.prior,
                                 config.training_kwargs.batch_size, config.seed)
        batches.append([{n: t.to(device) for n, t in dataset.batch(step).items()} for step in range(DISTINCT_BATCHES)])
    return run_settings, batches


class InTurn(SequentialRuns):
    """The runs as N solo training loops stepped one after another: SequentialRuns' models, AdamW and LambdaLR, each
    step what a solo loop does between logging steps. No host synchronisation: SequentialRuns copies each run's
    objectives and gradient norm to the host, which on a GPU waits for that run's step to finish."""

    def step(self, batches):
        for k, (model, setting, t) in enumerate(zip(self.models, self.settings, self.trainings)):
            setting.objective(model(batches[k]), batches[k]).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            self.optimizers[k].step()
            self.optimizers[k].zero_grad(set_to_none=True)
            self.schedulers[k].step()
        self.steps = [s + 1 for s in self.steps]


def build_engine(name: str, configs: list, run_settings: list, device: str = "cpu"):
    """Engine `name` (stacked, sequential or in_turn) over the runs' solo models, each built on `device` under its
    init seed."""
    models = []
    for config in configs:
        torch.manual_seed(stream_seed(config.seed, "init"))
        with torch.device(device):
            models.append(build_model(config))
    engine = {"stacked": StackedRuns, "sequential": SequentialRuns, "in_turn": InTurn}[name]
    return engine(models, run_settings, [c.training_kwargs for c in configs])


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(engine, batches: list, steps: int, warmup: int, device: str = "cpu", ready=None) -> float:
    """Seconds of `steps` engine steps after `warmup` untimed ones (the device synchronised before and after);
    `ready()`, if given, is called between the two (a start barrier shared with other processes)."""
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            if ready:
                ready()
            start = time.perf_counter()
        engine.step([b[step % DISTINCT_BATCHES] for b in batches])
    synchronize(device)
    return time.perf_counter() - start


def child(width: int, num_runs: int, engine_name: str, steps: int, warmup: int, threads: int) -> dict:
    """One measurement in this process: run-steps/s and memory of one engine."""
    torch.set_num_threads(threads)
    keep_freed_memory()  # as normscale.train does
    configs = pack_configs(width, num_runs)
    run_settings, batches = run_batches(configs)
    num_parameters = sum(p.numel() for p in build_model(configs[0]).parameters())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine = build_engine(engine_name, configs, run_settings)
    seconds = time_steps(engine, batches, steps, warmup)
    return {"run_steps_per_s": num_runs * steps / seconds, "step_ms": 1000 * seconds / steps,
            "peak_rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
            "state_mib": 4 * 4 * num_parameters * num_runs / 2 ** 20, "parameters": num_parameters}


def measure(width: int, num_runs: int, engine: str, steps: int, warmup: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps([width, num_runs, engine, steps, warmup, threads])]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per child (1: a CPU shared with other jobs makes 2 OpenMP threads spin)")
    parser.add_argument("--quick", action="store_true", help="widths 32, N 1 and 4, 4 steps, 1 round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    if args.quick:
        args.widths, args.runs, args.steps, args.warmup, args.rounds = [32], [1, 4], 4, 2, 1

    configurations = [(w, n) for w in args.widths for n in args.runs]
    results = {(w, n, e): [] for w, n in configurations for e in ENGINES}
    for round_index in range(args.rounds):
        for w, n in configurations:
            order = ENGINES if round_index % 2 == 0 else ENGINES[::-1]
            for engine in order:
                results[w, n, engine].append(measure(w, n, engine, args.steps, args.warmup, args.threads))
                print(f"round {round_index} width {w} N {n} {engine}: {results[w, n, engine][-1]}", file=sys.stderr)
    print(f"`{' '.join(['.venv/bin/python bench/bench_pack.py', *sys.argv[1:]])}` on {os.uname().machine}, "
          f"{args.threads} torch thread(s) per child, {os.cpu_count()} cores, torch {torch.__version__}, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; medians of {args.rounds} interleaved rounds, "
          f"{args.steps} timed steps each.\n")
    print("| width | N | parameters per run | stacked run-steps/s | sequential run-steps/s | stacked / sequential | "
          "stacked step (ms) | sequential step (ms) | peak RSS growth stacked / sequential (MiB) | "
          "params+grads+AdamW (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for w, n in configurations:
        s, q = results[w, n, "stacked"], results[w, n, "sequential"]
        med = lambda rows, key: statistics.median(r[key] for r in rows)
        print(f"| {w} | {n} | {s[0]['parameters']} | {med(s, 'run_steps_per_s'):.1f} | "
              f"{med(q, 'run_steps_per_s'):.1f} | "
              f"{med(s, 'run_steps_per_s') / med(q, 'run_steps_per_s'):.2f}x | {med(s, 'step_ms'):.1f} | "
              f"{med(q, 'step_ms'):.1f} | {med(s, 'peak_rss_mib'):.0f} / {med(q, 'peak_rss_mib'):.0f} | "
              f"{s[0]['state_mib']:.2f} |")


if __name__ == "__main__":
    main()
