"""Runs written before settings became objects (tests/fixtures/pre_settings, by the code of commit 372ad5b) still
load, and today's code trains the same seed to bit-identical weights: parameter names and creation order are kept."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_module
from normscale.layout import run_name

FIXTURES = ROOT / "tests" / "fixtures" / "pre_settings"
_spec = importlib.util.spec_from_file_location("make_pre_settings", FIXTURES / "make.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


def weights(run: Path, step: int) -> dict:
    return load_file(run / f"checkpoint-{step}" / "model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)  # names and their order
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name  # bitwise: no NaN in these weights


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train(cache: Path, case: str):
    result = run_module("normscale.train", f"cache_dir={cache}", *make.overrides(case), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    setting = make.CASES[case][0]
    return cache / "experiments" / setting / "compat" / "runs" / run_name(make.overrides(case), 0)


@pytest.mark.parametrize("case", sorted(make.CASES))
def test_the_same_seed_trains_bit_identical_weights_and_objective(tmp_path, case):
    old = FIXTURES / case
    new = train(tmp_path / "cache", case)
    for step in (0, 2, 4):
        assert_identical(weights(new, step), weights(old, step))
    old_train, new_train = records(old / "train_metrics.jsonl"), records(new / "train_metrics.jsonl")
    # the training objective was called "loss" before (docs/ARCHITECTURE.md, changelog)
    assert [r["objective"] for r in new_train] == [r["loss"] for r in old_train]
    assert [r["per_task_objective"] for r in new_train] == [r["per_task_loss"] for r in old_train]
    assert [r["grad_norm"] for r in new_train] == [r["grad_norm"] for r in old_train]
    metric = {"balls_and_urns": "kl", "linear_regression": "mse_per_dim", "classification": "accuracy"}[make.CASES[case][0]]
    for old_eval, new_eval in zip(records(old / "eval_metrics.jsonl"), records(new / "eval_metrics.jsonl"), strict=True):
        for split in old_eval.keys() - {"step"}:
            assert new_eval[split][metric] == pytest.approx(old_eval[split][metric], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("case", ["balls_and_urns-transformer", "linear_regression-mlp", "classification-hf_gpt_neox"])
def test_a_resume_state_written_before_continues_bit_identically(tmp_path, case):
    """The old run, cut back to its step-2 resume state, is continued by today's code to the old step-4 weights."""
    cache = tmp_path / "cache"
    run = cache / "experiments" / make.CASES[case][0] / "compat" / "runs" / run_name(make.overrides(case), 0)
    shutil.copytree(FIXTURES / case, run, symlinks=True)
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / ".resume-4")
    (run / "resume").unlink()
    os.symlink(".resume-2", run / "resume")
    result = run_module("normscale.train", f"cache_dir={cache}", *make.overrides(case), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed at step 2" in result.stdout
    assert_identical(weights(run, 4), weights(FIXTURES / case, 4))
