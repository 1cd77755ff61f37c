"""report.html: one self-contained page (no network, no external files: the figures are embedded as base64 PNG data
URIs and the style is inline) that a person reads, rendered from the analysis' summary dict and its figure files.

Shown: the fit's flags first when it has any, every key of summary["fit"] (so keys added to the fit appear without
changes here), the bootstrap intervals of alpha, beta, gamma, N*(D) per D with K_s, L_s and the final w_M, D*, the
observed transition step per run, which checkpoints were fitted and which held out, and the figures. Numbers carry
ids (fit.<key>, interval.<parameter>.<field>, N-star.<D>, D-star, checkpoints.<D>.<fit|held_out>.<cells|steps>) so
they can be checked against summary.json.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from normscale.fileio import atomic_path

FILE_NAME = "report.html"
STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; }
.flags { border: 2px solid #c00; background: #fee; padding: 0.5em 1em; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; }
"""


def write(summary: dict, out: Path) -> Path:
    """Render the page from summary and the figures it lists (PNG files in out) and write it to out/report.html."""
    figures = {name: (Path(out) / name).read_bytes() for name in summary["figures"]}
    path = Path(out) / FILE_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(render(summary, figures), encoding="utf-8")
    return path


def render(summary: dict, figures: dict[str, bytes]) -> str:
    fit = summary["fit"]
    parts = [f"<h1>{esc(summary['experiment'])}: normative fit ({esc(summary['setting'])})</h1>",
             f"<p class='note'>From {esc(summary['metrics_file'])}.</p>"]
    if fit.get("flags"):
        parts += ["<div class='flags'><h2>Flags</h2>", value_html(fit["flags"]), "</div>"]
    parts += ["<h2>Fit</h2>", table(["", "value"], [[esc(key), value_html(value, f"fit.{key}")]
                                                     for key, value in fit.items()])]
    parts += uncertainty_section(summary["fit_uncertainty"])
    parts += transition_section(summary)
    parts += checkpoints_section(summary["fitted_checkpoints"], fit["checkpoints"])
    parts.append("<h2>Figures</h2>")
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(name)}</figcaption></figure>")
    parts.append(f"<p class='note'>Width: {value_html(summary['widths'])}</p>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(summary['experiment'])}: normscale report</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def uncertainty_section(uncertainty: dict) -> list[str]:
    runs = ", ".join(f"D={D}: {n}" for D, n in uncertainty["runs_per_D"].items())
    about = (f"{esc(uncertainty['method'])}: {uncertainty['resamples']} resamples, seed {uncertainty['seed']}; "
             f"runs per D: {esc(runs)}")
    if uncertainty["unavailable"]:
        return ["<h2>Uncertainty</h2>", f"<p>{about}.</p>",
                f"<p class='flags' id='uncertainty-unavailable'>No intervals: {esc(uncertainty['unavailable'])}.</p>"]
    low, high = uncertainty["percentiles"]
    rows = [[esc(name)] + [number(stats[field], f"interval.{name}.{field}")
                           for field in ("estimate", "low", "high", "standard_error")]
            for name, stats in uncertainty["parameters"].items()]
    return ["<h2>Uncertainty</h2>",
            f"<p>{about}; {uncertainty['not_converged']} refit(s) did not converge.</p>",
            table(["parameter", "estimate", f"{low:g}%", f"{high:g}%", "standard error"], rows)]


def transition_section(summary: dict) -> list[str]:
    predicted = summary["transition_steps"]["predicted"]
    intervals = summary["fit_uncertainty"].get("transition_steps")  # absent when the bootstrap was unavailable
    low, high = summary["fit_uncertainty"]["percentiles"]
    rows = []
    for D in sorted(predicted, key=int):
        K, L = summary["complexity_bits"][D], summary["strategy_loss"][D]
        rows.append([esc(D), number(K["memorizing"]), number(K["generalizing"]), number(L["memorizing"]),
                     number(L["generalizing"]), number(predicted[D], f"N-star.{D}"),
                     f"{number(intervals[D]['low'])} &ndash; {number(intervals[D]['high'])}" if intervals
                     else "&ndash;",
                     value_html(summary["transition_sequences"]["predicted"][D]),
                     number(summary["final_w_M"]["id"][D]), number(summary["final_w_M"]["ood"][D])])
    observed = [[esc(run), value_html(step), value_html(summary["transition_sequences"]["observed"][run])]
                for run, step in summary["transition_steps"]["observed"].items()]
    return ["<h2>Transition</h2>",
            "<p>N*(D): the predicted step where w_M crosses 1/2 (&ndash;: no transition, K_M &le; K_G or "
            "L_G &le; L_M).</p>",
            table(["D", "K_M (bits)", "K_G (bits)", "L_M", "L_G", "N*(D) steps", f"{low:g}&ndash;{high:g}%",
                   "N*(D) sequences", "final w_M (ID)", "final w_M (OOD)"], rows),
            f"<p>Task-diversity threshold D* (final w_M crosses 0.5): "
            f"{number(summary['task_diversity_threshold_D*'], 'D-star')}</p>",
            "<p>Observed transition step per run (the first checkpoint after which w_M stays above 0.5):</p>",
            table(["run", "step", "sequences"], observed)]


def checkpoints_section(split: dict, chosen: dict) -> list[str]:
    """The fit/held-out split per D; `chosen` is summary.json's fit.checkpoints (fit_from and what it left)."""
    rows = []
    for D, part in sorted(split.items(), key=lambda item: int(item[0])):
        row = [esc(D), number(part["runs"])]
        for side in ("fit", "held_out"):
            first_last = part[side]["steps"]
            steps = "&ndash;" if first_last is None else f"{first_last[0]} &ndash; {first_last[1]}"
            row += [number(part[side]["cells"], f"checkpoints.{D}.{side}.cells"),
                    f"<span id='checkpoints.{esc(D)}.{side}.steps'>{steps}</span>"]
        rows.append(row)
    return ["<h2>Fitted checkpoints</h2>",
            f"<p>Checkpoints used (fit_from={esc(chosen['fit_from'])}): {chosen['n_cells']} of "
            f"{chosen['n_cells_total']} cells. Of those, fitted: the first 80% of each D's checkpoints for the "
            "smallest 80% of the D values; the others are held out.</p>",
            table(["D", "runs", "fitted cells", "fitted steps", "held-out cells", "held-out steps"], rows)]


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>"


def number(x: float | None, element_id: str | None = None) -> str:
    """x to 4 significant digits (&ndash; for None: undefined), in a span with element_id if given."""
    text = "&ndash;" if x is None else esc(str(x) if isinstance(x, int) else f"{x:.4g}")
    return text if element_id is None else f"<span id='{esc(element_id)}'>{text}</span>"


def value_html(value, element_id: str | None = None) -> str:
    """Any JSON value: numbers as `number`, dicts as key: value lines, lists of records of one kind (e.g. the fit's
    starts) as a table, other lists as lines, the rest as text; in a span with element_id if given."""
    if isinstance(value, float) and math.isfinite(value) or isinstance(value, int) and not isinstance(value, bool):
        return number(value, element_id)
    if isinstance(value, list) and value and all(isinstance(v, dict) and v.keys() == value[0].keys() for v in value):
        text = table([esc(k) for k in value[0]], [[value_html(v) for v in record.values()] for record in value])
    elif isinstance(value, dict):
        text = "<br>".join(f"{esc(str(k))}: {value_html(v)}" for k, v in value.items())
    elif isinstance(value, list):
        text = "<br>".join(value_html(v) for v in value)
    else:
        text = "&ndash;" if value is None else esc(str(value))
    return text if element_id is None else f"<span id='{esc(element_id)}'>{text}</span>"


def esc(text: str) -> str:
    return html.escape(str(text), quote=True)
