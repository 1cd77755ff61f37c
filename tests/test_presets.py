"""The paper presets (conf/experiment/paper_*.yaml): each composes to RI's settings (DanielWurgaft/rational-icl,
experiments/<setting>/<sweep>/experiment_params.txt) and plans to RI's grid with the cost line that grid implies."""
import math
import re

import pytest

from conftest import compose_config
from normscale import sweep

D_GRID = [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
# preset: (setting, layers, batch, warmup, points, {swept key: RI's values})
PRESETS = {
    "paper_urns": ("balls_and_urns", 1, 64, 5000, 297,
                   {"num_dims": [8, 12, 16], "context_length": [128, 256, 320], "mlp": [0.5, 4, 8]}),
    "paper_urns_mlp_width": ("balls_and_urns", 1, 64, 0, 99, {"mlp": [0.5, 1, 2, 4, 8, 12, 16, 24, 32]}),
    "paper_regression": ("linear_regression", 8, 128, 5000, 297,
                         {"num_dims": [8, 12, 16], "context_length": [16, 32, 64], "mlp": [0.5, 4, 8]}),
    "paper_classification": ("classification", 1, 64, 0, 99, {"context_length": [128, 256, 384], "mlp": [0.5, 4, 8]}),
}
KEYS = {"num_dims": "task_kwargs.num_dims", "context_length": "task_kwargs.context_length",
        "mlp": "model_kwargs.mlp_expansion_factor"}


@pytest.mark.parametrize("preset", PRESETS)
def test_a_paper_preset_composes_to_the_papers_settings(preset, tmp_path):
    setting, layers, batch, warmup, _, _ = PRESETS[preset]
    config = compose_config(f"experiment={preset}", f"cache_dir={tmp_path}")
    config.check()
    assert (config.name, config.setting, config.model) == (preset, setting, "transformer")
    assert (config.model_kwargs.hidden_size, config.model_kwargs.num_layers, config.model_kwargs.num_heads) == \
        (64, layers, 1)
    t = config.training_kwargs
    assert (t.batch_size, t.learning_rate, t.max_steps, t.warmup_steps, t.lr_schedule) == \
        (batch, 5e-4, 100_000, warmup, "constant")
    assert (t.weight_decay, t.max_grad_norm, t.precision) == (0.0, 1.0, "fp32")
    assert config.task_kwargs.num_ood_tasks == 500
    steps = config.checkpoint_steps  # RI's save_steps
    assert len(steps) == 100 and steps[:5] == [20, 58, 115, 193, 291] and steps[-3:] == [96056, 98018, 100000]
    assert config.data_kwargs.source == ("shards" if setting == "balls_and_urns" else "generate")


def planned(capsys, monkeypatch, tmp_path, *overrides: str) -> tuple[list[str], list[str]]:
    """`sweep plan <overrides>`'s point lines and its normscale: lines (no SLURM asked: a default MaxArraySize)."""
    monkeypatch.setattr(sweep, "max_array_size", lambda: sweep.DEFAULT_MAX_ARRAY_SIZE)
    sweep.plan([*overrides, f"cache_dir={tmp_path}"], submit=False, throttle=None)
    out = capsys.readouterr().out.splitlines()
    return [line for line in out if re.match(r"\s*\d+\s+missing", line)], \
        [line for line in out if line.startswith("normscale:")]


@pytest.mark.parametrize("preset", PRESETS)
def test_a_paper_preset_plans_the_papers_grid_and_its_cost(preset, capsys, monkeypatch, tmp_path):
    setting, _, batch, _, count, swept = PRESETS[preset]
    points, lines = planned(capsys, monkeypatch, tmp_path, f"experiment={preset}")
    assert len(points) == count == len(D_GRID) * math.prod(map(len, swept.values()))
    for D in D_GRID:
        assert sum(f"task_kwargs.num_tasks={D} " in p + " " for p in points) == count // len(D_GRID)
    for key, values in swept.items():
        seen = sorted({float(re.search(rf"{KEYS[key]}=(\S+)", p).group(1)) for p in points})
        assert seen == sorted(map(float, values))
    assert lines[0] == f"normscale: {count} point(s), 0 finished, {count} to run"
    assert lines[1] == (f"normscale: cost: {count * 100_000} run-steps ({count * 100_000 * batch} sequences) over "
                        f"{count} point(s); {count * 100_000} run-steps to run in {count} pack(s)")


def test_the_cost_line_counts_packs_and_the_canonical_slice_is_an_override(capsys, monkeypatch, tmp_path):
    _, lines = planned(capsys, monkeypatch, tmp_path, "experiment=paper_urns_mlp_width", "pack=11")
    assert "normscale: cost: 9900000 run-steps (633600000 sequences) over 99 point(s); 9900000 run-steps to run " \
           "in 9 pack(s)" in lines  # one pack per MLP width: D does not change a run's shape
    points, lines = planned(capsys, monkeypatch, tmp_path, "experiment=paper_urns", "task_kwargs.num_dims=8",
                            "task_kwargs.context_length=128", "model_kwargs.mlp_expansion_factor=4")
    assert len(points) == 11 and lines[1].startswith("normscale: cost: 1100000 run-steps (70400000 sequences)")
    points, _ = planned(capsys, monkeypatch, tmp_path, "experiment=paper_classification", "task_kwargs.num_dims=16",
                        "model_kwargs.mlp_expansion_factor=4")  # RI's 16-dims-exp
    assert len(points) == 33


def test_the_cpu_variant_is_the_canonical_model_on_shorter_urns(tmp_path):
    config = compose_config("experiment=paper_urns_cpu", f"cache_dir={tmp_path}")
    canonical = compose_config("experiment=paper_urns", f"cache_dir={tmp_path}")
    assert config.model_kwargs == canonical.model_kwargs and config.task_kwargs.num_dims == 8
    assert (config.task_kwargs.context_length, config.training_kwargs.batch_size) == (64, 32)
    assert config.training_kwargs.learning_rate == canonical.training_kwargs.learning_rate


def test_the_cost_line_leaves_out_finished_steps(monkeypatch, tmp_path):
    points = [sweep.resolve([f"cache_dir={tmp_path}", f"task_kwargs.num_tasks={D}", "training_kwargs.max_steps=100",
                             "training_kwargs.batch_size=8"]) for D in (2, 4, 8, 16)]
    monkeypatch.setattr(sweep.Point, "step", lambda self: 40)  # a resume state at step 40 where there is one
    line = sweep.cost_line(points, ["finished", "started", "missing", "failed"], 2)
    assert line == "normscale: cost: 400 run-steps (3200 sequences) over 4 point(s); 160 run-steps to run in 2 pack(s)"
