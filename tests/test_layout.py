"""normscale.layout owns every name of the on-disk layout: renamed there, the whole chain (train -> eval -> collate ->
sweep plan and status) runs and writes only the new names. Also run names, the sweep-parameter record and the reader
of the older form of that record."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import h5py
import pytest

from conftest import ROOT, compose_config
from normscale import layout
from normscale.config import FaultError

# Every name of the layout, changed (the values the layout ships with must appear nowhere on disk).
RENAMED = {
    "EXPERIMENTS_DIR": "studies", "DATA_DIR": "datasets", "DATA_MANIFEST": "index.json", "RUNS_DIR": "trained",
    "SWEEPS_DIR": "arrays", "SWEEP_LOGS_DIR": "joblogs", "COLLATED_FILE": "results.h5", "ANALYSIS_DIR": "figures",
    "CONFIG_FILE": "run_config.yaml", "OVERRIDES_FILE": "command_line.json", "LOCK_FILE": "writer.json",
    "RESUME_LINK": "latest", "RESUME_RECORD": "record.json", "RESUME_PREFIX": ".state-", "FAILED_FILE": "diverged.json",
    "CHECKPOINT_PREFIX": "ckpt_", "TRAIN_METRICS": "train_log.jsonl", "EVAL_METRICS": "eval_log.jsonl",
    "METRICS_FILES": {"standard": "scores.pt", "single_task": "scores-per_task.pt"},
    "BAYES_PREFIX": "oracle+", "LLM_PREFIX": "lm+",
}
DEFAULTS = {name: getattr(layout, name) for name in RENAMED}

# The entry point as `python -m <module> <args>`, in a process whose layout has the names above.
WRAPPER = """import json, runpy, sys
import normscale.layout as layout
for name, value in json.loads(sys.argv[1]).items():
    setattr(layout, name, value)
module = sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
ARGS = ["setting=balls_and_urns", "name=renamed", "logging.wandb=false", "task_kwargs.num_dims=4",
        "task_kwargs.context_length=12", "task_kwargs.num_tasks=4", "task_kwargs.num_ood_tasks=8",
        "training_kwargs.batch_size=8", "training_kwargs.max_steps=4", "training_kwargs.warmup_steps=2",
        "training_kwargs.save_steps.schedule=linear_schedule", "training_kwargs.save_steps.num_checkpoints=2",
        "training_kwargs.save_steps.first_step=2", "training_kwargs.eval_every=2", "training_kwargs.log_every=2",
        "data_kwargs.eval_size=32", "eval_kwargs.batch_size=16",
        "eval_kwargs.num_eval_batches=2", "eval_kwargs.fit_size=8", "eval_kwargs.strategy_loss_sequences=40"]
MLP = ["model=mlp", "model_kwargs.hidden_size=8"]
# SLURM's clients as the sweep commands call them: one array job, 4242, whose task 0 failed.
FAKE_SLURM = {
    "scontrol": "echo 'MaxArraySize = 1001'",
    "sbatch": 'printf "%s\\n" "$@" > "$(dirname "$0")/sbatch.args"; echo 4242',
    "sacct": "echo '4242_0|FAILED|1:0'",
    "squeue": "true",
}


def renamed_run(module: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(RENAMED), module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def succeeds(module: str, *args: str, env: dict) -> str:
    done = renamed_run(module, *args, env=env)
    assert done.returncode == 0, f"{module}: {done.stderr[-3000:]}"
    return done.stdout


def test_every_entry_point_follows_the_layouts_names(tmp_path):
    cache, bin_dir = tmp_path / "cache", tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "CACHE_DIR": str(cache), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("SLURM_JOB_ID", None)

    succeeds("normscale.train", *ARGS, *MLP, "seed=0", env=env)
    experiment = cache / "studies" / "balls_and_urns" / "renamed"
    (run_dir,) = (experiment / "trained").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".state-2", ".state-4", "ckpt_0", "ckpt_2", "ckpt_4", "command_line.json", "eval_log.jsonl", "latest",
        "run_config.yaml", "train_log.jsonl"]
    assert (run_dir / "latest" / "record.json").exists()
    assert "seed=0" in json.loads((run_dir / "command_line.json").read_text())["overrides"]
    (dataset,) = (experiment / "datasets").iterdir()
    assert (dataset / "index.json").exists()

    # the run's one writer: a live holder's record under the layout's lock name stops a second start (exit 75)
    now = time.time()
    (run_dir / "writer.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": now,
                                                     "heartbeat": now, "token": "held-by-the-test"}))
    held = renamed_run("normscale.train", *ARGS, *MLP, "seed=0", env=env)
    assert held.returncode == 75, held.stderr[-3000:]
    (run_dir / "writer.json").unlink()

    succeeds("normscale.eval", *ARGS, "model=bayes", "model_kwargs.kind=memorizing", env=env)
    succeeds("normscale.eval", *ARGS, *MLP, env=env)  # checkpoints only: the Bayes directory is not taken for a run
    assert all((checkpoint / "scores.pt").exists() for checkpoint in run_dir.glob("ckpt_*"))
    (bayes,) = (experiment / "trained" / "oracle+memorizing").iterdir()
    assert {"scores.pt", "run_config.yaml", "command_line.json"} <= {p.name for p in bayes.iterdir()}

    succeeds("normscale.collate", *ARGS, env=env)
    with h5py.File(experiment / "results.h5", "r") as f:
        assert {"model", "seed", "task_kwargs.num_tasks"} <= set(json.loads(f.attrs["sweep_parameters"]))
        steps = sorted(int(e.attrs["step"]) for g in f["runs"].values() for e in g.values())
        assert steps == [-1, 0, 2, 4]  # the Bayes predictor's "final", and every checkpoint

    # a sweep over two seeds: seed 0 is trained, seed 1 is submitted (to the fake SLURM) and its task failed
    plan = succeeds("normscale.sweep", "plan", "--submit", *ARGS, *MLP, "seed=0,1", env=env)
    (manifest,) = (experiment / "arrays").glob("*.json")
    assert f"logs {experiment / 'arrays' / 'joblogs'}/4242_<task>.out" in plan
    assert f"--output={experiment / 'arrays' / 'joblogs'}/%A_%a.out" in (bin_dir / "sbatch.args").read_text()
    status = succeeds("normscale.sweep", "status", *ARGS, *MLP, "seed=0,1", env=env).splitlines()
    assert status[0].split()[1] == "finished"
    assert status[1].split()[1] == "failed" and status[1].endswith(f"log {experiment / 'arrays' / 'joblogs'}/4242_0.out")
    assert f"(manifest {manifest})" in status[-1]

    defaults = {value for name, value in DEFAULTS.items() if name != "METRICS_FILES"} | {"metrics.pt"}
    prefixes = tuple(DEFAULTS[name] for name in ("CHECKPOINT_PREFIX", "RESUME_PREFIX", "BAYES_PREFIX", "LLM_PREFIX"))
    stale = [p for p in cache.rglob("*") if p.name in defaults or p.name.startswith(prefixes)]
    assert not stale, stale


# ---------------------------------------------------------------- names and records


def test_run_names_come_from_the_overrides_that_define_the_run():
    from normscale.layout import run_name
    assert run_name([], 0) == "seed=0"
    assert run_name(["model_kwargs.hidden_size=256", "name=x", "experiment=demo", "overwrite=true", "seed=3",
                     "eval_kwargs.num_eval_batches=2", "logging.wandb=false", "hydra.verbose=true", "setting=classification",
                     "+task_kwargs.num_tasks=64"], 3) == "model_kwargs.hidden_size=256,task_kwargs.num_tasks=64,seed=3"
    # execution and observation keys are not identity: same run directory
    assert run_name(["training_kwargs.log_every=5", "training_kwargs.eval_every=7", "data_kwargs.max_storage_gb=1",
                     "data_kwargs.shard_mb=2", "cache_dir=/x", "pack=4", "model_kwargs.sharding=fsdp",
                     "hydra/launcher=slurm", "model=mlp"], 0) == "model=mlp,seed=0"
    assert run_name(["model_kwargs.hidden_size=32", "model_kwargs.hidden_size=48"], 0) == "model_kwargs.hidden_size=48,seed=0"
    assert run_name(["data_kwargs.source=a/b c"], 1) == "data_kwargs.source=a_b_c,seed=1"
    a = run_name([f"training_kwargs.learning_rate={'1' * 300}"], 7)
    b = run_name([f"training_kwargs.learning_rate={'1' * 299}2"], 7)
    assert len(a) <= 200 and a.endswith(",seed=7") and a != b  # shortened, seed kept, the hash tells them apart


def test_checkpoint_names_and_paths_of_the_layout(tmp_path):
    assert layout.checkpoint_step("checkpoint-120") == 120
    assert [layout.checkpoint_step(n) for n in (".checkpoint-5.tmp-3", "checkpoint-", "checkpoint-x", "resume")] == \
        [None] * 4
    for step in (10, 2, 0):
        layout.checkpoint_dir(tmp_path, step).mkdir()
    (tmp_path / ".checkpoint-30.tmp-1").mkdir()
    assert [step for step, _ in layout.list_checkpoints(tmp_path)] == [0, 2, 10]
    config = compose_config(f"cache_dir={tmp_path}", "name=x")
    assert layout.experiment_dir(config) == tmp_path / "experiments" / "balls_and_urns" / "x"
    dataset = layout.data_root(config) / "D64-uniform-b128-seed0-abc"
    assert layout.dataset_location(dataset) == {"cache_dir": str(tmp_path), "setting": "balls_and_urns", "name": "x"}
    assert layout.dataset_location(tmp_path / "elsewhere" / "a" / "b" / "data" / "d") is None


def test_the_sweep_parameter_record_is_written_beside_the_config_and_read_back(tmp_path):
    config = compose_config(f"cache_dir={tmp_path}", "name=x")
    overrides = ["name=x", "task_kwargs.num_tasks=4", "seed=2"]
    layout.write_config(tmp_path, config, overrides)
    assert layout.read_overrides(tmp_path) == overrides
    assert not (tmp_path / layout.CONFIG_FILE).read_text().startswith("#")  # the config is the config alone
    assert layout.read_config(tmp_path) == config
    (tmp_path / layout.OVERRIDES_FILE).write_text('{"overrides": ')
    with pytest.raises(FaultError, match="overrides.json is damaged"):
        layout.read_overrides(tmp_path)
    (tmp_path / layout.OVERRIDES_FILE).unlink()
    with pytest.raises(FaultError, match="has no overrides.json"):
        layout.read_overrides(tmp_path)


def test_a_run_written_before_the_record_keeps_its_overrides_in_the_configs_first_line(tmp_path):
    """tests/fixtures/pre_settings: run directories exactly as the code before the record wrote them."""
    run_dir = shutil.copytree(ROOT / "tests/fixtures/pre_settings/balls_and_urns-mlp", tmp_path / "run", symlinks=True)
    assert not (run_dir / layout.OVERRIDES_FILE).exists()
    overrides = layout.read_overrides(run_dir)
    assert overrides[0].startswith("cache_dir=")
    assert overrides[1:4] == ["setting=balls_and_urns", "model=mlp", "task_kwargs.num_dims=4"]
    assert "task_kwargs.num_tasks=4" in overrides and overrides[-1] == "logging.wandb=false"
    assert layout.read_config(run_dir).model == "mlp"
