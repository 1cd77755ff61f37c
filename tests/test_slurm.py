"""SLURM paths on a real single-node cluster on localhost (tools/local_slurm.sh): job-array sweeps through
slurm/sweep.sh, the Hydra submitit launcher, preemption and requeue, failing tasks, multi-node as two tasks.

Skipped only when no local cluster can be started here (the reason is given); `.ci/run` starts one and sets
NORMSCALE_REQUIRE_SLURM=1, under which a missing cluster fails instead."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from normscale import sweep
from normscale.checkpoints import RESUME_LINK, list_checkpoints, resume_step
from normscale.config import checkpoint_schedule

TINY = ["setting=balls_and_urns", "logging.wandb=false", "task_kwargs.num_dims=4", "task_kwargs.context_length=12",
        "task_kwargs.num_ood_tasks=20", "training_kwargs.batch_size=8", "training_kwargs.max_steps=40",
        "training_kwargs.warmup_steps=5", "training_kwargs.eval_every=1000", "training_kwargs.log_every=10",
        "training_kwargs.save_steps.num_checkpoints=3", "training_kwargs.save_steps.first_step=10",
        "model_kwargs.hidden_size=16", "data_kwargs.eval_size=32", "eval_kwargs.batch_size=16",
        "eval_kwargs.num_eval_batches=2"]
SCHEDULE = sorted({0, *checkpoint_schedule("sqrt_schedule", 40, 3, 10)})


def test_resume_state_path_matches_the_checkpoint_layout():
    assert sweep.RESUME_STATE == f"{RESUME_LINK}/state.json"  # sweep.py cannot import checkpoints (torch)


def test_array_specs_chunks_and_sbatch_resources(tmp_path, monkeypatch):
    assert sweep.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert sweep.chunks(list(range(10)), 4) == [(0, [0, 1, 2, 3]), (4, [0, 1, 2, 3]), (8, [0, 1])]
    assert sweep.chunks([1, 3, 9], 1001) == [(1, [0, 2, 8])]
    monkeypatch.setenv("NORMSCALE_PARTITION", "gpu")
    monkeypatch.setenv("NORMSCALE_CPUS_PER_TASK", "6")
    monkeypatch.setenv("NORMSCALE_GPUS_PER_TASK", "4")
    monkeypatch.setenv("NORMSCALE_TIME_MIN", "90")
    command = sweep.sbatch_command(tmp_path / "m.json", 8, [0, 1], "exp", tmp_path, sweep.resources(), throttle=3)
    assert "--array=0-1%3" in command and "--partition=gpu" in command and "--cpus-per-task=6" in command
    assert "--gpus-per-task=4" in command and "--time=90" in command and "--requeue" in command
    assert any(a.startswith("--signal=B:USR1@") for a in command)
    assert f"--export=ALL,NORMSCALE_ROOT={ROOT},NORMSCALE_SWEEP_MANIFEST={tmp_path / 'm.json'},NORMSCALE_SWEEP_OFFSET=8" in command
    assert command[-1] == str(ROOT / "slurm" / "sweep.sh")


@pytest.mark.parametrize("script", sorted((ROOT / "slurm").glob("*.sh")), ids=lambda p: p.name)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_plan_lists_the_grid_of_preset_and_command_line_without_torch(tmp_path):
    code = ("import sys, normscale.sweep as s; points = s.grid(['experiment=urns_task_diversity', "
            "'model_kwargs.hidden_size=64,128', 'seed=0']); "
            "print(len(points), any(m.startswith('torch') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "CACHE_DIR": str(tmp_path)}).stdout.split()
    assert out == ["22", "False"]  # 11 D values x 2 widths; seed fixed on the command line; no torch imported


# ---------------------------------------------------------------- on the real local cluster


def cluster_problem() -> str | None:
    """Why no local SLURM cluster is usable here (None when it is), starting one where possible."""
    if shutil.which("sinfo") and subprocess.run(["bash", str(ROOT / "tools/local_slurm.sh"), "status"],
                                                capture_output=True).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "tools/local_slurm.sh needs root to install and start slurm, munge and mariadb"
    started = subprocess.run(["bash", str(ROOT / "tools/local_slurm.sh"), "start"], capture_output=True, text=True)
    return None if started.returncode == 0 else f"tools/local_slurm.sh start failed: {started.stderr[-500:]}"


@pytest.fixture(scope="module")
def cluster():
    problem = cluster_problem()
    if problem:
        if os.environ.get("NORMSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"NORMSCALE_REQUIRE_SLURM=1 but no local SLURM cluster: {problem}")
        pytest.skip(f"no local SLURM cluster: {problem}")


def env_for(cache: Path, **extra) -> dict:
    return {**os.environ, "CACHE_DIR": str(cache), "NORMSCALE_CPUS_PER_TASK": "1", "NORMSCALE_TIME_MIN": "20",
            "PYTHONUNBUFFERED": "1", **extra}


def sbatch(cache: Path, *args: str, **extra) -> str:
    done = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=env_for(cache, **extra), capture_output=True,
                          text=True, check=True)
    return done.stdout.strip().split(";")[0]


def wait_for_jobs(name_prefix: str, timeout: float = 400) -> None:
    """Until no job whose name starts with name_prefix is queued or running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        names = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, check=True).stdout.split()
        if not any(n.startswith(name_prefix) for n in names):
            return
        time.sleep(1)
    raise AssertionError(f"jobs {name_prefix}* still queued after {timeout} s: {names}")


def manifests(cache: Path, name: str) -> list[Path]:
    directory = cache / "experiments" / "balls_and_urns" / name / "sweeps"
    return sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)


def run_sweep(cache: Path, name: str, *overrides: str) -> dict:
    """`sbatch slurm/sweep.sh ...` as users type it; wait for the planning job and the array; the manifest."""
    before = len(manifests(cache, name))
    plan_job = sbatch(cache, f"--output={cache}/plan-%j.out", "slurm/sweep.sh", f"name={name}", *TINY, *overrides)
    deadline = time.time() + 120
    while len(manifests(cache, name)) == before or not json.loads(manifests(cache, name)[-1].read_text())["jobs"]:
        assert time.time() < deadline, (cache / f"plan-{plan_job}.out").read_text()
        time.sleep(1)
    wait_for_jobs(f"ns-{name}")
    return json.loads(manifests(cache, name)[-1].read_text())


def assert_complete(run_dir: Path) -> None:
    assert [step for step, _ in list_checkpoints(run_dir)] == SCHEDULE, run_dir
    assert resume_step(run_dir) == 40


def test_array_sweep_completes_and_resubmission_runs_exactly_what_is_missing(cluster, tmp_path):
    record = run_sweep(tmp_path, "arr", "task_kwargs.num_tasks=2,4,8")
    assert len(record["points"]) == 3 and record["submitted"] == [0, 1, 2]
    assert record["jobs"][0]["array"] == "0-2"
    for run_dir in record["run_dirs"]:
        assert_complete(Path(run_dir))
    shutil.rmtree(record["run_dirs"][1])  # lose one finished point
    again = run_sweep(tmp_path, "arr", "task_kwargs.num_tasks=2,4,8")
    assert again["submitted"] == [1] and again["jobs"][0]["array"] == "0" and again["jobs"][0]["offset"] == 1
    assert_complete(Path(again["run_dirs"][1]))
    logs = sorted((tmp_path / "experiments/balls_and_urns/arr/sweeps/logs").glob(f"{again['jobs'][0]['job_id']}_*.out"))
    assert len(logs) == 1 and "sweep point 1 " in logs[0].read_text()  # exactly that one ran again
    status = subprocess.run([sys.executable, "-m", "normscale.sweep", "status", f"name=arr", *TINY,
                             "task_kwargs.num_tasks=2,4,8"], cwd=ROOT, env=env_for(tmp_path), capture_output=True,
                            text=True, check=True).stdout
    assert "3 finished, 0 running, 0 failed, 0 missing" in status


def test_a_failing_task_reports_its_log_and_the_others_finish(cluster, tmp_path):
    # a point that passes planning and fails in its task: its data exceed a tiny storage budget
    record = run_sweep(tmp_path, "fail", "data_kwargs.max_storage_gb=10,0.000001")
    assert_complete(Path(record["run_dirs"][0]))
    status = subprocess.run([sys.executable, "-m", "normscale.sweep", "status", "name=fail", *TINY,
                             "data_kwargs.max_storage_gb=10,0.000001"], cwd=ROOT, env=env_for(tmp_path), capture_output=True,
                            text=True, check=True).stdout
    assert "1 finished, 0 running, 1 failed, 0 missing" in status
    job = record["jobs"][0]["job_id"]
    log = tmp_path / f"experiments/balls_and_urns/fail/sweeps/logs/{job}_1.out"
    assert f"log {log}" in status
    text = log.read_text()
    assert "over data_kwargs.max_storage_gb=1e-06" in text and f"log: {log}" in text


def test_preempted_array_task_requeues_and_resumes_with_every_checkpoint(cluster, tmp_path):
    long = ["training_kwargs.max_steps=3000", "training_kwargs.save_steps.num_checkpoints=4"]
    plan_job = sbatch(tmp_path, f"--output={tmp_path}/plan-%j.out", "slurm/sweep.sh", "name=pre", *TINY, *long)
    deadline = time.time() + 120
    while not manifests(tmp_path, "pre") or not json.loads(manifests(tmp_path, "pre")[-1].read_text())["jobs"]:
        assert time.time() < deadline, (tmp_path / f"plan-{plan_job}.out").read_text()
        time.sleep(1)
    record = json.loads(manifests(tmp_path, "pre")[-1].read_text())
    run_dir, job = Path(record["run_dirs"][0]), f"{record['jobs'][0]['job_id']}_0"
    metrics = run_dir / "train_metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:  # training is under way
        assert time.time() < deadline + 180, "training never started"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for_jobs("ns-pre", timeout=600)
    log = (run_dir.parents[1] / "sweeps" / "logs" / f"{job}.out").read_text()
    assert "requeueing job" in log and "restart 1" in log
    resumed = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if line.startswith("normscale: resumed at step")]
    assert resumed and resumed[0] > 0, log[-2000:]
    assert [s for s, _ in list_checkpoints(run_dir)] == sorted({0, *checkpoint_schedule("sqrt_schedule", 3000, 4, 10)})
    assert resume_step(run_dir) == 3000


def test_hydra_submitit_launcher_runs_the_same_run_directories(cluster, tmp_path):
    args = ["-m", "hydra/launcher=slurm", "name=hyd", *TINY, "task_kwargs.num_tasks=2,4,8"]
    done = subprocess.run([sys.executable, "-m", "normscale.train", *args], cwd=ROOT, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    planned = [sweep.resolve(p).run_dir.name for p in sweep.grid(["name=hyd", *TINY, "task_kwargs.num_tasks=2,4,8"])]
    runs = sorted((tmp_path / "experiments/balls_and_urns/hyd/runs").iterdir())
    assert [r.name for r in runs] == sorted(planned)  # the run directories slurm/sweep.sh would use
    for run_dir in runs:
        assert_complete(run_dir)
    assert list((tmp_path / "experiments/balls_and_urns/hyd/.submitit").iterdir())  # it went through submitit


def test_multinode_script_runs_two_machines_as_two_slurm_tasks(cluster, tmp_path):
    out = tmp_path / "multinode.out"
    sbatch(tmp_path, "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={out}",
           "slurm/train_multinode.sh", "name=mn", *TINY, NORMSCALE_GPUS_PER_NODE="0")
    text = out.read_text()
    assert "2 machine(s) x 1 process(es), rendezvous 127.0.0.1" in text
    assert "on 2 process(es)" in text and "parameters identical on all 2 ranks" in text
    run_dir = next((tmp_path / "experiments/balls_and_urns/mn/runs").iterdir())
    assert_complete(run_dir)


def test_hydra_path_preemption_follows_submitits_checkpoint_and_requeue_contract(cluster, tmp_path):
    """USR2 (submitit's warning signal) mid-run: the run saves its resume state, submitit requeues the job, and the
    requeued job resumes the run at a step > 0 and ends with every scheduled checkpoint."""
    args = ["-m", "hydra/launcher=slurm", "name=hpre", *TINY, "training_kwargs.max_steps=3000",
            "training_kwargs.save_steps.num_checkpoints=4"]
    hydra = subprocess.Popen([sys.executable, "-m", "normscale.train", *args], cwd=ROOT, env=env_for(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    experiment_dir = tmp_path / "experiments/balls_and_urns/hpre"
    deadline = time.time() + 300
    while not list(experiment_dir.glob("runs/*/train_metrics.jsonl")) or \
            len(next(experiment_dir.glob("runs/*/train_metrics.jsonl")).read_text().splitlines()) < 3:
        assert time.time() < deadline and hydra.poll() is None, "training never started"
        time.sleep(0.5)
    job = subprocess.run(["squeue", "-h", "-n", "ns-hpre", "-o", "%i"], capture_output=True, text=True,
                         check=True).stdout.split()[0]
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out, _ = hydra.communicate(timeout=600)
    assert hydra.returncode == 0, out[-3000:]
    run_dir = next(experiment_dir.glob("runs/*"))
    logs = "\n".join(p.read_text() for p in (experiment_dir / ".submitit").rglob("*_log.out"))
    assert "normscale: preempted; resume state saved at step" in logs, logs[-3000:]
    assert "Caught signal SIGUSR2" in logs and "DUE TO JOB REQUEUE" in logs, logs[-3000:]  # submitit requeued it
    resumed = [int(line.rsplit(" ", 1)[1]) for line in logs.splitlines() if line.startswith("normscale: resumed at step")]
    assert resumed and resumed[0] > 0, logs[-3000:]
    assert [s for s, _ in list_checkpoints(run_dir)] == sorted({0, *checkpoint_schedule("sqrt_schedule", 3000, 4, 10)})
    assert resume_step(run_dir) == 3000


def test_llm_eval_script_shards_a_model_over_two_slurm_tasks(cluster, tmp_path):
    from llm_fixture import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny", vocab_size=512)
    out = tmp_path / "llm.out"
    sbatch(tmp_path, "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={out}",
           "slurm/llm_eval.sh", "experiment=llm_eval", f"model_kwargs.model_path={model}", "model_kwargs.dtype=float32",
           "task_kwargs.num_dims=4", "task_kwargs.context_length=12", "task_kwargs.num_tasks=4",
           "task_kwargs.num_ood_tasks=20", "training_kwargs.batch_size=8", "data_kwargs.eval_size=32",
           "eval_kwargs.batch_size=8", "eval_kwargs.num_eval_batches=2", NORMSCALE_GPUS_PER_NODE="0")
    text = out.read_text()
    assert "2 machine(s) x 1 process(es)" in text and "rank 1 holds" in text and "(fsdp)" in text, text[-3000:]
    results = list((tmp_path / "experiments/balls_and_urns/llm_eval/runs/llm-tiny").glob("*/metrics.pt"))
    assert len(results) == 1
