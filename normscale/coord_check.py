"""Coordinate check (Yang et al. 2022): do activation sizes stay constant across widths during training?

`python -m normscale.coord_check [--setting S] [--model transformer|mlp] [--parametrization mup|sp|both]
[--widths 64,128,...] [--steps 4] [--out DIR]` trains each width for a few AdamW steps on identical batches
(fixed seeds), records the mean absolute coordinate of each layer type's output (forward hooks) before every update
and after the last, and writes coord_check.png, coord_check.csv and coord_check.md into --out (the table is printed
too). Under mup every row should be flat in width (log-log slope ~ 0); under sp the logits grow with width.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from normscale.config import Config, ModelConfig, TaskConfig
from normscale.data.priors import task_prior_weights
from normscale.model import build_model, optimizer_groups
from normscale.settings import get as get_setting
from normscale.settings import names as setting_names

LAYER_ORDER = ("read-in", "attention", "mlp", "hidden", "final hidden", "logits")


def layer_type(name: str) -> str | None:
    """The coordinate-check row a module's output belongs to, by its name in the model (None: not recorded)."""
    last = name.split(".")[-1]
    if name in ("read_in", "final_layer_norm", "read_out"):
        return {"read_in": "read-in", "final_layer_norm": "final hidden", "read_out": "logits"}[name]
    if name.startswith("layers.") and last in ("attention", "mlp"):
        return last
    if name.startswith("hidden."):
        return "hidden"
    return None


def batches(setting, batch_size: int, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    task = setting.task
    tasks = {k: torch.as_tensor(v) for k, v in setting.draw_tasks(task.num_tasks, np.random.default_rng(seed)).items()}
    weights = torch.as_tensor(task_prior_weights(task.prior, task.num_tasks, task.prior_exponent))
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps + 1):
        ids = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        out.append(setting.sample(tasks, ids, generator, weights))
    return out


def coord_data(setting: str = "balls_and_urns", parametrization: str = "mup", widths=(64, 128, 256, 512, 1024),
               steps: int = 4, model: str = "transformer", task: TaskConfig | None = None,
               model_kwargs: ModelConfig | None = None, learning_rate: float = 1e-2, batch_size: int = 32,
               seed: int = 0) -> list[dict]:
    """Rows {parametrization, width, step, layer, mean_abs}: step s is measured after s AdamW updates."""
    task = task or TaskConfig(num_dims=8, context_length=32, num_tasks=64)
    base = dataclasses.replace(model_kwargs or ModelConfig(num_layers=2), parametrization=parametrization)
    data = batches(get_setting(setting, task), batch_size, steps, seed)
    rows = []
    for width in widths:
        config = dataclasses.replace(Config(), setting=setting, model=model, task_kwargs=task,
                                     model_kwargs=dataclasses.replace(base, hidden_size=width))
        torch.manual_seed(seed)
        net = build_model(config)
        optimizer = torch.optim.AdamW(optimizer_groups(net, learning_rate, 0.0))
        sizes: dict[str, list[float]] = {}

        def record(module, inputs, output, kind):
            sizes.setdefault(kind, []).append(output.detach().abs().mean().item())

        hooks = [module.register_forward_hook(lambda m, i, o, kind=kind: record(m, i, o, kind))
                 for name, module in net.named_modules() if (kind := layer_type(name))]
        for step, batch in enumerate(data):
            sizes.clear()
            loss = get_setting(setting, task).objective(net(batch), batch).mean()
            rows += [{"parametrization": parametrization, "width": width, "step": step, "layer": kind,
                      "mean_abs": float(np.mean(values))} for kind, values in sizes.items()]
            if step < steps:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        for hook in hooks:
            hook.remove()
    return rows


def slopes(rows: list[dict]) -> dict[tuple[str, str, int], float]:
    """Least-squares slope of log(mean_abs) against log(width) per (parametrization, layer, step); NaN where a
    value is exactly 0 (the zero-initialised mup readout before the first update)."""
    groups: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for r in rows:
        groups.setdefault((r["parametrization"], r["layer"], r["step"]), []).append((r["width"], r["mean_abs"]))
    return {key: float(np.polyfit(*np.log(points).T, 1)[0]) if min(v for _, v in points) > 0 else math.nan
            for key, points in groups.items()}


def table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows: one per (parametrization, step, layer), a column per width, and the log-log slope."""
    widths = sorted({r["width"] for r in rows})
    value = {(r["parametrization"], r["step"], r["layer"], r["width"]): r["mean_abs"] for r in rows}
    slope = slopes(rows)
    keys = sorted({(r["parametrization"], r["step"], r["layer"]) for r in rows},
                  key=lambda k: (k[0], k[1], LAYER_ORDER.index(k[2])))
    body = [[p, s, layer, *[value[p, s, layer, w] for w in widths], slope[p, layer, s]] for p, s, layer in keys]
    return ["parametrization", "step", "layer", *[f"width {w}" for w in widths], "slope"], body


def write_outputs(rows: list[dict], out: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    header, body = table(rows)
    fmt = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in body]
    (out / "coord_check.csv").write_text("\n".join(",".join(r) for r in [header, *fmt]) + "\n")
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *["| " + " | ".join(r) + " |" for r in fmt]])
    (out / "coord_check.md").write_text(markdown + "\n")

    params = sorted({r["parametrization"] for r in rows})
    layers = [l for l in LAYER_ORDER if any(r["layer"] == l for r in rows)]
    steps = sorted({r["step"] for r in rows})
    fig, axes = plt.subplots(len(params), len(layers), figsize=(3 * len(layers), 2.8 * len(params)), squeeze=False)
    for i, p in enumerate(params):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            for s in steps:
                points = sorted((r["width"], r["mean_abs"]) for r in rows
                                if (r["parametrization"], r["layer"], r["step"]) == (p, layer, s))
                ax.plot(*zip(*points), marker="o", label=f"step {s}")
            ax.set(xscale="log", yscale="log", title=f"{p}: {layer}", xlabel="width")
            low, high = ax.get_ylim()  # at least a decade, so that noise on a flat row does not look like drift
            middle = math.sqrt(low * high)
            ax.set_ylim(min(low, middle / 3.2), max(high, middle * 3.2))
    axes[0, 0].set_ylabel("mean |coordinate|")
    axes[0, -1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "coord_check.png", dpi=100)
    plt.close(fig)
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m normscale.coord_check", description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="balls_and_urns", choices=setting_names())
    parser.add_argument("--model", default="transformer", choices=["transformer", "mlp"])
    parser.add_argument("--parametrization", default="both", choices=["mup", "sp", "both"])
    parser.add_argument("--widths", default="64,128,256,512,1024", help="comma-separated hidden sizes")
    parser.add_argument("--base-width", type=int, default=ModelConfig.base_width)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="AdamW updates (activations measured before each and after the last)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("coord_check"))
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    model_kwargs = ModelConfig(num_layers=args.num_layers, base_width=args.base_width)
    rows = []
    for p in (["mup", "sp"] if args.parametrization == "both" else [args.parametrization]):
        rows += coord_data(args.setting, p, widths, args.steps, args.model, model_kwargs=model_kwargs,
                           learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed)
    print(write_outputs(rows, args.out))
    print(f"wrote {args.out / 'coord_check.png'}, coord_check.csv and coord_check.md")


if __name__ == "__main__":
    main()
