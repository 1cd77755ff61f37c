"""LLM evaluation end to end (`python -m normscale.eval experiment=llm_eval model_kwargs.model_path=...`) on a tiny
randomly initialised Llama saved as several safetensors shards: the unsharded, device_map (forced onto disk) and
2-process FSDP layouts agree; results are cached (overwrite=true evaluates again), collated, and a multirun over two
models writes two result sets; on a trained experiment (name=<experiment>) an LLM scores the trained run's own eval
sequences."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_module
from normscale.layout import list_checkpoints
from llm_fixture import make_tiny_llama
from normscale.collate import load_eval_results
from normscale.results import load_metrics

EVAL = ["experiment=llm_eval", "task_kwargs.num_dims=4", "task_kwargs.context_length=12", "task_kwargs.num_tasks=4",
        "task_kwargs.num_ood_tasks=20", "training_kwargs.batch_size=8", "data_kwargs.eval_size=32",
        "eval_kwargs.batch_size=8", "eval_kwargs.num_eval_batches=3", "eval_kwargs.return_all=true",
        "eval_kwargs.strategy_loss_sequences=100", "model_kwargs.dtype=float32", "model_kwargs.vocab_chunk=100"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return make_tiny_llama(root / "tiny-a", vocab_size=512, seed=0), make_tiny_llama(root / "tiny-b", vocab_size=512, seed=1)


def evaluate(cache, *args, launcher=None):
    env = {"CACHE_DIR": str(cache), "PYTHON": sys.executable}
    if launcher:
        result = subprocess.run(["bash", str(ROOT / "launch/cpu.sh"), "2", "-m", "normscale.eval", *EVAL, *args],
                                cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    else:
        result = run_module("normscale.eval", *EVAL, *args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def results_file(cache, model_dir, experiment="llm_eval"):
    runs = cache / "experiments" / "balls_and_urns" / experiment / "runs" / f"llm-{model_dir.name}"
    files = list(runs.glob("*/metrics.pt"))
    assert len(files) == 1, files
    return files[0]


def results_of(cache, model_dir, experiment="llm_eval"):
    return load_metrics(results_file(cache, model_dir, experiment))


def test_unsharded_device_map_and_fsdp_layouts_score_alike(models, tmp_path):
    model = models[0]
    whole = evaluate(tmp_path / "whole", f"model_kwargs.model_path={model}")
    dispatched = evaluate(tmp_path / "map", f"model_kwargs.model_path={model}", "model_kwargs.sharding=device_map",
                          "model_kwargs.max_memory=120KB", f"model_kwargs.offload_folder={tmp_path / 'offload'}")
    on_disk = int(re.search(r"\((\d+) module\(s\) on disk\)", dispatched.stdout).group(1))
    assert on_disk > 0  # the split is forced: it cannot equal the unsharded path by accident
    sharded = evaluate(tmp_path / "fsdp", f"model_kwargs.model_path={model}", "model_kwargs.sharding=fsdp", launcher=True)
    held = [tuple(map(float, m)) for m in re.findall(r"rank \d holds ([\d.]+) of ([\d.]+) MiB of ", sharded.stdout)]
    assert len(held) == 2 and all(0.4 < local / total < 0.6 for local, total in held), held  # ~1/world each
    after = [tuple(map(float, m)) for m in re.findall(r"rank \d holds ([\d.]+) of ([\d.]+) MiB after scoring",
                                                      sharded.stdout)]
    assert len(after) == 2 and all(0.4 < local / total < 0.6 for local, total in after), after  # and between forwards
    reference = results_of(tmp_path / "whole", model)
    for other in (results_of(tmp_path / "map", model), results_of(tmp_path / "fsdp", model)):
        for split in ("id", "ood"):
            assert torch.allclose(other["predictions"][split], reference["predictions"][split], atol=1e-4)
            assert other["splits"][split]["scalars"]["coverage"] == pytest.approx(
                reference["splits"][split]["scalars"]["coverage"], rel=1e-4)
    fsdp = results_of(tmp_path / "fsdp", model)
    assert fsdp["splits"]["id"]["batches_by_rank"] == {0: [0, 2], 1: [1]}  # 3 batches, data parallel over 2 ranks
    # the configured bfloat16 through the sharded loader: the float32 shards cast as each rank reads its slices
    evaluate(tmp_path / "fsdp16", f"model_kwargs.model_path={model}", "model_kwargs.sharding=fsdp",
             "model_kwargs.dtype=bfloat16", launcher=True)
    half = results_of(tmp_path / "fsdp16", model)
    assert 2 * half["parameter_bytes"]["total"] == reference["parameter_bytes"]["total"]
    assert 2 * half["parameter_bytes"]["local"] == fsdp["parameter_bytes"]["local"]
    diff = (half["predictions"]["id"] - reference["predictions"]["id"]).abs().max().item()
    assert 0 < diff < 0.02  # bfloat16 rounding, no more
    assert 0 < reference["splits"]["id"]["scalars"]["coverage"] < 1
    assert reference["splits"]["id"]["per_position"]["coverage"].shape == (12,)
    assert "normscale: error" not in whole.stderr


def test_multirun_over_two_models_caches_and_collates(models, tmp_path):
    paths = ",".join(str(m) for m in models)
    first = run_module("normscale.eval", "-m", *EVAL, f"model_kwargs.model_path={paths}",
                       env={"CACHE_DIR": str(tmp_path)})
    assert first.returncode == 0, first.stderr[-3000:]
    a, b = results_of(tmp_path, models[0]), results_of(tmp_path, models[1])
    assert not torch.equal(a["predictions"]["id"], b["predictions"]["id"])  # two models, two result sets
    files = [results_file(tmp_path, m) for m in models]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = evaluate(tmp_path, f"model_kwargs.model_path={models[0]}")
    assert "exists; overwrite=true evaluates it again" in again.stdout
    assert [f.stat().st_mtime_ns for f in files] == stamps  # cached: not even rewritten
    redone = evaluate(tmp_path, f"model_kwargs.model_path={models[0]}", "overwrite=true")
    assert "exists" not in redone.stdout and f"-> {files[0]}" in redone.stdout
    assert files[0].stat().st_mtime_ns > stamps[0] and files[1].stat().st_mtime_ns == stamps[1]
    assert torch.equal(load_metrics(files[0])["predictions"]["id"], a["predictions"]["id"])  # scored again, alike
    frame = load_eval_results("balls_and_urns", "llm_eval", cache_dir=str(tmp_path))
    llm_rows = frame[frame["model"] == "llm"]
    assert len(llm_rows) == 2 and all(c is None for c in llm_rows["checkpoint"])
    assert all(0 < m["id"]["coverage"] < 1 for m in llm_rows["metrics"])


def test_a_model_without_a_path_or_on_another_setting_is_refused_before_loading(tmp_path):
    missing = run_module("normscale.eval", *EVAL, env={"CACHE_DIR": str(tmp_path)})
    assert missing.returncode == 2 and "model=llm needs model_kwargs.model_path" in missing.stderr
    wrong = run_module("normscale.eval", *EVAL, "setting=linear_regression", "model=llm",
                       "model_kwargs.model_path=/nonexistent", env={"CACHE_DIR": str(tmp_path)})
    assert wrong.returncode == 2 and "evaluates balls_and_urns sequences" in wrong.stderr


def test_a_hub_id_already_in_the_hub_cache_is_evaluated_offline(models, tmp_path):
    """HF_HUB_OFFLINE=1 refuses, at once, a model path that is neither a local directory nor in the hub cache
    (tests/test_bad_input.py); a hub id whose files the hub cache holds (HF_HOME, laid out as huggingface_hub writes
    it: snapshots/<revision>/ and refs/main) passes that check and is loaded from the cache."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(models[0], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {"CACHE_DIR": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = run_module("normscale.eval", *EVAL, "model_kwargs.model_path=tiny-org/tiny-llama", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "cache/experiments/balls_and_urns/llm_eval/runs").glob("llm-*/*/metrics.pt"))) == 1


def test_an_llm_on_a_trained_experiment_scores_the_runs_own_eval_sequences(models, tmp_path):
    """`name=<experiment>`: the LLM is scored on the dataset of the experiment's trained run (its task, not the
    llm_eval preset's: context 10 and 6 tasks here against 12 and 4), beside it in runs/llm-<model>/<dataset>/."""
    env = {"CACHE_DIR": str(tmp_path)}
    run_args = ["setting=balls_and_urns", "name=trained", "logging.wandb=false", "task_kwargs.num_dims=4",
                "task_kwargs.context_length=10", "task_kwargs.num_tasks=6", "task_kwargs.num_ood_tasks=20",
                "training_kwargs.batch_size=8", "training_kwargs.max_steps=4", "training_kwargs.warmup_steps=1",
                "training_kwargs.save_steps.schedule=end_only", "data_kwargs.eval_size=32", "eval_kwargs.batch_size=8",
                "eval_kwargs.num_eval_batches=3", "eval_kwargs.return_all=true", "model_kwargs.hidden_size=16"]
    for module in ("normscale.train", "normscale.eval"):  # train one tiny run, then score its checkpoint
        result = run_module(module, *run_args, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    experiment = tmp_path / "experiments" / "balls_and_urns" / "trained"
    (run,) = [p for p in (experiment / "runs").iterdir()]
    step, checkpoint = list_checkpoints(run)[-1]
    trained = load_metrics(checkpoint / "metrics.pt")
    assert step == 4 and trained["model"] == "transformer"
    evaluate(tmp_path, "name=trained", f"model_kwargs.model_path={models[0]}")
    llm_file = results_file(tmp_path, models[0], experiment="trained")
    assert llm_file.parent.name == trained["data_dir"] and llm_file.parent.parent.parent == experiment / "runs"
    llm = load_metrics(llm_file)
    assert llm["model"] == "llm" and llm["step"] is None
    assert llm["data_key"] == trained["data_key"] and llm["eval_hashes"] == trained["eval_hashes"]
    assert "eval.h5" in llm["eval_hashes"]  # the saved eval sequences' sha256 (and the task pools')
    for split in ("id", "ood"):  # the very same sequences, row for row
        assert llm["labels"][split].shape == (24, 10)
        assert torch.equal(llm["labels"][split], trained["labels"][split])
        assert llm["predictions"][split].shape == trained["predictions"][split].shape == (24, 10, 4)
    assert not (tmp_path / "experiments" / "balls_and_urns" / "llm_eval").exists()
