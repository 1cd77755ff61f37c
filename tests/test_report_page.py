"""report.html (normscale/analysis/page.py): self-contained, every figure embedded byte for byte, and the numbers it
shows are summary.json's. `check_page` is also applied to a real analysis in tests/test_eval.py."""
import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from normscale.analysis import bootstrap, figures, normative, page
from normscale.analysis.report import checkpoint_split, checkpoints_to_fit
from test_bootstrap import ALPHA, BETA, SETTING, synthetic_runs, true_gamma

DATA_URI = "data:image/png;base64,"


class Page(HTMLParser):
    """The text of every element with an id, the images (alt -> src) and every attribute value."""

    def __init__(self, text: str):
        super().__init__()
        self.by_id, self.images, self.attributes, self.tags = {}, {}, [], set()
        self.open_ids: list[str | None] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.attributes += [(tag, name, value) for name, value in attrs.items()]
        if tag == "img":
            self.images[attrs["alt"]] = attrs["src"]
            return
        if tag in ("br", "meta"):
            return
        self.open_ids.append(attrs.get("id"))
        if attrs.get("id"):
            self.by_id[attrs["id"]] = ""

    def handle_endtag(self, tag):
        if tag not in ("br", "meta", "img"):
            self.open_ids.pop()

    def handle_data(self, data):
        for element_id in self.open_ids:
            if element_id:
                self.by_id[element_id] += data


def shown(page_: Page, element_id: str) -> float | None:
    text = page_.by_id[element_id]
    return None if text == "\u2013" else float(text)


def assert_shows(page_: Page, element_id: str, value: float | None):
    """The page shows value to its 4 significant digits (a dash for None)."""
    if value is None or isinstance(value, float) and not math.isfinite(value):
        assert page_.by_id[element_id] == "\u2013", element_id
    else:
        assert shown(page_, element_id) == pytest.approx(value, rel=5e-4, abs=1e-12), element_id


def check_page(out: Path) -> Page:
    """out/report.html against out/summary.json and the figure files; returns the parsed page."""
    summary = json.loads((out / "summary.json").read_text())
    text = (out / page.FILE_NAME).read_text()
    parsed = Page(text)
    assert set(parsed.images) == set(summary["figures"])
    for name in summary["figures"]:
        src = parsed.images[name]
        assert src.startswith(DATA_URI) and base64.b64decode(src[len(DATA_URI):]) == (out / name).read_bytes(), name
    # self-contained: nothing fetched from a network or a file
    assert "http://" not in text and "https://" not in text and "file:" not in text
    assert not parsed.tags & {"link", "script", "iframe", "object", "embed", "a"}
    assert all(value.startswith(DATA_URI) for tag, name, value in parsed.attributes if name in ("src", "href"))
    fit = summary["fit"]
    for key in ("alpha", "beta", "gamma", "pearson_r_held_out", "pearson_r_all", "n_fit_cells", "n_held_out_cells"):
        assert_shows(parsed, f"fit.{key}", fit[key])
    for D, steps in summary["transition_steps"]["predicted"].items():
        assert_shows(parsed, f"N-star.{D}", steps)
    assert_shows(parsed, "D-star", summary["task_diversity_threshold_D*"])
    uncertainty = summary["fit_uncertainty"]
    if uncertainty["unavailable"]:
        assert uncertainty["unavailable"] in parsed.by_id["uncertainty-unavailable"]
    else:
        for name, stats in uncertainty["parameters"].items():
            for field, value in stats.items():
                assert_shows(parsed, f"interval.{name}.{field}", value)
    for D, split in summary["fitted_checkpoints"].items():
        for side in ("fit", "held_out"):
            assert_shows(parsed, f"checkpoints.{D}.{side}.cells", split[side]["cells"])
            first_last = split[side]["steps"]
            assert parsed.by_id[f"checkpoints.{D}.{side}.steps"] == (
                "\u2013" if first_last is None else f"{first_last[0]} \u2013 {first_last[1]}")
    return parsed


def experiment_summary(out: Path, runs_per_D: int, extra_fit: dict) -> dict:
    """A summary.json and its figures as report.analyze writes them, from synthetic runs."""
    cells, run_of_cell = synthetic_runs(runs_per_D, seed=0)
    result = normative.fit(cells, SETTING, init=(BETA, ALPHA, true_gamma()))
    predicted = [float(normative.memorizing_weight(c.step, c.K_M, c.K_G, c.L_M, c.L_G, result.alpha, result.beta,
                                                   result.gamma)) for c in cells]
    for cell, w in zip(cells, predicted):
        cell.observed_w_M = w
    fitted = {id(c) for c in normative.split_cells(cells)[0]}
    written = [figures.save(figures.w_m_heatmap(cells, predicted), out / "w_M_heatmap.png"),
               figures.save(figures.predicted_vs_observed(cells, predicted, fitted, result),
                            out / "predicted_vs_observed.png")]
    Ds = sorted({c.D for c in cells})
    chosen = checkpoints_to_fit("all", cells, [], "categorical")[1]
    fit = {**result.to_json_dict(), "checkpoints": chosen, **extra_fit}
    summary = {
        "experiment": "synthetic <&>", "setting": SETTING, "metrics_file": str(out / "metrics.h5"), "fit": fit,
        "complexity_bits": {str(c.D): {"memorizing": c.K_M, "generalizing": c.K_G} for c in cells},
        "strategy_loss": {str(c.D): {"memorizing": c.L_M, "generalizing": c.L_G} for c in cells},
        "final_w_M": {split: {str(D): 0.5 for D in Ds} for split in ("id", "ood")},
        "task_diversity_threshold_D*": 5.25,
        "transition_steps": {"predicted": fit["transition_steps"], "observed": {run: None for run in run_of_cell}},
        "transition_sequences": {"predicted": {str(D): None for D in Ds},
                                 "observed": {run: 160 for run in run_of_cell}},
        "figures": [p.name for p in written], "widths": "not plotted: one hidden size (64) in this experiment",
        "fit_uncertainty": bootstrap.over_runs(cells, run_of_cell, SETTING, result, resamples=4),
        "fitted_checkpoints": checkpoint_split(cells, run_of_cell, fitted),
    }
    (out / "summary.json").write_text(json.dumps(summary))
    return summary


def test_the_page_embeds_every_figure_and_shows_the_summary_numbers(tmp_path):
    summary = experiment_summary(tmp_path, runs_per_D=2, extra_fit={})
    assert summary["fit_uncertainty"]["unavailable"] is None
    page.write(summary, tmp_path)
    parsed = check_page(tmp_path)
    assert "synthetic &lt;&amp;&gt;" in (tmp_path / page.FILE_NAME).read_text()  # text is escaped
    assert "Flags" not in parsed.by_id.values()


def test_keys_added_to_the_fit_are_shown_and_flags_first(tmp_path):
    summary = experiment_summary(tmp_path, runs_per_D=1, extra_fit={"flags": ["alpha at its bound"], "starts": 7})
    page.write(summary, tmp_path)
    parsed = check_page(tmp_path)
    text = (tmp_path / page.FILE_NAME).read_text()
    assert shown(parsed, "fit.starts") == 7 and parsed.by_id["fit.flags"] == "alpha at its bound"
    assert text.index("alpha at its bound") < text.index("<h2>Fit</h2>")  # the flags box comes before the table
    assert "single run" in parsed.by_id["uncertainty-unavailable"]


def test_check_page_fails_on_a_wrong_number_or_a_changed_figure(tmp_path):
    summary = experiment_summary(tmp_path, runs_per_D=1, extra_fit={})
    page.write(summary, tmp_path)
    check_page(tmp_path)
    summary["fit"]["alpha"] *= 1.01
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(AssertionError, match="fit.alpha"):
        check_page(tmp_path)
    page.write(summary, tmp_path)
    fig = plt.figure()
    figures.save(fig, tmp_path / "w_M_heatmap.png")
    with pytest.raises(AssertionError, match="w_M_heatmap.png"):
        check_page(tmp_path)
