"""Packed sweeps: aggregate run-steps/s of N runs stacked against the same N runs trained one after another by
normscale's own loop, side by side in one process. Both are normscale.train.run_loops over the runs' Loops, built as
train builds them (make_accelerator, build_model under the init seed, train.wrap): `in_turn` steps each Loop by
train_step (forward, objective, backward, clipping, AdamW, LambdaLR through Accelerate; what pack_execution=in_turn
and N solo runs sharing a device would at best do), `stacked` steps them all as one StackedLoops (one vmapped step;
pack_execution=stacked). The Loops have no hooks but the timer, so nothing syncs the stacked runs' solo models.

Canonical balls and urns (V=8, C=128, batch 64), the transformer (1 layer, 1 head, MLP x4), sp, widths --widths,
pack sizes --runs, --threads torch threads (1 by default: on a 2-core machine shared with other jobs, 2 OpenMP
threads spin against the other load and a step takes ~40x longer); runs differ in seed, D and learning rate. Each
(width, N, engine) runs in its own child process, --rounds times in alternating order (medians shown): --steps
timed steps (--steps-n64 at N >= 64) after --warmup untimed ones, on batches made before timing (each run's
own MixtureDataset, DISTINCT_BATCHES step batches cycled). Memory: the peak resident set (ru_maxrss) of the child
minus its peak before the loops were built (data and imports excluded), and the bytes of parameters + gradients +
AdamW moments of the N runs (analytic: 4 x parameters x N, fp32).

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
from normscale.dist.accel import keep_freed_memory, make_accelerator  # noqa: E402
from normscale.model import build_model  # noqa: E402
from normscale.train import Hook, Loop, run_loops, wrap  # noqa: E402

DISTINCT_BATCHES = 4
ENGINES = ("stacked", "in_turn")  # run_loops(loops, stacked=True | False)


def pack_configs(width: int, num_runs: int, max_steps: int, first: int = 0) -> list[Config]:
    """Runs first, ..., first + num_runs - 1 of a benchmark pack: canonical urns (V=8, C=128, batch 64), the transformer
    at `width`, max_steps steps; run k differs in seed, D and learning rate."""
    return [dataclasses.replace(
        Config(), seed=k, task_kwargs=TaskConfig(num_tasks=2 ** (2 + k % 8), num_dims=8, context_length=128),
        model_kwargs=ModelConfig(hidden_size=width, num_layers=1, num_heads=1, mlp_expansion_factor=4.0),
        training_kwargs=TrainingConfig(learning_rate=5e-4 * (1 + k % 3), warmup_steps=100, batch_size=64,
                                       max_steps=max_steps)) for k in range(first, first + num_runs)]


def run_batches(configs: list[Config]) -> list[list[dict[str, torch.Tensor]]]:
    """Each run's DISTINCT_BATCHES first step batches (its own MixtureDataset), on the CPU."""
    batches = []
    for config in configs:
        setting = settings.get(config.setting, config.task_kwargs)
        dataset = MixtureDataset(setting, draw_task_pools(setting, config.seed)["train"], config.task_kwargs.prior,
                                 config.training_kwargs.batch_size, config.seed)
        batches.append([dataset.batch(step) for step in range(DISTINCT_BATCHES)])
    return batches


class Cycled:
    """A run's pre-made step batches on `device`, cycled: the `batch(step)` a Loop reads its batches by."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], device):
        self.batches = [{n: t.to(device) for n, t in b.items()} for b in batches]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.batches[step % len(self.batches)]


def build_loops(configs: list[Config], batches: list[list[dict[str, torch.Tensor]]]) -> list[Loop]:
    """Each run's Loop as normscale.train.start_run builds it (its Accelerator, its model built under its init seed,
    wrap), reading batches[k] on the accelerator's device; no run directory, lock or hooks."""
    loops = []
    for config, run in zip(configs, batches, strict=True):
        accelerator = make_accelerator(config)
        torch.manual_seed(stream_seed(config.seed, "init"))
        model, optimizer, scheduler = wrap(build_model(config), config.training_kwargs, accelerator)
        loops.append(Loop(config, settings.get(config.setting, config.task_kwargs), None, accelerator, model,
                          optimizer, scheduler, None, Cycled(run, accelerator.device), []))
    return loops


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StartClock(Hook):
    """Notes time.perf_counter() (the device synchronised) when its loop reaches step `at`; `ready()`, if given, is
    called just before (a start barrier shared with other processes)."""

    def __init__(self, at: int, ready=None):
        self.at, self.ready, self.start = at, ready, None

    def after_step(self, loop):
        if loop.step == self.at:
            synchronize(loop.accelerator.device)
            if self.ready:
                self.ready()
            self.start = time.perf_counter()


def time_loops(loops: list[Loop], stacked: bool, warmup: int, ready=None) -> float:
    """Seconds of run_loops(loops, stacked) from when every loop has made `warmup` (>= 1) steps until all have made
    their max_steps, the device synchronised at both ends; `ready` as StartClock's."""
    clock = StartClock(warmup, ready)
    loops[-1].hooks.append(clock)  # run_loops steps and hooks the loops in order: the last one reaches `warmup` last
    run_loops(loops, stacked)
    synchronize(loops[0].accelerator.device)
    return time.perf_counter() - clock.start


def child(width: int, num_runs: int, engine: str, steps: int, warmup: int, threads: int) -> dict:
    """One measurement in this process: run-steps/s and memory of one engine."""
    torch.set_num_threads(threads)
    keep_freed_memory()  # as normscale.train does
    configs = pack_configs(width, num_runs, warmup + steps)
    batches = run_batches(configs)
    num_parameters = sum(p.numel() for p in build_model(configs[0]).parameters())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = time_loops(build_loops(configs, batches), engine == "stacked", warmup)
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
    parser.add_argument("--steps-n64", type=int, help="timed steps at N >= 64 (default: --steps)")
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

    steps = {n: args.steps_n64 if n >= 64 and args.steps_n64 else args.steps for n in args.runs}
    configurations = [(w, n) for w in args.widths for n in args.runs]
    results = {(w, n, e): [] for w, n in configurations for e in ENGINES}
    for round_index in range(args.rounds):
        for w, n in configurations:
            order = ENGINES if round_index % 2 == 0 else ENGINES[::-1]
            for engine in order:
                results[w, n, engine].append(measure(w, n, engine, steps[n], args.warmup, args.threads))
                print(f"round {round_index} width {w} N {n} {engine}: {results[w, n, engine][-1]}", file=sys.stderr)
    print(f"`{' '.join(['.venv/bin/python bench/bench_pack.py', *sys.argv[1:]])}` on {os.uname().machine}, "
          f"{args.threads} torch thread(s) per child, {os.cpu_count()} cores, torch {torch.__version__}, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; medians of {args.rounds} interleaved rounds "
          f"after {args.warmup} warm-up steps.\n")
    print("| width | N | parameters per run | timed steps | stacked run-steps/s | in turn run-steps/s | "
          "stacked / in turn | stacked step (ms) | in turn step (ms) | peak RSS growth stacked / in turn (MiB) | "
          "params+grads+AdamW (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    med = lambda rows, key: statistics.median(r[key] for r in rows)
    for w, n in configurations:
        s, t = results[w, n, "stacked"], results[w, n, "in_turn"]
        print(f"| {w} | {n} | {s[0]['parameters']} | {steps[n]} | {med(s, 'run_steps_per_s'):.1f} | "
              f"{med(t, 'run_steps_per_s'):.1f} | {med(s, 'run_steps_per_s') / med(t, 'run_steps_per_s'):.2f}x | "
              f"{med(s, 'step_ms'):.1f} | {med(t, 'step_ms'):.1f} | "
              f"{med(s, 'peak_rss_mib'):.0f} / {med(t, 'peak_rss_mib'):.0f} | {s[0]['state_mib']:.2f} |")


if __name__ == "__main__":
    main()
