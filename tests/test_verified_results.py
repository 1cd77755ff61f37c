"""Verified results (issue 11 items 1, 4 and 9 for eval and collate), with real files and real processes: damaged
checkpoints and metrics files, checkpoints and metrics of another run identity, results made with other eval
settings, and what `python -m normscale.eval` and `python -m normscale.collate` do about each."""
import json
import os
import shutil
import subprocess
import sys

import h5py
import pandas as pd
import pytest

from conftest import run_module
from faults import flip, one_error_line, truncate
from normscale.layout import identity_hash, list_checkpoints, read_config
from normscale.results import MetricsError, load_metrics, save_metrics

SETTING, NAME = "balls_and_urns", "vr"
ARGS = [f"setting={SETTING}", f"name={NAME}", "logging.wandb=false", "task_kwargs.num_dims=4",
        "task_kwargs.context_length=8", "task_kwargs.num_tasks=4", "task_kwargs.num_ood_tasks=8",
        "training_kwargs.batch_size=8", "training_kwargs.max_steps=12", "training_kwargs.warmup_steps=2",
        "training_kwargs.eval_every=1000", "training_kwargs.save_steps.num_checkpoints=4",
        "training_kwargs.save_steps.first_step=2", "data_kwargs.eval_size=48", "data_kwargs.shard_mb=0.003",
        "eval_kwargs.batch_size=16", "eval_kwargs.num_eval_batches=3", "eval_kwargs.fit_size=8",
        "eval_kwargs.strategy_loss_sequences=100"]
MODEL = ["model_kwargs.hidden_size=16", "model_kwargs.num_layers=1", "model_kwargs.num_heads=2"]  # training only
STEPS = [0, 2, 4, 7, 11, 12]  # step 0, the sqrt schedule from 2 to 12 with 4 checkpoints (11), and 12


def cli(module: str, cache, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = run_module(module, *ARGS, *args, env={"CACHE_DIR": str(cache)})
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def experiment(cache):
    return cache / "experiments" / SETTING / NAME


def the_run(cache):
    runs = [p for p in (experiment(cache) / "runs").iterdir() if not p.name.startswith("bayes-")]
    assert len(runs) == 1, runs
    return runs[0]


def metrics_of(cache) -> dict[int, object]:
    return {step: path / "metrics.pt" for step, path in list_checkpoints(the_run(cache))}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One tiny trained run, every checkpoint evaluated, and the memorizing predictor on its dataset."""
    cache = tmp_path_factory.mktemp("cache")
    cli("normscale.train", cache, *MODEL)
    cli("normscale.eval", cache)
    cli("normscale.eval", cache, "model=bayes", "model_kwargs.kind=memorizing")
    assert sorted(metrics_of(cache)) == STEPS and all(p.exists() for p in metrics_of(cache).values())
    return cache


@pytest.fixture
def cache(evaluated, tmp_path):
    """A private copy of the evaluated experiment."""
    copy = tmp_path / "cache"
    shutil.copytree(evaluated, copy, symlinks=True)
    return copy


def skipped_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("normscale: skipped:")]


def stamps(paths) -> dict:
    return {p: p.stat().st_mtime_ns for p in paths}


def plain_table(path) -> pd.DataFrame:
    with h5py.File(path) as f:
        return pd.DataFrame({k: c.asstr()[()] if c.dtype.kind == "O" else c[()] for k, c in f["table"].items()})


def test_a_flipped_and_a_truncated_checkpoint_are_named_and_skipped_and_the_others_evaluated(cache):
    files = metrics_of(cache)
    for path in files.values():
        path.unlink()
    run = the_run(cache)
    flip(run / "checkpoint-2" / "model.safetensors")
    truncate(run / "checkpoint-7" / "model.safetensors")
    result = cli("normscale.eval", cache, ok=False)
    assert result.returncode == 1, result.stderr[-3000:]
    error = one_error_line(result.stderr)
    assert "2 checkpoint(s)" in error and "checkpoint-2" in error and "checkpoint-7" in error
    lines = skipped_lines(result.stderr)
    assert len(lines) == 2 and "checkpoint-2 is damaged" in lines[0] and "checkpoint-7 is damaged" in lines[1]
    for step, path in files.items():
        assert path.exists() == (step not in (2, 7)), step
        if path.exists():
            assert load_metrics(path)["step"] == step


def test_a_checkpoint_of_another_run_identity_is_skipped_and_one_without_an_identity_is_evaluated(cache):
    files = metrics_of(cache)
    for path in files.values():
        path.unlink()
    run = the_run(cache)
    identity = identity_hash(read_config(run))
    for step, recorded in ((4, "0" * 16), (12, identity), (7, None)):  # 7: as written before identities existed
        meta_path = run / f"checkpoint-{step}" / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta.pop("identity_hash", None)
        if recorded:
            meta["identity_hash"] = recorded
        meta_path.write_text(json.dumps(meta))
    result = cli("normscale.eval", cache, ok=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "checkpoint-4" in one_error_line(result.stderr)
    lines = skipped_lines(result.stderr)
    assert len(lines) == 1 and "checkpoint-4 was trained as another run (identity 0000000000000000)" in lines[0]
    assert not files[4].exists()
    for step in (0, 2, 7, 11, 12):
        metrics = load_metrics(files[step])
        assert metrics["identity_hash"] == identity  # what made the file: the run's identity and the code
        assert metrics["provenance"]["code_version"].startswith(("git:", "normscale=="))
        assert metrics["provenance"]["libraries"]["torch"] == __import__("torch").__version__


def test_a_truncated_or_flipped_metrics_file_is_not_done_and_is_evaluated_again(cache):
    files = metrics_of(cache)
    truncate(files[4])
    flip(files[7])
    for step in (4, 7):
        with pytest.raises(MetricsError, match="does not load"):  # the faults are real
            load_metrics(files[step])
    kept = stamps(files[s] for s in (0, 2, 12))
    result = cli("normscale.eval", cache)
    assert "evaluating 2 checkpoint(s)" in result.stdout
    again = [line for line in result.stdout.splitlines() if line.endswith("; evaluating it again")]
    assert len(again) == 2 and "checkpoint-4/metrics.pt does not load" in again[0] and "checkpoint-7" in again[1]
    assert load_metrics(files[4])["step"] == 4 and load_metrics(files[7])["step"] == 7
    assert stamps(kept) == kept


def test_results_made_with_other_eval_settings_are_kept_with_one_line_and_overwrite_evaluates_them(cache):
    files = metrics_of(cache)
    before = stamps(files.values())
    run = the_run(cache)
    result = cli("normscale.eval", cache, "eval_kwargs.num_eval_batches=2")
    lines = [line for line in result.stdout.splitlines() if "other eval settings" in line]
    assert lines == [f"normscale: 6 checkpoint(s) of {run.name} were evaluated with other eval settings "
                     "(eval_kwargs.num_eval_batches 3 -> 2); kept, overwrite=true re-evaluates them"]
    assert "evaluating 0 checkpoint(s)" in result.stdout and stamps(files.values()) == before
    # settings that do not change a result: `run` only selects, sequences_per_task is read in single_task mode only
    same = cli("normscale.eval", cache, f"eval_kwargs.run='{run.name}'", "eval_kwargs.sequences_per_task=5")
    assert "other eval settings" not in same.stdout and "evaluating 0 checkpoint(s)" in same.stdout
    redone = cli("normscale.eval", cache, "eval_kwargs.num_eval_batches=2", "overwrite=true")
    assert "evaluating 6 checkpoint(s)" in redone.stdout
    for path in files.values():
        metrics = load_metrics(path)
        assert metrics["eval_kwargs"]["num_eval_batches"] == 2 and metrics["splits"]["id"]["num_sequences"] == 32


def test_bayes_results_damaged_are_evaluated_again_and_other_settings_kept_with_one_line(cache):
    path, = (experiment(cache) / "runs" / "bayes-memorizing").glob("*/metrics.pt")
    truncate(path)
    result = cli("normscale.eval", cache, "model=bayes", "model_kwargs.kind=memorizing")
    assert f"normscale: {path} does not load" in result.stdout and "evaluating it again" in result.stdout
    assert load_metrics(path)["kind"] == "memorizing"
    stamp = path.stat().st_mtime_ns
    other = cli("normscale.eval", cache, "model=bayes", "model_kwargs.kind=memorizing",
                "eval_kwargs.strategy_loss_sequences=200")
    assert (f"normscale: {path} was evaluated with other eval settings (eval_kwargs.strategy_loss_sequences "
            "100 -> 200); kept, overwrite=true re-evaluates it") in other.stdout
    assert path.stat().st_mtime_ns == stamp


def test_collate_names_and_skips_bad_metrics_files_collates_the_rest_and_picks_them_up_once_repaired(cache):
    files = metrics_of(cache)
    target = experiment(cache) / "metrics.h5"
    truncate(files[4])
    first = cli("normscale.collate", cache, ok=False)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "checkpoint-4/metrics.pt" in one_error_line(first.stderr)
    lines = skipped_lines(first.stderr)
    assert len(lines) == 1 and f"{files[4]} does not load" in lines[0]
    assert "collated 6 new metrics file(s) of 7" in first.stdout  # 5 checkpoints and the Bayes predictor
    table = plain_table(target)
    assert sorted(set(table["step"])) == [-1, 0, 2, 7, 11, 12]
    content = target.read_bytes()
    again = cli("normscale.collate", cache, ok=False)  # named again on every pass until it is repaired
    assert again.returncode == 1 and len(skipped_lines(again.stderr)) == 1 and target.read_bytes() == content
    flip(files[7])  # damaged after it was collated: named and skipped, its collated version kept
    third = cli("normscale.collate", cache, ok=False)
    assert third.returncode == 1 and len(skipped_lines(third.stderr)) == 2
    assert sorted(set(plain_table(target)["step"])) == [-1, 0, 2, 7, 11, 12]
    cli("normscale.eval", cache)
    repaired = cli("normscale.collate", cache)
    assert "collated 2 new metrics file(s) of 7" in repaired.stdout and "mixes" not in repaired.stdout
    assert sorted(set(plain_table(target)["step"])) == [-1, 0, 2, 4, 7, 11, 12]


def test_collate_skips_metrics_of_another_run_identity_and_the_table_says_what_made_each_row(cache):
    files = metrics_of(cache)
    run = the_run(cache)
    metrics = load_metrics(files[12])
    save_metrics(files[12], {**metrics, "identity_hash": "0" * 16})
    result = cli("normscale.collate", cache, ok=False)
    assert result.returncode == 1 and "checkpoint-12/metrics.pt" in one_error_line(result.stderr)
    lines = skipped_lines(result.stderr)
    assert len(lines) == 1 and "was evaluated for another run identity (0000000000000000)" in lines[0]
    table = plain_table(experiment(cache) / "metrics.h5")
    trained = table[table["model"] != "bayes"]
    assert sorted(set(trained["step"])) == [0, 2, 4, 7, 11]
    assert set(trained["identity_hash"]) == {identity_hash(read_config(run))}
    bayes_dir, = (experiment(cache) / "runs" / "bayes-memorizing").iterdir()
    assert set(table[table["model"] == "bayes"]["identity_hash"]) == {identity_hash(read_config(bayes_dir))}
    assert all(v.startswith(("git:", "normscale==")) for v in table["code_version"])
    assert set(table["eval.num_eval_batches"]) == {3} and set(table["eval.batch_size"]) == {16}
    assert set(table["eval.mode"]) == {"standard"} and set(table["eval.return_all"]) == {"false"}
    assert "eval.run" not in table.columns
    repair = cli("normscale.eval", cache)  # eval does not count it as done either
    assert "was evaluated for another run identity (0000000000000000)" in repair.stdout
    assert "evaluating 1 checkpoint(s)" in repair.stdout
    cli("normscale.collate", cache)
    assert 12 in set(plain_table(experiment(cache) / "metrics.h5")["step"])


def test_collate_says_in_one_line_when_an_experiment_mixes_eval_settings(cache):
    files = metrics_of(cache)
    files[12].unlink()
    cli("normscale.eval", cache, "eval_kwargs.num_eval_batches=2")  # evaluates checkpoint 12 only, with 2 batches
    assert load_metrics(files[12])["eval_kwargs"]["num_eval_batches"] == 2
    result = cli("normscale.collate", cache)
    lines = [line for line in result.stdout.splitlines() if "mixes eval settings" in line]
    assert len(lines) == 1, result.stdout
    assert "standard mode: eval_kwargs.num_eval_batches 3 (6 files), 2 (1 files)" in lines[0]
    assert "batch_size" not in lines[0]
    table = plain_table(experiment(cache) / "metrics.h5")
    assert sorted(table["eval.num_eval_batches"]) == [2, 2] + [3] * 12  # id and ood of 7 files
    again = cli("normscale.collate", cache)  # said on every pass, also when nothing is new
    assert "up to date" in again.stdout and "mixes eval settings" in again.stdout


def test_reading_an_up_to_date_metrics_file_imports_no_torch(cache):
    """A notebook's load_eval_results on a collated experiment: the rows come back, and neither torch nor eval,
    dist, accelerate or transformers is imported (collating new files imports torch to read them)."""
    cli("normscale.collate", cache)
    code = ("import sys; from normscale.analysis_utils import load_eval_results; "
            f"df = load_eval_results(setting='{SETTING}', experiment_name='{NAME}'); "
            "print(len(df), *sorted(m for m in ('torch', 'normscale.eval', 'normscale.dist', 'accelerate', "
            "'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "CACHE_DIR": str(cache)}).stdout.splitlines()[-1].split()
    assert out == [str(len(STEPS) + 1)], out  # every checkpoint and the Bayes row; nothing heavy imported
