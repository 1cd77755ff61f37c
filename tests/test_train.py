"""Training end to end, as users launch it: `python -m normscale.train` and `launch/cpu.sh 2 -m normscale.train`."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_module
from normscale import settings
from normscale.checkpoints import load_checkpoint, read_jsonl
from normscale.layout import list_checkpoints, read_config, resume_step
from normscale.config import checkpoint_schedule
from normscale.layout import run_name
from normscale.data import load_eval_splits, load_task_pools, task_prior_weights
from normscale.data.store import to_torch
from normscale.metrics import predict
from normscale.model import build_bayes, build_model

QUICK = ["logging.wandb=false", "task_kwargs.num_ood_tasks=20", "data_kwargs.eval_size=64", "eval_kwargs.batch_size=16",
         "eval_kwargs.num_eval_batches=4", "model_kwargs.hidden_size=32", "training_kwargs.warmup_steps=10"]
URNS = ["setting=balls_and_urns", "task_kwargs.num_dims=4", "task_kwargs.context_length=12", "task_kwargs.num_tasks=8",
        "training_kwargs.batch_size=8"]


def run_dir_of(cache: Path, setting: str, name: str) -> Path:
    runs = list((cache / "experiments" / setting / name / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def train(cache: Path, *args: str, cwd=None) -> subprocess.CompletedProcess:
    result = run_module("normscale.train", *args, env={"CACHE_DIR": str(cache)}, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run_dir)[-1][1])[0]


def assert_same_weights(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if exact else torch.allclose(a[k], b[k], atol=2e-5), k


# --- learning ---------------------------------------------------------------------------------------------------

def test_urns_with_two_tasks_reach_the_bayes_optimal_loss(tmp_path):
    """D=2 is learnable in a few hundred steps: the ID loss gets within 0.03 nats of the memorizing predictor's
    (the Bayes-optimal loss in distribution), well below the generalizing predictor's."""
    args = ["name=d2", *QUICK, "setting=balls_and_urns", "task_kwargs.num_dims=4", "task_kwargs.context_length=16",
            "task_kwargs.num_tasks=2", "training_kwargs.batch_size=32", "training_kwargs.max_steps=400",
            "training_kwargs.learning_rate=3e-3", "training_kwargs.eval_every=400",
            "training_kwargs.save_steps.schedule=end_only", "data_kwargs.eval_size=256", "eval_kwargs.batch_size=64"]
    train(tmp_path, *args)
    run_dir = run_dir_of(tmp_path, "balls_and_urns", "d2")
    config = read_config(run_dir)
    data_dir = next((tmp_path / "experiments/balls_and_urns/d2/data").iterdir())
    split = to_torch(load_eval_splits(data_dir)["id"], settings.get("balls_and_urns", config.task_kwargs))
    tasks = load_task_pools(data_dir)["train"]
    log_prior = torch.log(torch.tensor(task_prior_weights("uniform", 2)))
    targets = split["tokens"][:, 1:]

    def bayes_loss(kind):
        predictor = build_bayes("balls_and_urns", kind, config.task_kwargs, tasks, log_prior)
        return -predictor(split).gather(-1, targets[..., None]).float().mean().item()
    m_loss, g_loss = bayes_loss("memorizing"), bayes_loss("generalizing")
    model_loss = read_jsonl(run_dir / "eval_metrics.jsonl")[-1]["id"]["loss"]
    assert g_loss - m_loss > 0.05  # the two strategies are distinguishable here
    assert model_loss < m_loss + 0.03, (model_loss, m_loss)
    assert model_loss < g_loss - 0.5 * (g_loss - m_loss), (model_loss, g_loss)  # it memorised the two urns


def test_regression_with_one_task_reaches_the_noise_floor(tmp_path):
    """With D=1 the Bayes-optimal MSE is the noise variance sigma^2 = d/256: the loss gets within 0.01 of it."""
    train(tmp_path, "name=falls", *QUICK, "setting=linear_regression", "task_kwargs.num_dims=3",
          "task_kwargs.context_length=8", "task_kwargs.num_tasks=1", "model_kwargs.num_layers=2",
          "model_kwargs.hidden_size=64", "training_kwargs.batch_size=32", "training_kwargs.max_steps=300",
          "training_kwargs.learning_rate=3e-3", "training_kwargs.log_every=30", "training_kwargs.save_steps.schedule=end_only")
    losses = [r["objective"] for r in read_jsonl(run_dir_of(tmp_path, "linear_regression", "falls") / "train_metrics.jsonl")]
    sigma2 = 3 / 256
    assert losses[0] > 10 * sigma2 and losses[-1] < sigma2 + 0.01, losses


def test_classification_loss_falls(tmp_path):
    train(tmp_path, "name=falls", *QUICK, "setting=classification", "task_kwargs.num_dims=3",
          "task_kwargs.context_length=8", "task_kwargs.num_tasks=4", "model_kwargs.num_layers=2",
          "training_kwargs.batch_size=32", "training_kwargs.max_steps=300", "training_kwargs.learning_rate=3e-3",
          "training_kwargs.log_every=30", "training_kwargs.save_steps.schedule=end_only")
    losses = [r["objective"] for r in read_jsonl(run_dir_of(tmp_path, "classification", "falls") / "train_metrics.jsonl")]
    assert np.mean(losses[-3:]) < 0.6 * losses[0], losses


# --- checkpoints, metrics, run directories ----------------------------------------------------------------------

def test_checkpoint_schedule_is_realised_on_disk_and_checkpoints_load_in_one_process(tmp_path):
    args = ["name=sched", *QUICK, *URNS, "training_kwargs.max_steps=60", "training_kwargs.log_every=10",
            "training_kwargs.eval_every=30", "training_kwargs.save_steps.schedule=sqrt_schedule",
            "training_kwargs.save_steps.num_checkpoints=5", "training_kwargs.save_steps.first_step=4",
            "model_kwargs.hidden_size=48"]
    out = train(tmp_path, *args).stdout
    run_dir = run_dir_of(tmp_path, "balls_and_urns", "sched")
    assert run_dir.name == run_name(args, 0)  # named from the command line's overrides
    assert run_dir.name.endswith("seed=0") and "model_kwargs.hidden_size=48" in run_dir.name and "name=" not in run_dir.name
    steps = [s for s, _ in list_checkpoints(run_dir)]
    assert steps == [0] + checkpoint_schedule("sqrt_schedule", 60, 5, 4)
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    config = read_config(run_dir)
    assert config.model_kwargs.hidden_size == 48 and config.training_kwargs.max_steps == 60
    weights = {}
    for step, path in list_checkpoints(run_dir):
        state, meta = load_checkpoint(path)
        assert meta["step"] == step and meta["sequences_seen"] == 8 * step and meta["tokens_seen"] == 8 * 13 * step
        model = build_model(config)
        model.load_state_dict(state)  # strict: consolidated and complete
        weights[step] = state
    assert not torch.equal(next(iter(weights[0].values())), next(iter(weights[60].values())))
    train_records, eval_records = read_jsonl(run_dir / "train_metrics.jsonl"), read_jsonl(run_dir / "eval_metrics.jsonl")
    assert [r["step"] for r in train_records] == [10, 20, 30, 40, 50, 60]
    assert len(train_records[0]["per_task_objective"]) == 8 and sum(train_records[0]["per_task_count"]) == 8 * 10
    assert [r["step"] for r in eval_records] == [30, 60] and set(eval_records[0]) == {"step", "id", "ood"}
    assert set(eval_records[0]["id"]) == {"loss", "kl"}
    # the final checkpoint reproduces the logged ID loss and KL (the setting's pointwise metrics) in one process
    data_dir = next((tmp_path / "experiments/balls_and_urns/sched/data").iterdir())
    setting = settings.get("balls_and_urns", config.task_kwargs)
    split = to_torch(load_eval_splits(data_dir)["id"], setting)
    model = build_model(config)
    model.load_state_dict(weights[60])
    with torch.no_grad():
        pointwise = setting.pointwise(predict(setting, model, split), split)
    assert pointwise["loss"].mean().item() == pytest.approx(eval_records[-1]["id"]["loss"], abs=1e-5)
    assert pointwise["kl"].mean().item() == pytest.approx(eval_records[-1]["id"]["kl"], abs=1e-5)
    assert "Traceback" not in out
    again = train(tmp_path, *args)
    assert "is complete (60 steps)" in again.stdout


def start_training(cache: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "normscale.train", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "CACHE_DIR": str(cache)})


def wait_until(condition, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


RESUME = [*QUICK, *URNS, "training_kwargs.max_steps=400", "training_kwargs.log_every=25", "training_kwargs.eval_every=100",
          "training_kwargs.save_steps.schedule=linear_schedule", "training_kwargs.save_steps.num_checkpoints=8",
          "training_kwargs.save_steps.first_step=50", "model_kwargs.hidden_size=64", "model_kwargs.num_layers=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("uninterrupted")
    train(cache, "name=resume", *RESUME)
    return run_dir_of(cache, "balls_and_urns", "resume")


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "seconds_per_step"} for r in records]


def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, uninterrupted):
    proc = start_training(tmp_path, "name=resume", *RESUME)
    run_dir = tmp_path / "experiments/balls_and_urns/resume/runs" / uninterrupted.name
    wait_until(lambda: (resume_step(run_dir) or 0) >= 100)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = resume_step(run_dir)
    assert 100 <= killed_at < 400
    out = train(tmp_path, "name=resume", *RESUME).stdout
    assert f"resumed at step {killed_at}" in out
    assert_same_weights(final_weights(run_dir), final_weights(uninterrupted))
    assert without_timing(read_jsonl(run_dir / "train_metrics.jsonl")) == \
        without_timing(read_jsonl(uninterrupted / "train_metrics.jsonl"))
    assert read_jsonl(run_dir / "eval_metrics.jsonl") == read_jsonl(uninterrupted / "eval_metrics.jsonl")


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_saves_resume_state_exits_cleanly_and_resumes(tmp_path, uninterrupted, signum):
    proc = start_training(tmp_path, "name=resume", *RESUME)
    run_dir = tmp_path / "experiments/balls_and_urns/resume/runs" / uninterrupted.name
    wait_until(lambda: len(read_jsonl(run_dir / "train_metrics.jsonl")) >= 3)  # past step 75
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    step = int(re.search(r"preempted; resume state saved at step (\d+)", out).group(1))
    assert 75 <= step < 400 and resume_step(run_dir) == step
    resumed = train(tmp_path, "name=resume", *RESUME).stdout
    assert f"resumed at step {step}" in resumed
    assert_same_weights(final_weights(run_dir), final_weights(uninterrupted))


def test_overwrite_true_starts_over(tmp_path):
    args = ["name=ow", *QUICK, *URNS, "training_kwargs.max_steps=20", "training_kwargs.save_steps.schedule=end_only"]
    train(tmp_path, *args)
    run_dir = run_dir_of(tmp_path, "balls_and_urns", "ow")
    (run_dir / "marker").write_text("old")
    out = train(tmp_path, *args, "overwrite=true").stdout
    assert "is complete" not in out and not (run_dir / "marker").exists() and resume_step(run_dir) == 20


# --- several processes ------------------------------------------------------------------------------------------

def test_two_cpu_processes_train_like_one_process_with_the_same_global_batch(tmp_path):
    args = ["name=ddp", *QUICK, *URNS, "training_kwargs.max_steps=40", "training_kwargs.eval_every=20",
            "training_kwargs.log_every=10", "training_kwargs.save_steps.schedule=end_only"]
    single = train(tmp_path / "one", *args)
    env = {**os.environ, "CACHE_DIR": str(tmp_path / "two"), "PYTHON": sys.executable}
    two = subprocess.run(["bash", str(ROOT / "launch/cpu.sh"), "2", "-m", "normscale.train", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout and "on 1 process(es)" in single.stdout
    assert "parameters identical on all 2 ranks" in two.stdout
    one_dir, two_dir = run_dir_of(tmp_path / "one", "balls_and_urns", "ddp"), run_dir_of(tmp_path / "two", "balls_and_urns", "ddp")
    # each rank took half of every global batch: the average of their gradients is the single process's gradient
    assert_same_weights(final_weights(two_dir), final_weights(one_dir), exact=False)
    a, b = read_jsonl(one_dir / "train_metrics.jsonl"), read_jsonl(two_dir / "train_metrics.jsonl")
    assert [r["per_task_count"] for r in a] == [r["per_task_count"] for r in b]  # the same sequences, all of them
    assert np.allclose([r["objective"] for r in a], [r["objective"] for r in b], atol=1e-5)


def test_accelerate_cpu_flag_running_one_process_is_warned_about(tmp_path):
    args = ["name=warn", *QUICK, *URNS, "training_kwargs.max_steps=2", "training_kwargs.save_steps.schedule=end_only",
            "training_kwargs.warmup_steps=1"]
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                             "-m", "normscale.train", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accelerate launch --cpu started a single process" in result.stderr and "launch/cpu.sh" in result.stderr


def test_bad_model_kwargs_fail_before_training(tmp_path):
    for override, message in [("model_kwargs.num_heads=3", "must be divisible by model_kwargs.num_heads=3"),
                              ("model=gpt5", "model='gpt5' is not a known model")]:
        result = run_module("normscale.train", "name=bad", *QUICK, *URNS, override, env={"CACHE_DIR": str(tmp_path)})
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not tmp_path.exists() or not list(tmp_path.rglob("checkpoint-*"))


def test_wandb_runs_offline_without_a_key_and_a_resumed_run_continues_the_same_run(tmp_path, monkeypatch):
    from conftest import compose_config
    from normscale.train import init_wandb
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = compose_config(f"cache_dir={tmp_path}", "logging.wandb=true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ids = []
    for _ in range(2):  # the first start, then a resume of the same run directory
        run = init_wandb(config, run_dir, "seed=0")
        assert run.settings.mode == "offline"
        ids.append(run.id)
        run.finish()
        time.sleep(1.1)  # wandb names offline run folders by the second: two starts within one would share a folder
    other = tmp_path / "other"
    other.mkdir()
    run = init_wandb(config, other, "seed=0")
    run.finish()
    assert ids[0] == ids[1] != run.id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{ids[0]}"))) == 2


def test_a_sweep_over_hidden_sizes_trains_one_run_each(tmp_path):
    train(tmp_path, "-m", "name=sweep", *QUICK, *URNS, "model_kwargs.hidden_size=16,32", "training_kwargs.max_steps=10",
          "training_kwargs.warmup_steps=2", "training_kwargs.save_steps.schedule=end_only")
    runs = sorted((tmp_path / "experiments/balls_and_urns/sweep/runs").iterdir())
    assert [read_config(r).model_kwargs.hidden_size for r in runs] == [16, 32]
    assert all(resume_step(r) == 10 for r in runs) and all("model_kwargs.hidden_size=" in r.name for r in runs)


def test_compiled_training_writes_checkpoints_of_the_plain_model(tmp_path):
    train(tmp_path, "name=compiled", *QUICK, *URNS, "training_kwargs.compile=true", "training_kwargs.max_steps=4",
          "training_kwargs.warmup_steps=1", "training_kwargs.save_steps.schedule=end_only")
    run_dir = run_dir_of(tmp_path, "balls_and_urns", "compiled")
    model = build_model(read_config(run_dir))
    model.load_state_dict(final_weights(run_dir))  # strict: no "_orig_mod." prefixes


def test_bf16_mixed_precision_trains_and_keeps_fp32_weights(tmp_path):
    train(tmp_path, "name=bf16", *QUICK, *URNS, "training_kwargs.precision=bf16", "training_kwargs.max_steps=30",
          "training_kwargs.log_every=10", "training_kwargs.warmup_steps=2", "training_kwargs.save_steps.schedule=end_only")
    run_dir = run_dir_of(tmp_path, "balls_and_urns", "bf16")
    losses = [r["objective"] for r in read_jsonl(run_dir / "train_metrics.jsonl")]
    assert losses[-1] < losses[0] and all(t.dtype == torch.float32 for t in final_weights(run_dir).values())


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    args = [*QUICK, *URNS, "training_kwargs.max_steps=20", "training_kwargs.log_every=10", "training_kwargs.warmup_steps=2",
            "training_kwargs.save_steps.schedule=end_only"]
    train(tmp_path, "name=full", *args)
    train(tmp_path, "name=accum", *args, "training_kwargs.gradient_accumulation_steps=2")
    full, accum = run_dir_of(tmp_path, "balls_and_urns", "full"), run_dir_of(tmp_path, "balls_and_urns", "accum")
    assert_same_weights(final_weights(accum), final_weights(full), exact=False)
    assert [r["per_task_count"] for r in read_jsonl(accum / "train_metrics.jsonl")] == \
        [r["per_task_count"] for r in read_jsonl(full / "train_metrics.jsonl")]
    initial, final = load_checkpoint(full / "checkpoint-0")[0], final_weights(full)
    assert any(not torch.equal(initial[k], final[k]) for k in final)  # training moved the weights


def test_data_over_budget_fails_before_a_run_directory_exists(tmp_path):
    result = run_module("normscale.train", "name=big", "setting=linear_regression", "data_kwargs.max_storage_gb=0.001",
                        "logging.wandb=false", env={"CACHE_DIR": str(tmp_path)})
    assert result.returncode == 2 and "data_kwargs.source=generate" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "experiments/linear_regression/big/runs").exists()


FAULTS = """
import resource, sys, torch
from normscale import settings
from normscale.config import ModelConfig, TaskConfig
from normscale.dist.accel import keep_freed_memory
from normscale.model.transformer import Transformer
if sys.argv[1] == "kept":
    keep_freed_memory()
torch.manual_seed(0)
setting = settings.get("balls_and_urns", TaskConfig(num_dims=8, context_length=128))
model = Transformer(setting.network_io, ModelConfig(hidden_size=64))
optimizer = torch.optim.AdamW(model.parameters())
batch = {"tokens": torch.randint(0, 9, (64, 129))}
faults = []
for step in range(40):  # the canonical model's training step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    setting.objective(model(batch), batch).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[10:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_training_steps_reuse_freed_memory_instead_of_page_faulting_it_in_again():
    def steady_faults(mode):
        done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    default, kept = steady_faults("default"), steady_faults("kept")  # page faults in steps 11-40
    assert kept < 10_000 and 5 * kept < default, (kept, default)  # measured: kept 1-2k, default 50-180k
