"""The GPU check in one command (issue 13): `make gpu-check OUT=DIR`, i.e. `python bench/gpu_check.py --out DIR`.

Sections, in this order, each in a process of its own under a time limit: one that fails or runs out of time records
its error and the next one runs. As each finishes it writes DIR/<section>.json and rewrites the summary DIR/GPU.md;
at the end docs/GPU.md gets the summary (device, command, date, a table per section).

  pack                aggregate run-steps/s of a pack stacked against the same runs trained one after another by
                      normscale's own loop in one process (normscale.train.run_loops, stacked and in turn), N = 1, 8,
                      64 at widths 64 and 256; from them the projected wall time of the categorical sweep (297 runs x
                      1e5 steps) on this device
  solo_processes      the pack of N = 8 against 8 processes sharing the GPU at once, each training one of its runs
  packed_equals_solo  every run of tests/test_pack.py's packs stacked against its solo run (run_loops in turn), on the
                      device
  llm                 candidate-only scoring (LLMScorer) against full-vocabulary logits: throughput and peak memory of
                      a randomly initialised Llama-3.1-8B-shaped model built on the GPU in bf16 (no download)
  generate            `python -m normscale.train` with data_kwargs.source=generate on the device, against shards
  bf16                `python -m normscale.train` with precision=bf16 against fp32, widths 64 and 1024
  trainer             single-run steps/s of normscale's loop against transformers' Trainer, eager and compiled

The whole fits 8 minutes on one H100: every section has a time limit, and none starts past the total budget. TF32 is
off in every process (float32 matmul precision "highest", torch's default, set again here). Timings are medians of
interleaved rounds, after warm-up steps, with the device synchronised around the timed steps.
--quick: CPU, tiny sizes, one round, every section, in about a minute (tests/test_gpu_check.py runs it); its summary
goes to DIR only, never to docs/GPU.md.
"""
from __future__ import annotations

import argparse
import collections
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

SWEEP_RUNS, SWEEP_STEPS = 297, 100_000  # the paper's categorical sweep
TOTAL_BUDGET_S = {False: 450, True: 300}  # no section starts past it; 8 minutes less start-up on the device
MIN_SECTION_S = 20  # a section that would get less is skipped
# Only the end-of-run evaluation of these runs is shortened (an execution key: the data stay the same).
EVAL = ["eval_kwargs.num_eval_batches=1"]
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)


class Check:
    """What a section is given: the output directory, the mode, and where to save its results as they grow."""

    def __init__(self, out: Path, quick: bool, section: str = ""):
        self.out, self.quick, self.section = out, quick, section
        self.device = "cpu" if quick else "cuda"

    def pick(self, gpu, quick):
        return quick if self.quick else gpu

    def save(self, results: dict, markdown: list[str]) -> None:
        """Results so far: a section cut short keeps what it had measured."""
        write_json(self.out / f"{self.section}.json", {"results": results, "markdown": markdown})


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def set_precision() -> None:
    import torch
    torch.set_float32_matmul_precision("highest")  # TF32 off: fp32 matmuls in fp32
    torch.backends.cudnn.allow_tf32 = False


def hours(run_steps_per_s: float) -> float:
    """Wall time of the whole categorical sweep at this aggregate rate."""
    return SWEEP_RUNS * SWEEP_STEPS / run_steps_per_s / 3600


def rounds_order(items, round_index: int) -> list:
    """Alternate the order between rounds, so that drift in the machine hits every item alike."""
    return list(items) if round_index % 2 == 0 else list(items)[::-1]


# ------------------------------------------------------------------------------------------------------ sections

def pack(check: Check) -> tuple[dict, list[str]]:
    import gc

    import torch
    from bench_pack import ENGINES, build_loops, pack_configs, run_batches, time_loops
    widths, counts = check.pick(((64, 256), (1, 8, 64)), ((16, 32), (1, 4)))
    run_steps, min_steps, warmup, rounds = check.pick((256, 5, 3, 3), (8, 2, 1, 1))
    rows = []
    for width in widths:
        for n in counts:
            steps = max(run_steps // n, min_steps)
            configs = pack_configs(width, n, warmup + steps)
            batches = run_batches(configs)
            row = {"width": width, "N": n, "timed_steps": steps, "run_steps_per_s": {e: [] for e in ENGINES},
                   "step_peak_gib": {}}
            for r in range(rounds):
                for e in rounds_order(ENGINES, r):
                    loops = build_loops(configs, batches)  # fresh each time: run_loops trains them to max_steps
                    if check.device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                        before = torch.cuda.memory_allocated()
                    seconds = time_loops(loops, e == "stacked", warmup)
                    row["run_steps_per_s"][e].append(n * steps / seconds)
                    if check.device == "cuda":
                        row["step_peak_gib"][e] = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
                    del loops
                    gc.collect()  # a stacked pack's loops and stack refer to each other
                    if check.device == "cuda":
                        torch.cuda.empty_cache()
            row["median"] = {e: median(v) for e, v in row["run_steps_per_s"].items()}
            rows.append(row)
            print(f"width {width} N {n}: {row['median']}", flush=True)
            lines = pack_markdown(rows, rounds)
            check.save({"rows": rows}, lines)
    projection = []
    for e in ENGINES:
        best = max((r for r in rows if r["width"] == widths[0]), key=lambda r: r["median"][e])
        projection.append({"engine": e, "width": widths[0], "N": best["N"], "run_steps_per_s": best["median"][e],
                           "hours": hours(best["median"][e])})
    results = {"rows": rows, "projection": {"runs": SWEEP_RUNS, "steps": SWEEP_STEPS, "rows": projection}}
    lines = pack_markdown(rows, rounds) + [
        "", f"Projected wall time of the categorical sweep ({SWEEP_RUNS} runs x {SWEEP_STEPS:,} steps, all at width "
        f"{widths[0]}, MLP x4) from each execution's best measured aggregate rate at width {widths[0]}:", "",
        "| execution | at N | run-steps/s | sweep wall time (h) |", "|---|---:|---:|---:|",
        *[f"| {p['engine']} | {p['N']} | {p['run_steps_per_s']:.1f} | {p['hours']:.1f} |" for p in projection]]
    return results, lines


def pack_markdown(rows: list[dict], rounds: int) -> list[str]:
    lines = [f"Canonical urns (V=8, C=128, batch 64), 1-layer transformer; runs differ in seed, D and learning rate. "
             f"Aggregate run-steps/s, medians of {rounds} interleaved rounds (every round in pack.json), each on "
             "fresh loops built as normscale.train builds them. stacked: normscale.train.run_loops(loops, "
             "stacked=True) (one vmapped step for all N runs); in_turn: run_loops(loops) (normscale's own step for "
             "each run in turn: what N solo runs sharing the device would at best do). Step peak: memory run_loops "
             "allocates above the built loops (activations, gradients; stacked: also the stack's weights and AdamW "
             "moments).", "",
             "| width | N | timed steps | stacked | in_turn | stacked / in_turn | step peak stacked / in_turn (GiB) |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        m, peak = r["median"], r["step_peak_gib"]
        peaks = f"{peak['stacked']:.2f} / {peak['in_turn']:.2f}" if peak else "-"
        lines.append(f"| {r['width']} | {r['N']} | {r['timed_steps']} | {m['stacked']:.1f} | {m['in_turn']:.1f} "
                     f"| {m['stacked'] / m['in_turn']:.2f}x | {peaks} |")
    return lines


def solo_processes(check: Check) -> tuple[dict, list[str]]:
    from bench_pack import build_loops, pack_configs, run_batches, time_loops
    n, width, steps, warmup, rounds = check.pick((8, 64, 200, 10, 2), (2, 16, 6, 2, 1))
    configs = pack_configs(width, n, warmup + steps)
    batches = run_batches(configs)
    rates = {"stacked": [], "processes": []}
    per_process = []
    for r in range(rounds):
        for what in rounds_order(rates, r):
            if what == "stacked":
                rates[what].append(n * steps / time_loops(build_loops(configs, batches), True, warmup))
            else:
                spans = run_solo_processes(check, n, width, steps, warmup)
                rates[what].append(n * steps / (max(end for _, end in spans) - min(start for start, _ in spans)))
                per_process.append([steps / (end - start) for start, end in spans])
            print(f"round {r} {what}: {rates[what][-1]:.1f} run-steps/s", flush=True)
            check.save({"N": n, "width": width, "steps_per_run": steps, "run_steps_per_s": rates}, [])
    m = {k: median(v) for k, v in rates.items()}
    results = {"N": n, "width": width, "steps_per_run": steps, "run_steps_per_s": rates, "median": m,
               "per_process_steps_per_s": per_process, "sweep_hours": {k: hours(v) for k, v in m.items()}}
    lines = [f"The pack of N={n} runs at width {width} (run_loops stacked, one process) against {n} processes started "
             f"at once, each training one of the same runs by normscale's loop (run_loops of its Loop), sharing the "
             f"GPU; {steps} timed "
             f"steps per run after {warmup} warm-up steps, the processes released together once all are warm. "
             f"Aggregate: N x steps over the span from the first start to the last end. Medians of {rounds} "
             "interleaved rounds.",
             "", "| execution | aggregate run-steps/s | every round | categorical sweep wall time (h) |",
             "|---|---:|---|---:|"]
    for k, label in (("stacked", f"stacked, N={n}, one process"), ("processes", f"{n} solo processes at once")):
        lines.append(f"| {label} | {m[k]:.1f} | {', '.join(f'{v:.1f}' for v in rates[k])} | "
                     f"{results['sweep_hours'][k]:.1f} |")
    lines += ["", f"stacked / processes: {m['stacked'] / m['processes']:.2f}x; steps/s of each process (last round): "
              f"{', '.join(f'{v:.1f}' for v in per_process[-1])}."]
    return results, lines


def run_solo_processes(check: Check, n: int, width: int, steps: int, warmup: int) -> list[tuple[float, float]]:
    """Start n workers (run k each), release them together once all are warm; their (start, end) monotonic times."""
    workers = [subprocess.Popen([sys.executable, __file__, "--solo", json.dumps([k, width, steps, warmup]),
                                 "--out", str(check.out), *(["--quick"] if check.quick else [])],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for k in range(n)]
    try:
        for k, w in enumerate(workers):
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError(f"solo worker {k} exited with {w.wait()} before it was ready (its error is above)")
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        spans = []
        for k, w in enumerate(workers):
            out, _ = w.communicate()
            if w.returncode:
                raise RuntimeError(f"solo worker {k} exited with {w.returncode} (its error is above)")
            spans.append(tuple(json.loads(out.strip().splitlines()[-1])))
        return spans
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()


def solo_worker(check: Check, k: int, width: int, steps: int, warmup: int) -> None:
    """One run of the pack trained alone in this process; prints "ready" when warm, waits for a line on stdin, then
    times its steps and prints [start, end] (time.monotonic, comparable across processes)."""
    from bench_pack import build_loops, pack_configs, run_batches, time_loops
    configs = pack_configs(width, 1, warmup + steps, first=k)
    loops = build_loops(configs, run_batches(configs))

    def ready():
        print("ready", flush=True)
        sys.stdin.readline()

    seconds = time_loops(loops, False, warmup, ready)
    end = time.monotonic()
    print(json.dumps([end - seconds, end]), flush=True)


def packed_equals_solo(check: Check) -> tuple[dict, list[str]]:
    from test_pack import COMBINATIONS, WEIGHT_TOLERANCE, pack_configs, train_loops
    rows = []
    for combination in check.pick(COMBINATIONS, COMBINATIONS[:1]):
        configs = pack_configs(*combination)
        (stacked, stacked_objectives, _), (solo, solo_objectives, _) = (train_loops(configs, s) for s in (True, False))
        weights = max((a.model.state_dict()[name] - value).abs().max().item()
                      for a, b in zip(stacked, solo) for name, value in b.model.state_dict().items())
        objectives = max((a - b).abs().max().item() for a, b in zip(stacked_objectives, solo_objectives))
        rows.append({"combination": list(combination), "steps": [loop.step for loop in solo],
                     "max_weight_diff": weights, "max_objective_diff": objectives, "tolerance": WEIGHT_TOLERANCE})
        print(f"{combination}: weights {weights:.1e}, objectives {objectives:.1e}", flush=True)
    lines = [f"tests/test_pack.py's packs of 3 runs (differing in seed, D, prior, learning rate, warmup, weight decay, "
             f"clipping norm and max_steps) trained on {check.device} by normscale.train.run_loops stacked and in turn "
             f"(normscale's own step for each run: the solo runs), fp32, from the same initial weights and batches. "
             f"Max |difference| of final weights (tolerance {WEIGHT_TOLERANCE:g}, as on CPU) and of per-step "
             f"objectives.", "", "| setting | model | parametrization | steps per run | max weight diff "
             "| max objective diff | within tolerance |", "|---|---|---|---|---:|---:|---|"]
    lines += [f"| {' | '.join(r['combination'])} | {', '.join(map(str, r['steps']))} | {r['max_weight_diff']:.1e} "
              f"| {r['max_objective_diff']:.1e} | {'yes' if r['max_weight_diff'] <= r['tolerance'] else 'NO'} |"
              for r in rows]
    results = {"rows": rows}
    check.save(results, lines)
    worst = max(r["max_weight_diff"] for r in rows)
    if worst > WEIGHT_TOLERANCE:
        raise AssertionError(f"a packed run differs from its solo run by {worst:.2e} > {WEIGHT_TOLERANCE:g}")
    return results, lines


def llm(check: Check) -> tuple[dict, list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from bench_llm import IMPLS, peak_growth, scoring_runs, urn_batch
    from bench_pack import synchronize
    from llm_fixture import make_tokenizer
    shape, size, rounds, vocab_chunk = check.pick((LLAMA_8B, 32, 5, 8192), (TINY_LLAMA, 8, 2, 256))
    tokenizer = make_tokenizer(shape["vocab_size"])
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=None,
                         pad_token_id=None)
    start = time.perf_counter()
    with torch.device(check.device):  # built where it runs, in bf16: never a float32 copy on the host
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    synchronize(check.device)
    build_s = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    runs, length = scoring_runs(model, tokenizer, vocab_chunk, urn_batch(0, size))
    outs = {impl: runs[impl]() for impl in IMPLS}  # warm-up, kept for agreement

    def peak(run) -> int:
        """Bytes a call allocates above what was held before it (the weights)."""
        if check.device == "cpu":
            return peak_growth(run)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = run()
        del out
        return torch.cuda.max_memory_allocated() - before

    peaks = {impl: peak(runs[impl]) for impl in IMPLS}
    times = {impl: [] for impl in IMPLS}
    for r in range(rounds):
        for impl in rounds_order(IMPLS, r):
            synchronize(check.device)
            start = time.perf_counter()
            out = runs[impl]()
            synchronize(check.device)
            times[impl].append(time.perf_counter() - start)
            del out
    agreement = (outs["normscale"][0] - outs["baseline"][0]).abs().max().item()
    m = {impl: median(t) for impl, t in times.items()}
    results = {"shape": shape, "parameters": parameters, "dtype": "bfloat16", "build_s": build_s, "batch": size,
               "input_length": length, "vocab_chunk": vocab_chunk, "seconds": times,
               "sequences_per_s": {impl: size / m[impl] for impl in IMPLS},
               "tokens_per_s": {impl: size * length / m[impl] for impl in IMPLS},
               "peak_bytes_above_weights": peaks, "weights_bytes": 2 * parameters,
               "max_logprob_diff": agreement}
    name = "Llama-3.1-8B-shaped" if not check.quick else "tiny Llama (quick)"
    lines = [f"A randomly initialised {name} LlamaForCausalLM ({parameters:,} parameters: hidden "
             f"{shape['hidden_size']}, {shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads "
             f"({shape['num_key_value_heads']} KV), MLP {shape['intermediate_size']}, vocabulary "
             f"{shape['vocab_size']:,}, untied head), built on {check.device} in bfloat16 in {build_s:.1f} s, with the "
             f"tiny-Llama fixture's tokenizer at that vocabulary. B={size} urn sequences of C=128 draws, V=8, fixed "
             f"mapping, L={length} input tokens each. normscale: `LLMScorer` (V candidate logits, chunked logsumexp, "
             f"vocab_chunk={vocab_chunk}); baseline: full `.logits`, `log_softmax`, gather. Medians of {rounds} "
             f"interleaved rounds after a warm-up; peak: memory one call allocates above the weights "
             f"({2 * parameters / 2 ** 30:.2f} GiB).", "",
             "| implementation | sequences/s | tokens/s | every round (s) | peak above weights (GiB) |",
             "|---|---:|---:|---|---:|"]
    lines += [f"| {impl} | {size / m[impl]:.1f} | {size * length / m[impl]:.0f} "
              f"| {', '.join(f'{t:.3f}' for t in times[impl])} | {peaks[impl] / 2 ** 30:.3f} |" for impl in IMPLS]
    lines += ["", f"Max |difference| of the renormalised candidate log-probs, normscale vs baseline: {agreement:.2e} "
              "(bf16 logits)."]
    return results, lines


def train_variants(check: Check, cache: Path, variants: dict[str, list[str]], steps: int, window: int,
                   rounds: int) -> dict[str, dict]:
    """Each variant's `python -m normscale.train` (extra overrides) in interleaved rounds, in cache directory
    `cache`: steps/s every round and the objective at the last logging step."""
    from bench_train import compose, normscale_overrides, normscale_records, prepare_data, steady_rate
    measured = {name: {"steps_per_s": [], "last_objective": []} for name in variants}
    prepare_data(compose(normscale_overrides(cache, steps, window)))
    for r in range(rounds):
        for name in rounds_order(variants, r):
            records = normscale_records(cache, [*EVAL, *variants[name]], steps, window)
            measured[name]["steps_per_s"].append(steady_rate(records))
            measured[name]["last_objective"].append(records[-1]["objective"])
            print(f"round {r} {name}: {measured[name]['steps_per_s'][-1]:.1f} steps/s", flush=True)
            check.save({"steps": steps, "variants": measured}, [])
    for values in measured.values():
        values["median"] = median(values["steps_per_s"])
    return measured


def variant_table(measured: dict[str, dict], reference: str) -> list[str]:
    lines = [f"| configuration | steps/s (median) | every round | vs {reference} | objective at the last log |",
             "|---|---:|---|---:|---:|"]
    base = measured[reference]["median"]
    lines += [f"| {name} | {v['median']:.1f} | {', '.join(f'{x:.1f}' for x in v['steps_per_s'])} "
              f"| {v['median'] / base:.2f}x | {v['last_objective'][-1]:.4f} |" for name, v in measured.items()]
    return lines


def generate(check: Check) -> tuple[dict, list[str]]:
    import torch
    from bench_train import compose, normscale_overrides, prepare_data
    from normscale.data import GeneratedBatches, load_task_pools
    steps, window, rounds = check.pick((1000, 200, 2), (20, 10, 1))
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"source=shards": [], "source=generate": ["data_kwargs.source=generate"]}
        measured = train_variants(check, Path(tmp), variants, steps, window, rounds)
        # the generated batches themselves, on the device
        config = compose([*normscale_overrides(Path(tmp), steps, window), "data_kwargs.source=generate"])
        tasks = load_task_pools(prepare_data(config).plan.directory)["train"]
        first, second = (GeneratedBatches(config, tasks, device=check.device) for _ in range(2))
        probe = [0, 1, steps - 1]
        batches = [(first.batch(s), second.batch(s)) for s in probe]
        deterministic = all(torch.equal(a[n], b[n]) for a, b in batches for n in a)
        devices = sorted({str(t.device) for a, _ in batches for t in a.values()})
    results = {"steps": steps, "variants": measured, "deterministic": deterministic, "batch_devices": devices}
    lines = [f"`python -m normscale.train` (canonical urns, width 64, fp32), {steps} steps, steps/s over all logging "
             f"windows of {window} but the first, medians of {rounds} interleaved rounds; source=generate draws each "
             f"step's batch on the device from its counter-based stream, nothing read from disk.", "",
             *variant_table(measured, "source=shards"), "",
             f"GeneratedBatches on {check.device}: batches of steps {probe} made twice by separate instances are "
             f"{'identical' if deterministic else 'DIFFERENT'}; their tensors are on {', '.join(devices)}."]
    if not deterministic:
        check.save(results, lines)
        raise AssertionError("source=generate gave different batches for the same step")
    return results, lines


def bf16(check: Check) -> tuple[dict, list[str]]:
    widths, steps, window, rounds = check.pick(((64, 1024), 400, 100, 2), ((16,), 20, 10, 1))
    variants = {f"width {w}, {p}": [f"model_kwargs.hidden_size={w}", f"training_kwargs.precision={p}"]
                for w in widths for p in ("fp32", "bf16")}
    with tempfile.TemporaryDirectory() as tmp:
        measured = train_variants(check, Path(tmp), variants, steps, window, rounds)
    lines = [f"`python -m normscale.train` (canonical urns, 1 layer, 1 head, MLP x4), precision=bf16 (Accelerate's "
             f"autocast, fp32 weights and AdamW) against fp32, {steps} steps, steps/s over all logging windows of "
             f"{window} but the first, medians of {rounds} interleaved rounds."]
    for w in widths:
        part = {k: v for k, v in measured.items() if k.startswith(f"width {w},")}
        lines += ["", *variant_table(part, f"width {w}, fp32")]
    bad = [k for k, v in measured.items() if not math.isfinite(v["last_objective"][-1])]
    if bad:
        check.save({"variants": measured}, lines)
        raise AssertionError(f"non-finite objective in {', '.join(bad)}")
    return {"steps": steps, "variants": measured}, lines


def trainer(check: Check) -> tuple[dict, list[str]]:
    from bench_train import child_rate, compose, normscale_overrides, normscale_rate, prepare_data, trainer_label
    steps, window, rounds = check.pick((1000, 200, 2), (20, 10, 1))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        prepare_data(compose(normscale_overrides(cache, steps, window)))
        configs = {
            "Trainer, eager": lambda: child_rate(cache, steps, window, "--trainer", "untuned"),
            "normscale, model=transformer": lambda: normscale_rate(cache, [*EVAL, "model=transformer"], steps, window),
        }
        if not check.quick:  # compiling takes half a minute on a CPU; and the Trainer's model in normscale's loop
            configs |= {
                "Trainer, compiled": lambda: child_rate(cache, steps, window, "--trainer", "tuned"),
                "normscale, model=transformer, compiled": lambda: normscale_rate(
                    cache, [*EVAL, "model=transformer", "training_kwargs.compile=true"], steps, window),
                "normscale, model=hf_gpt_neox": lambda: normscale_rate(cache, [*EVAL, "model=hf_gpt_neox"], steps,
                                                                      window),
            }
        rates = {name: [] for name in configs}
        for r in range(rounds):
            for name in rounds_order(configs, r):
                rates[name].append(configs[name]())
                print(f"round {r} {name}: {rates[name][-1]:.1f} steps/s", flush=True)
                check.save({"steps": steps, "steps_per_s": rates}, [])
    m = {name: median(v) for name, v in rates.items()}
    base = m["Trainer, eager"]
    lines = [f"One run, canonical urns (width 64, 1 layer, batch 64, fp32), {steps} steps, steady-state steps/s (all "
             f"but the first {window} steps), medians of {rounds} interleaved rounds, each configuration in its own "
             f"process. Trainer: transformers' Trainer on GPTNeoXForCausalLM of the same size (bench/bench_train.py): "
             f"eager is `{trainer_label('untuned')}`, compiled `{trainer_label('tuned')}`. normscale: `python -m "
             f"normscale.train`, compiled with training_kwargs.compile=true; model=hf_gpt_neox is the Trainer's "
             f"model in normscale's loop." + (" Quick mode: eager rows only." if check.quick else ""), "",
             "| configuration | steps/s (median) | every round | vs Trainer, eager |", "|---|---:|---|---:|"]
    lines += [f"| {name} | {m[name]:.1f} | {', '.join(f'{v:.1f}' for v in rates[name])} | {m[name] / base:.2f}x |"
              for name in configs]
    return {"steps": steps, "steps_per_s": rates, "median": m}, lines


# name: (function, modules it needs, time limit on the device in seconds), in the order they run
SECTIONS = {
    "pack": (pack, (), 100),
    "solo_processes": (solo_processes, (), 60),
    "packed_equals_solo": (packed_equals_solo, ("pytest",), 40),
    "llm": (llm, ("transformers", "tokenizers"), 75),
    "generate": (generate, ("hydra", "omegaconf", "h5py"), 60),
    "bf16": (bf16, ("hydra", "omegaconf", "h5py"), 90),
    "trainer": (trainer, ("hydra", "omegaconf", "h5py", "transformers"), 180),
}


# -------------------------------------------------------------------------------------------------- orchestration

def probe() -> dict:
    """This machine and its accelerator, as the sections' processes see them."""
    import torch
    facts = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
             "cuda": torch.version.cuda, "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts |= {"device": p.name, "device_memory_gib": p.total_memory / 2 ** 30,
                  "capability": f"{p.major}.{p.minor}", "device_count": torch.cuda.device_count()}
    for name in ("transformers", "accelerate"):
        try:
            facts[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return facts


def run_section(name: str, check: Check, limit: float, env: dict) -> tuple[int | None, str]:
    """The section in its own process (and process group), its output streamed here; (exit code or None if it ran
    out of time, the last lines of its output)."""
    command = [sys.executable, __file__, "--section", name, "--out", str(check.out), *(["--quick"] * check.quick)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=ROOT, start_new_session=True)
    tail = collections.deque(maxlen=30)

    def relay():
        for line in process.stdout:
            print(f"[{name}] {line}", end="", flush=True)
            tail.append(line)

    reader = threading.Thread(target=relay)
    reader.start()
    try:
        code = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the section and what it started (training runs, solo workers)
        process.wait()
        code = None
    reader.join()
    return code, "".join(tail)


def render(check: Check, facts: dict, command: str, records: dict, elapsed: float) -> str:
    if "device" in facts:
        device = (f"{facts['device']} ({facts['device_memory_gib']:.1f} GiB, compute capability {facts['capability']}"
                  f"), CUDA {facts['cuda']}")
    else:
        device = "no GPU: CPU only (quick mode)"
    versions = ", ".join(f"{k} {facts[k]}" for k in ("torch", "python", "transformers", "accelerate") if k in facts)
    precision = facts["float32_matmul_precision"]
    tf32 = "TF32 off everywhere" if precision == "highest" else \
        "TF32 on in the training runs and the Trainer's, off in this script's own processes"
    lines = ["# GPU check", "",
             f"`{command}` (what `make gpu-check OUT=...` runs), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
             f"Device: {device}; {facts['cpu_cores']} CPU cores; {versions}; float32 matmul precision by default "
             f"\"{precision}\" ({tf32}). Wall time {elapsed:.0f} s (sections may start until "
             f"{TOTAL_BUDGET_S[check.quick]} s). Each section says what it measures; bench/gpu_check.py's docstring "
             "has the overview.", ""]
    for name, record in records.items():
        lines += [f"## {name}: {record['status']} ({record['seconds']:.0f} s)", ""]
        lines += record["markdown"] + ([""] if record["markdown"] else [])
        if record.get("error"):
            lines += ["```", record["error"].rstrip(), "```", ""]
    return "\n".join(lines)


def orchestrate(check: Check, only: list[str]) -> int:
    check.out.mkdir(parents=True, exist_ok=True)
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if check.quick:
        env["OMP_NUM_THREADS"] = "1"  # a small shared CPU: more threads spin against other load
    done = subprocess.run([sys.executable, __file__, "--probe"], capture_output=True, text=True, env=env)
    if done.returncode:
        last = done.stderr.strip().splitlines()[-1:] or ["no output"]
        sys.exit(f"gpu_check: torch does not start with {sys.executable} ({last[0]}); run it with the Python that "
                 "holds torch (make gpu-check GPU_PY=...)")
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    if not check.quick and "device" not in facts:
        sys.exit("gpu_check: torch sees no CUDA device here; --quick runs the CPU mode")
    command = " ".join(["python", "bench/gpu_check.py", *sys.argv[1:]])
    print(f"gpu_check: {json.dumps(facts)}", flush=True)
    started, records = time.monotonic(), {}
    for name in only:
        _, needs, limit = SECTIONS[name]
        if check.quick:
            limit = 120
        limit = min(limit, TOTAL_BUDGET_S[check.quick] - (time.monotonic() - started))
        section_start = time.monotonic()
        (check.out / f"{name}.json").unlink(missing_ok=True)
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        error = ""
        if missing:
            status = f"not run: missing {', '.join(missing)} (make gpu-check installs them from the device wheels)"
        elif limit < MIN_SECTION_S:
            status = f"not run: the total budget of {TOTAL_BUDGET_S[check.quick]} s is spent"
        else:
            code, error = run_section(name, check, limit, env)
            status = {0: "ok", None: f"timed out after {limit:.0f} s"}.get(code, f"failed (exit {code})")
            error = "" if code == 0 else error
        path = check.out / f"{name}.json"
        partial = json.loads(path.read_text()) if path.exists() else {"results": {}, "markdown": []}
        records[name] = {"section": name, "status": status, "seconds": time.monotonic() - section_start,
                         "limit_s": limit, "quick": check.quick, "command": command,
                         "device": facts.get("device", "cpu"), "error": error, **partial}
        write_json(path, records[name])
        (check.out / "GPU.md").write_text(render(check, facts, command, records, time.monotonic() - started) + "\n")
        print(f"gpu_check: {name}: {status} ({records[name]['seconds']:.0f} s)", flush=True)
    if not check.quick:
        (ROOT / "docs" / "GPU.md").write_text((check.out / "GPU.md").read_text())
    failed = [name for name, r in records.items() if r["status"] != "ok"]
    print(f"gpu_check: {len(records) - len(failed)} of {len(records)} sections ok"
          + (f"; not ok: {', '.join(failed)}" if failed else "") + f"; summary in {check.out / 'GPU.md'}", flush=True)
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="directory for <section>.json and GPU.md")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny sizes, one round (about a minute)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in the usual order")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # one section, in this process
    parser.add_argument("--solo", help=argparse.SUPPRESS)  # a solo_processes worker
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe()))
        return
    if args.out is None:
        parser.error("--out DIR is required")
    check = Check(args.out.resolve(), args.quick, args.section or "")
    if args.solo or args.section:
        set_precision()
    if args.solo:
        solo_worker(check, *json.loads(args.solo))
        return
    if args.section:
        check.save(*SECTIONS[args.section][0](check))
        return
    unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    sys.exit(orchestrate(check, [s for s in SECTIONS if s in args.sections.split(",")]))


if __name__ == "__main__":
    main()
