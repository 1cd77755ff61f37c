"""Benchmark: evaluation throughput (sequences/s) on CPU at D=4096, normscale against its predecessor's approach.

The canonical balls_and_urns setting (V=8, C=128, the canonical model: hidden 64, 1 layer, randomly initialised,
which costs the same as a trained one), D=4096 training tasks, the saved eval sets written by `prepare_data`
(--sequences per split, splits id and ood). Measured, side by side in one process, --repeats rounds interleaved in
alternating order (medians shown):

  checkpoint    evaluating one checkpoint: the model's predictions, then the SPEC C metrics against M and G.
                normscale: `ModelEvaluator.evaluate` with M's and G's predictions already computed (the cost of each
                checkpoint when walking the checkpoints of a run), and its first checkpoint, which computes them
                (`references`, M in float64 as `build_bayes` defaults to) before evaluating.
                Predecessor: per eval batch, everything recomputed: the model on the batch, M by materialising
                (B, C, D, V) (`naive_memorizing` of bench_bayes.py, float32), G in closed form, and
                `normscale.metrics.summarize` on the batch; d_M, d_G, d_MG and the losses averaged over the (equal)
                batches and w_M taken from the averages, so that its scalars are the pooled ones normscale reports.
                Its batch is --naive-batch sequences, so that a (B, C, D, V) float32 tensor is 256 MiB at B=16.
  M predictor   M's predictions on the same sequences: normscale's chunked `BayesPredictor` through
                `ModelEvaluator.predict` (float64 as normscale uses it, and float32) against the time the predecessor
                spends in `naive_memorizing` inside its checkpoint evaluation (the same calls, timed in place).

Agreement: M's log-probabilities of normscale and the naive version (max |difference|), and the scalars of the two
checkpoint paths.

    .venv/bin/python bench/bench_eval.py [--markdown docs/BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_bayes import machine, naive_memorizing, write_section  # noqa: E402
from bench_train import compose  # noqa: E402
from normscale.data import prepare_data  # noqa: E402
from normscale.eval import ModelEvaluator  # noqa: E402
from normscale.metrics import predict, relative_w_m, summarize  # noqa: E402
from normscale.model import build_model  # noqa: E402

SECTION = "## Evaluation throughput"
EVAL_BATCH = 128
CHECKPOINTS = 20  # checkpoints of a run, for the amortised ratio
POOLED = ("loss", "kl", "d_M", "d_G", "d_MG")  # means over sequences and positions: equal batches average exactly


def normscale_checkpoint(config, model) -> dict:
    """A fresh evaluator: its first checkpoint (references computed), then a checkpoint with them cached."""
    evaluator = ModelEvaluator(config)
    start = time.perf_counter()
    for split in evaluator.splits:
        evaluator.references(split)
    references = time.perf_counter() - start
    evaluator.evaluate(model)
    first = time.perf_counter() - start
    start = time.perf_counter()
    results = evaluator.evaluate(model)
    cached = time.perf_counter() - start
    scalars = {split: s["scalars"] for split, s in results["splits"].items()}
    return {"references": references, "first": first, "cached": cached, "scalars": scalars, "evaluator": evaluator}


@torch.no_grad()
def predecessor_checkpoint(evaluator: ModelEvaluator, model, batch_size: int) -> dict:
    """Per batch: the model, M materialising (B, C, D, V), G in closed form, the metrics; nothing kept across
    checkpoints."""
    task = evaluator.config.task_kwargs
    theta = torch.as_tensor(evaluator.train_tasks["theta"]).float()
    log_prior = evaluator.log_prior.float()
    alpha, V = task.dirichlet_alpha, task.num_dims
    model = model.eval()
    naive_time, scalars, memorizing = 0.0, {}, {}
    start = time.perf_counter()
    for split, arrays in evaluator.splits.items():
        sums, parts, total = dict.fromkeys(POOLED, 0.0), [], len(arrays["tokens"])
        for i in range(0, total, batch_size):
            batch = {k: v[i:i + batch_size] for k, v in arrays.items()}
            predictions = predict(evaluator.setting, model, batch)
            tick = time.perf_counter()
            m = naive_memorizing(batch["tokens"], theta, log_prior)
            naive_time += time.perf_counter() - tick
            onehot = torch.nn.functional.one_hot(batch["tokens"][:, 1:], V).float()
            counts = onehot.cumsum(1) - onehot
            g = (counts + alpha).log() - (torch.arange(counts.shape[1]) + V * alpha).log()[:, None]
            batch_scalars = summarize(evaluator.setting, predictions, m, g, batch)["scalars"]
            for name in POOLED:
                sums[name] += batch_scalars[name] * len(predictions) / total
            parts.append(m)
        r, w_m = relative_w_m(*(torch.tensor(sums[k], dtype=torch.float64) for k in ("d_M", "d_G", "d_MG")))
        scalars[split] = sums | {"r": r.item(), "w_M": w_m.item()}
        memorizing[split] = torch.cat(parts)
    return {"total": time.perf_counter() - start, "naive_m": naive_time, "scalars": scalars, "memorizing": memorizing}


def normscale_m(evaluator: ModelEvaluator, dtype: torch.dtype) -> tuple[float, dict]:
    predictor = evaluator.predictor("memorizing").to(dtype)
    start = time.perf_counter()
    out = {split: evaluator.predict(predictor, split)[0] for split in evaluator.splits}
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--D", type=int, default=4096, help="number of training tasks")
    parser.add_argument("--sequences", type=int, default=256, help=f"eval sequences per split, a multiple of "
                        f"{EVAL_BATCH} (normscale's eval batch)")
    parser.add_argument("--naive-batch", type=int, default=16, help="the predecessor's batch size")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--markdown", help="write the results as this benchmark's section of this markdown file")
    args = parser.parse_args()
    if args.sequences % EVAL_BATCH or args.sequences % args.naive_batch:
        parser.error(f"--sequences must be a multiple of {EVAL_BATCH} and of --naive-batch")

    load = os.getloadavg()[0]
    print(f"Machine: {machine()}; 1-minute load average {load:.2f} at the start", flush=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        config = compose([f"cache_dir={tmp}", "name=bench", "setting=balls_and_urns", "logging.wandb=false",
                          f"task_kwargs.num_tasks={args.D}", f"data_kwargs.eval_size={args.sequences}",
                          f"eval_kwargs.batch_size={EVAL_BATCH}",
                          f"eval_kwargs.num_eval_batches={args.sequences // EVAL_BATCH}"])
        prepare_data(config, train_shards=False)
        model = build_model(config).eval()  # randomly initialised: the same cost as a trained checkpoint
        times = {k: [] for k in ("references", "first", "cached", "predecessor", "naive_m", "m64", "m32")}
        for round_ in range(args.repeats):  # alternate the order, so that drift in the machine's load hits all alike
            steps = ["normscale", "predecessor", "m"]
            for step in steps if round_ % 2 == 0 else reversed(steps):
                if step == "normscale":
                    ours = normscale_checkpoint(config, model)
                    for k in ("references", "first", "cached"):
                        times[k].append(ours[k])
                elif step == "predecessor":
                    theirs = predecessor_checkpoint(ModelEvaluator(config), model, args.naive_batch)
                    times["predecessor"].append(theirs["total"])
                    times["naive_m"].append(theirs["naive_m"])
                else:
                    evaluator = ModelEvaluator(config)
                    t64, _ = normscale_m(evaluator, torch.float64)
                    t32, m32 = normscale_m(evaluator, torch.float32)
                    times["m64"].append(t64)
                    times["m32"].append(t32)
            print(f"  round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        splits = list(ours["evaluator"].splits)
        refs = {s: ours["evaluator"].references(s)["memorizing"] for s in splits}
    loads = f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"

    n = args.sequences * len(splits)
    median = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: n / t for k, t in median.items()}
    mib = args.naive_batch * config.task_kwargs.context_length * args.D * config.task_kwargs.num_dims * 4 / 2**20
    rows = [
        ("checkpoint", "normscale `ModelEvaluator.evaluate`, M and G cached", "cached", "predecessor"),
        ("checkpoint", "normscale, first checkpoint (M and G computed, then evaluate)", "first", "predecessor"),
        ("checkpoint", "normscale, one-off part of the first: M and G references of every split", "references", None),
        ("checkpoint", f"predecessor: per batch of {args.naive_batch}, model + naive M + G + metrics",
         "predecessor", None),
        ("M predictor", "normscale `BayesPredictor`, float64 (as `ModelEvaluator` uses it)", "m64", "naive_m"),
        ("M predictor", "normscale `BayesPredictor`, float32", "m32", "naive_m"),
        ("M predictor", f"naive, materialises (B, C, D, V) float32 ({mib:.0f} MiB each) at B={args.naive_batch}",
         "naive_m", None),
    ]
    table = [f"| measurement | implementation | sequences/s (median of {args.repeats}) | every round (s) "
             "| normscale / predecessor |", "|---|---|---:|---:|---:|"]
    for what, name, key, base in rows:
        ratio = f"**{rate[key] / rate[base]:.1f}x**" if base else "1x" if key in ("predecessor", "naive_m") else ""
        table.append(f"| {what} | {name} | {rate[key]:.1f} | {', '.join(f'{t:.2f}' for t in times[key])} | {ratio} |")

    diff = lambda a, b: max((a[s].double() - b[s].double()).abs().max().item() for s in splits)  # noqa: E731
    scalar_diff = {name: max(abs(ours["scalars"][s][name] - theirs["scalars"][s][name]) for s in splits)
                   for name in (*POOLED, "w_M")}
    w_m = {s: round(ours["scalars"][s]["w_M"], 4) for s in splits}
    refs_share, naive_share = median["references"] / median["first"], median["naive_m"] / median["predecessor"]
    summary = [
        f"Per checkpoint with M and G cached, normscale evaluates **{rate['cached'] / rate['predecessor']:.0f}x** "
        f"the predecessor's sequences/s; its first checkpoint, which computes them, "
        f"{rate['first'] / rate['predecessor']:.1f}x; over a run of {CHECKPOINTS} checkpoints "
        "(references computed once), "
        f"{CHECKPOINTS * median['predecessor'] / (median['references'] + CHECKPOINTS * median['cached']):.0f}x. "
        "Computing M: normscale float64 "
        f"{rate['m64'] / rate['naive_m']:.1f}x, float32 {rate['m32'] / rate['naive_m']:.1f}x the naive version.",
        f"What dominates: the predecessor spends {100 * naive_share:.0f}% of its checkpoint time materialising M "
        f"(recomputed for every checkpoint); normscale's first checkpoint spends {100 * refs_share:.0f}% computing "
        "the references (M in float64), after which a checkpoint costs the model's forward pass and the metrics only.",
        f"Agreement: M log-probabilities, normscale float64 (as cached, stored float32) vs naive float32: max "
        f"|difference| {diff(refs, theirs['memorizing']):.2e}; normscale float32 vs naive: "
        f"{diff(m32, theirs['memorizing']):.2e}. Scalars of the two checkpoint paths, max |difference| over splits: "
        + ", ".join(f"{k} {v:.1e}" for k, v in scalar_diff.items())
        + f" (normscale's w_M: {w_m}).",
        "Timings on this shared 2-core VM vary from round to round (see the per-round times); the ratios are of "
        "medians of interleaved rounds, so drift in the load hits both sides alike.",
    ]
    command = f".venv/bin/python bench/bench_eval.py {' '.join(sys.argv[1:])}".strip()
    text = "\n".join([
        SECTION, "",
        f"Sequences/s of evaluating a checkpoint and of computing the M predictor, balls_and_urns V=8, C=128, "
        f"D={args.D}, {args.sequences} saved eval sequences per split (id and ood: {n} per checkpoint), the "
        "canonical model (hidden 64, 1 layer) randomly initialised (a trained checkpoint costs the same), CPU. "
        f"normscale: `ModelEvaluator` (eval batch {EVAL_BATCH}), M in float64 computed once per split and reused by "
        "every checkpoint. Predecessor: every eval batch recomputed from scratch (model, M materialising "
        "(B, C, D, V) twice, G in closed form, `summarize`), scalars pooled over batches. The naive M row is the time "
        "the predecessor spends in `naive_memorizing` within its checkpoint evaluation. Rounds interleaved, order "
        "alternating.", "",
        f"Command: `{command}`", "",
        f"Machine: {machine()}; 1-minute load average {loads} (the machine is shared)", "",
        *table, "", *[f"- {line}" for line in summary], "",
    ])
    print(text)
    if args.markdown:
        write_section(Path(args.markdown), SECTION, text)


if __name__ == "__main__":
    main()
