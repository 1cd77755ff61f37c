"""`make gpu-check QUICK=1` (bench/gpu_check.py on CPU, tiny sizes): every section runs and writes sane numbers, the
summary goes to OUT and never to docs/GPU.md; a section that fails is recorded and the next one runs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_check import SECTIONS, SWEEP_RUNS, SWEEP_STEPS  # noqa: E402
from test_pack import WEIGHT_TOLERANCE  # noqa: E402


def positive(values) -> bool:
    values = list(values)
    return bool(values) and all(math.isfinite(v) and v > 0 for v in values)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    docs = ROOT / "docs" / "GPU.md"
    before = docs.read_bytes()
    done = subprocess.run(["make", "gpu-check", "QUICK=1", f"OUT={out}", f"GPU_PY={sys.executable}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert docs.read_bytes() == before, "the quick mode wrote docs/GPU.md"
    return out, {name: json.loads((out / f"{name}.json").read_text()) for name in SECTIONS}


def test_every_section_ran_and_the_summary_has_it(quick):
    out, sections = quick
    summary = (out / "GPU.md").read_text()
    for name, record in sections.items():
        assert record["status"] == "ok", (name, record["error"])
        assert record["quick"] and record["device"] == "cpu" and record["results"]
        assert f"## {name}: ok" in summary and "\n".join(record["markdown"]) in summary
    assert "--quick" in summary


def test_pack_throughputs_and_the_sweep_projection(quick):
    results = quick[1]["pack"]["results"]
    assert {(r["width"], r["N"]) for r in results["rows"]} == {(16, 1), (16, 4), (32, 1), (32, 4)}
    for row in results["rows"]:
        for engine in ("stacked", "in_turn"):
            assert positive(row["run_steps_per_s"][engine]) and positive([row["median"][engine]])
    projection = results["projection"]
    assert (projection["runs"], projection["steps"]) == (SWEEP_RUNS, SWEEP_STEPS) == (297, 100_000)
    for p in projection["rows"]:
        best = max(r["median"][p["engine"]] for r in results["rows"] if r["width"] == 16)
        assert p["run_steps_per_s"] == best
        assert p["hours"] * 3600 * best == pytest.approx(297 * 100_000, rel=1e-9)


def test_solo_processes(quick):
    results = quick[1]["solo_processes"]["results"]
    assert positive(results["run_steps_per_s"]["stacked"]) and positive(results["run_steps_per_s"]["processes"])
    assert len(results["per_process_steps_per_s"][-1]) == results["N"] == 2
    assert positive(results["per_process_steps_per_s"][-1])
    assert results["sweep_hours"]["processes"] == pytest.approx(297e5 / results["median"]["processes"] / 3600)


def test_packed_equals_solo(quick):
    (row,) = quick[1]["packed_equals_solo"]["results"]["rows"]
    assert row["tolerance"] == WEIGHT_TOLERANCE
    assert row["steps"] == [50, 50, 30]  # the pack trained to each run's own max_steps
    assert 0 <= row["max_weight_diff"] <= WEIGHT_TOLERANCE and 0 <= row["max_objective_diff"] < 1e-4


def test_llm_scoring(quick):
    results = quick[1]["llm"]["results"]
    assert results["dtype"] == "bfloat16" and results["shape"]["vocab_size"] == 512
    assert positive(results["sequences_per_s"].values()) and positive(results["tokens_per_s"].values())
    assert results["max_logprob_diff"] < 0.1  # bf16 logits, two ways of computing the same log-probs


def test_generate_bf16_and_trainer(quick):
    sections = quick[1]
    generate = sections["generate"]["results"]
    assert generate["deterministic"] and generate["batch_devices"] == ["cpu"]
    for name in ("generate", "bf16"):
        for variant in sections[name]["results"]["variants"].values():
            assert positive(variant["steps_per_s"]) and all(math.isfinite(v) for v in variant["last_objective"])
    rates = sections["trainer"]["results"]["steps_per_s"]
    assert len(rates) == 2 and all(positive(v) for v in rates.values())


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    stub = tmp_path / "stub" / "transformers"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('transformers is broken here (test stub)')\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out), "--quick",
                           "--sections", "llm,packed_equals_solo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(tmp_path / "stub")})
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-2000:]
    llm = json.loads((out / "llm.json").read_text())
    assert llm["status"] == "failed (exit 1)" and "transformers is broken here" in llm["error"]
    assert json.loads((out / "packed_equals_solo.json").read_text())["status"] == "ok"
    summary = (out / "GPU.md").read_text()
    assert "## llm: failed (exit 1)" in summary and "## packed_equals_solo: ok" in summary
    assert sorted(p.name for p in out.iterdir()) == ["GPU.md", "llm.json", "packed_equals_solo.json"]
