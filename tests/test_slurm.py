"""SLURM paths on a real single-node cluster on localhost (tools/local_slurm.sh): job-array sweeps through
slurm/sweep.sh, the Hydra submitit launcher, preemption and requeue (one and two processes per task, multi-node),
failing tasks, frozen manifests, the slurm/submit wrapper, multi-node as two tasks.

Skipped only when no local cluster can be started here (the reason is given); `.ci/run` starts one and sets
NORMSCALE_REQUIRE_SLURM=1, under which a missing cluster fails instead. A cluster the session starts (the `cluster`
fixture, conftest.py) is stopped at its end (only the daemons it started). Job logs are read with errors="replace":
the tasks of one job write to one file at once, so the bytes of multi-byte characters (tqdm's bars) can
interleave."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from normscale import sweep
from normscale.layout import list_checkpoints, resume_step
from normscale.config import checkpoint_schedule

TINY = ["setting=balls_and_urns", "logging.wandb=false", "task_kwargs.num_dims=4", "task_kwargs.context_length=12",
        "task_kwargs.num_ood_tasks=20", "training_kwargs.batch_size=8", "training_kwargs.max_steps=40",
        "training_kwargs.warmup_steps=5", "training_kwargs.eval_every=1000", "training_kwargs.log_every=10",
        "training_kwargs.save_steps.num_checkpoints=3", "training_kwargs.save_steps.first_step=10",
        "model_kwargs.hidden_size=16", "data_kwargs.eval_size=32", "eval_kwargs.batch_size=16",
        "eval_kwargs.num_eval_batches=2"]
SCHEDULE = sorted({0, *checkpoint_schedule("sqrt_schedule", 40, 3, 10)})
LONG_STEPS = 20000  # long enough (tens of seconds on a quiet machine) that a signal reaches the run before its end
LONG = [f"training_kwargs.max_steps={LONG_STEPS}", "training_kwargs.save_steps.num_checkpoints=4"]
LONG_SCHEDULE = sorted({0, *checkpoint_schedule("sqrt_schedule", LONG_STEPS, 4, 10)})


def test_array_specs_chunks_and_sbatch_resources(tmp_path, monkeypatch):
    assert sweep.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert sweep.chunks(list(range(10)), 4) == [(0, [0, 1, 2, 3]), (4, [0, 1, 2, 3]), (8, [0, 1])]
    assert sweep.chunks([1, 3, 9], 1001) == [(1, [0, 2, 8])]
    monkeypatch.setenv("NORMSCALE_PARTITION", "gpu")
    monkeypatch.setenv("NORMSCALE_CPUS_PER_TASK", "6")
    monkeypatch.setenv("NORMSCALE_GPUS_PER_TASK", "4")
    monkeypatch.setenv("NORMSCALE_TIME_MIN", "90")
    command = sweep.sbatch_command(tmp_path / "m.json", 8, [0, 1], "exp", sweep.resources(), throttle=3)
    assert "--array=0-1%3" in command and "--partition=gpu" in command and "--cpus-per-task=6" in command
    assert "--gpus-per-task=4" in command and "--time=90" in command and "--requeue" in command
    assert any(a.startswith("--signal=B:USR1@") for a in command)
    assert (f"--export=ALL,NORMSCALE_ROOT={ROOT},NORMSCALE_SWEEP_MANIFEST={tmp_path / 'm.json'},NORMSCALE_SWEEP_OFFSET=8,"
            f"NORMSCALE_SWEEP_LOG={tmp_path / 'logs' / '%A_%a.out'}") in command
    assert f"--output={tmp_path / 'logs' / '%A_%a.out'}" in command
    assert command[-1] == str(ROOT / "slurm" / "sweep.sh")


@pytest.mark.parametrize("script", [*sorted((ROOT / "slurm").glob("*.sh")), ROOT / "slurm/submit", ROOT / ".ci/run",
                                    ROOT / "tools/local_slurm.sh"], ids=lambda p: p.name)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_submit_wrapper_takes_every_scripts_resources_from_the_site_settings(tmp_path):
    site = {"NORMSCALE_PARTITION": "gpu", "NORMSCALE_ACCOUNT": "lab", "NORMSCALE_TIME_MIN": "90",
            "NORMSCALE_GPUS_PER_NODE": "4", "NORMSCALE_SIGNAL_SECONDS": "300", "NORMSCALE_MEM": "64G"}

    def dry_run(*args):  # from elsewhere than the checkout, as users may
        done = subprocess.run(["bash", str(ROOT / "slurm/submit"), "--dry-run", *args], cwd=tmp_path,
                              env={**os.environ, **site}, capture_output=True, text=True, check=True)
        return done.stderr.split()

    multinode = dry_run("--nodes=2", str(ROOT / "slurm/train_multinode.sh"), "name=x")
    assert f"NORMSCALE_ROOT={ROOT}" in multinode
    for option in ("--partition=gpu", "--account=lab", "--time=90", "--mem=64G", "--gpus-per-node=4",
                   "--signal=B:USR1@300"):
        assert option in multinode and multinode.index(option) < multinode.index("--nodes=2")  # the user's win
    assert multinode[-2:] == [str(ROOT / "slurm/train_multinode.sh"), "name=x"]
    llm = dry_run("--nodes=2", "--gpus-per-node=2", str(ROOT / "slurm/llm_eval.sh"))
    assert llm.index("--gpus-per-node=4") < llm.index("--gpus-per-node=2") and not any("--signal" in a for a in llm)
    plan = dry_run(str(ROOT / "slurm/sweep.sh"), "experiment=demo")
    assert "--partition=gpu" in plan and not any(a.startswith(("--time", "--gpus")) for a in plan)
    usage = subprocess.run(["bash", str(ROOT / "slurm/submit"), "--nodes=2"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: slurm/submit" in usage.stderr


def test_a_signal_during_start_up_stops_the_run_cleanly_at_its_first_step(tmp_path):
    """USR1 while the run is still preparing data and building its model (before its first step) sets the flag: the
    run saves its resume state after one step and exits 0; it resumes from there."""
    args = [sys.executable, "-m", "normscale.train", "name=early", *TINY]
    proc = subprocess.Popen(args, cwd=ROOT, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if line.startswith("normscale: run "):  # data prepared; model, optimizer and step-0 checkpoint still to come
            proc.send_signal(signal.SIGUSR1)
            break
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    step = int(re.search(r"preempted; resume state saved at step (\d+)", out).group(1))
    run_dir = next((tmp_path / "experiments/balls_and_urns/early/runs").iterdir())
    assert 1 <= step < 40 and resume_step(run_dir) == step
    again = subprocess.run(args, cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"resumed at step {step}" in again.stdout, again.stderr[-3000:]
    assert_complete(run_dir)


def test_hydra_local_launcher_runs_the_same_run_directories(tmp_path):
    overrides = ["name=loc", *TINY, "task_kwargs.num_tasks=2,4"]
    done = subprocess.run([sys.executable, "-m", "normscale.train", "-m", "hydra/launcher=local", *overrides], cwd=ROOT,
                          env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    planned = [sweep.resolve(p).run_dir.name for p in sweep.grid(overrides)]
    runs = sorted((tmp_path / "experiments/balls_and_urns/loc/runs").iterdir())
    assert [r.name for r in runs] == sorted(planned)  # the run directories slurm/sweep.sh would use
    for run_dir in runs:
        assert_complete(run_dir)
    assert list((tmp_path / "experiments/balls_and_urns/loc/.submitit").iterdir())  # through submitit's local executor


@pytest.mark.skipif(os.geteuid() != 0, reason="tools/local_slurm.sh stop needs root")
def test_local_slurm_stop_with_a_started_file_stops_only_the_daemons_listed_with_their_pid(tmp_path):
    """What .ci/run and the cluster fixture rely on, with stand-in daemons (copies of sleep named like the daemons)
    in a private state directory: a daemon listed with its pid is stopped, one not listed or listed with another
    pid keeps running."""
    state = tmp_path / "state"
    (state / "pids").mkdir(parents=True)
    daemons = {}
    for name in ("slurmd", "slurmctld", "munged"):
        shutil.copy("/bin/sleep", tmp_path / name)
        daemons[name] = subprocess.Popen([str(tmp_path / name), "300"])
        (state / "pids" / f"{name}.pid").write_text(f"{daemons[name].pid}\n")
    started = tmp_path / "started"
    started.write_text(f"slurmd {daemons['slurmd'].pid}\nmunged 1\n")
    env = {**os.environ, "NORMSCALE_SLURM_DIR": str(state)}
    stop = subprocess.run(["bash", str(ROOT / "tools/local_slurm.sh"), "stop", "--started", str(started)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert daemons["slurmd"].wait(timeout=30) == -signal.SIGTERM
    assert daemons["slurmctld"].poll() is None and daemons["munged"].poll() is None
    for proc in daemons.values():
        proc.kill()
        proc.wait()


def test_plan_lists_the_grid_of_preset_and_command_line_without_torch(tmp_path):
    code = ("import sys, normscale.sweep as s; points = s.grid(['experiment=urns_task_diversity', "
            "'model_kwargs.hidden_size=64,128', 'seed=0']); "
            "print(len(points), any(m.startswith('torch') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "CACHE_DIR": str(tmp_path)}).stdout.split()
    assert out == ["22", "False"]  # 11 D values x 2 widths; seed fixed on the command line; no torch imported


def test_plan_and_status_show_failed_and_conflicting_points_and_submit_neither(tmp_path, monkeypatch, cluster):
    """Four points: finished, failed (failed.json), conflicting (its directory was trained with another width) and
    missing. `plan` and `status` name the failure's reason and the differing keys; `plan --submit` (to the local
    cluster) submits only the missing point and says how to train the others;
    with overwrite=true the failed and conflicting points are submitted too (they are replaced)."""
    from conftest import compose_config
    from normscale.layout import write_config

    monkeypatch.setenv("CACHE_DIR", str(tmp_path))  # this process's sweep.resolve, as the commands' (env_for)
    overrides = ["name=states", *TINY, "task_kwargs.num_tasks=2,4,8,16"]
    points = [sweep.resolve(p) for p in sweep.grid(overrides)]
    (finished, failed, conflicting, _missing) = points
    for point, extra in ((finished, []), (failed, []), (conflicting, ["model_kwargs.hidden_size=32"])):
        config = compose_config(*point.overrides, *extra, f"cache_dir={tmp_path}")
        point.run_dir.mkdir(parents=True)
        write_config(point.run_dir, config, point.overrides)
        step = 40 if point is finished else 20
        (point.run_dir / f".resume-{step}").mkdir()
        (point.run_dir / f".resume-{step}/state.json").write_text(json.dumps({"step": step}))
        (point.run_dir / "resume").symlink_to(f".resume-{step}")
    (failed.run_dir / "failed.json").write_text(json.dumps({"step": 30, "reason": "non-finite loss nan"}))
    env = env_for(tmp_path)

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "normscale.sweep", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        return done.stdout.splitlines()

    plan = cli("plan", *overrides)
    assert plan[0].split()[1] == "finished" and plan[3].split()[1] == "missing"
    assert plan[1].split()[1] == "failed" and "(failed at step 30: non-finite loss nan)" in plan[1]
    assert plan[2].split()[1] == "conflict" and "model_kwargs.hidden_size: 32 -> 16" in plan[2]
    assert "4 point(s), 1 finished, 1 to run, 1 failed, 1 conflict" in plan[4]
    assert "overwrite=true trains such a point again, or choose another name=" in plan[5]
    status = cli("status", *overrides)
    assert "failed at step 30: non-finite loss nan" in status[1] and status[1].split()[1] == "failed"
    assert status[2].split()[1] == "conflict" and "model_kwargs.hidden_size: 32 -> 16" in status[2]
    assert "1 finished, 0 running, 1 failed, 1 missing, 1 conflict (never submitted)" in status[4]
    submitted = cli("plan", "--submit", *overrides)
    assert any("(--array=0, offset 3)" in line for line in submitted), submitted
    (manifest,) = manifests(tmp_path, "states")
    record = json.loads(manifest.read_text())
    subprocess.run(["scancel", *(job["job_id"] for job in record["jobs"])], check=True)  # the point itself is not needed
    assert record["submitted"] == [3] and len(record["jobs"]) == 1
    replaced = cli("plan", *overrides, "overwrite=true")
    assert [line.split()[1] for line in replaced[:4]] == ["finished", "replace", "replace", "missing"]
    assert "overwrite=true trains it again: failed at step 30" in replaced[1] and "3 to run" in replaced[4]


def test_a_bad_point_or_flag_of_a_sweep_command_is_one_line(tmp_path):
    for args in (["plan", "-m", "name=x"], ["status", "--multirun", "name=x"], ["progress", "bogus_key=1"],
                 ["plan", "--bogus", "name=x"], ["plan", "name=x", "training_kwargs.learning_rate=1e-3,nan"]):
        done = subprocess.run([sys.executable, "-m", "normscale.sweep", *args], cwd=ROOT, env=env_for(tmp_path),
                              capture_output=True, text=True)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr and done.stderr.count("normscale: error:") == 1, (args, done.stderr)


# ---------------------------------------------------------------- on the real local cluster


def env_for(cache: Path, **extra) -> dict:
    return {**os.environ, "CACHE_DIR": str(cache), "NORMSCALE_CPUS_PER_TASK": "1", "NORMSCALE_TIME_MIN": "20",
            "PYTHONUNBUFFERED": "1", **extra}


def sbatch(cache: Path, *args: str, submit: str = "sbatch", cwd: Path = ROOT, **extra) -> str:
    done = subprocess.run([*submit.split(), "--parsable", *args], cwd=cwd, env=env_for(cache, **extra),
                          capture_output=True, text=True, check=True)
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


def submit_sweep(cache: Path, name: str, *overrides: str, cwd: Path = ROOT, **extra) -> dict:
    """`sbatch slurm/sweep.sh ...` as users type it; wait for the planning job to submit the array; the manifest."""
    before = len(manifests(cache, name))
    plan_job = sbatch(cache, f"--output={cache}/plan-%j.out", "slurm/sweep.sh", *overrides, cwd=cwd, **extra)
    deadline = time.time() + 120
    while len(manifests(cache, name)) == before or not json.loads(manifests(cache, name)[-1].read_text())["jobs"]:
        assert time.time() < deadline, (cache / f"plan-{plan_job}.out").read_text()
        time.sleep(1)
    return json.loads(manifests(cache, name)[-1].read_text())


def run_sweep(cache: Path, name: str, *overrides: str) -> dict:
    """submit_sweep, then wait for the array to finish."""
    record = submit_sweep(cache, name, f"name={name}", *TINY, *overrides)
    wait_for_jobs(f"ns-{name}")
    return record


def wait_for_training(metrics: Path, timeout: float = 300) -> None:
    """Until the run has logged 3 times (step 30: the step-10 resume state is saved)."""
    deadline = time.time() + timeout
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
        assert time.time() < deadline, f"training never got under way ({metrics})"
        time.sleep(0.5)


def sweep_cli(cache: Path, *args: str, cwd: Path = ROOT) -> str:
    return subprocess.run([sys.executable, "-m", "normscale.sweep", *args], cwd=cwd, env=env_for(cache),
                          capture_output=True, text=True, check=True).stdout


def resumed_steps(log: str) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if line.startswith("normscale: resumed at step")]


def assert_complete(run_dir: Path) -> None:
    assert [step for step, _ in list_checkpoints(run_dir)] == SCHEDULE, run_dir
    assert resume_step(run_dir) == 40


def test_plan_prints_the_array_commands_it_would_submit_and_submits_nothing(cluster, tmp_path):
    overrides = ["name=pl", *TINY, "task_kwargs.num_tasks=2,4,8"]
    out = sweep_cli(tmp_path, "plan", "--throttle", "2", *overrides)
    command = next(line for line in out.splitlines() if line.startswith("normscale: would submit: sbatch "))
    assert " --array=0-2%2 " in command and " --requeue " in command and " --signal=B:USR1@" in command
    assert command.endswith(str(ROOT / "slurm/sweep.sh"))
    assert not (tmp_path / "experiments/balls_and_urns/pl/sweeps").exists()  # nothing frozen, nothing submitted
    assert "0 finished, 0 running, 0 failed, 3 missing (never submitted)" in sweep_cli(tmp_path, "status", *overrides)


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
    assert len(logs) == 1 and "sweep point 1 " in logs[0].read_text(errors="replace")  # exactly that one ran again
    status = sweep_cli(tmp_path, "status", "name=arr", *TINY, "task_kwargs.num_tasks=2,4,8")
    assert "3 finished, 0 running, 0 failed, 0 missing" in status


def test_a_failing_task_reports_its_log_and_the_others_finish(cluster, tmp_path):
    """A point that passes planning and fails in its task (its loss diverges: exit 3, recorded in failed.json):
    `status` lists it as failed with the run's reason and the task's log; a resubmission does not run it again."""
    grid = ["training_kwargs.learning_rate=5e-4,1e30"]
    record = run_sweep(tmp_path, "fail", *grid)
    assert_complete(Path(record["run_dirs"][0]))
    status = sweep_cli(tmp_path, "status", "name=fail", *TINY, *grid)
    assert "1 finished, 0 running, 1 failed, 0 missing" in status
    job = record["jobs"][0]["job_id"]
    log = tmp_path / f"experiments/balls_and_urns/fail/sweeps/logs/{job}_1.out"
    failed_line = next(line for line in status.splitlines() if line.startswith("   1  failed"))
    assert "failed at step 10: the training loss or gradient norm is not finite" in failed_line
    assert f"log {log}" in failed_line
    text = log.read_text(errors="replace")
    assert "failed with exit code 3" in text and f"log: {log}" in text and "Traceback" not in text
    again = sweep_cli(tmp_path, "plan", "--submit", "name=fail", *TINY, *grid)
    assert "2 point(s), 1 finished, 0 to run, 1 failed" in again and "overwrite=true" in again


@pytest.mark.parametrize("processes", [1, 2])
def test_preempted_array_task_requeues_and_resumes_with_every_checkpoint(cluster, tmp_path, processes):
    """USR1 to the task's batch shell (what --signal=B:USR1@... sends before the time limit). With 2 processes the run
    goes through accelerate launch (torch elastic), whose launcher would die of USR1: the workers get it directly."""
    name = f"pre{processes}"
    record = submit_sweep(tmp_path, name, f"name={name}", *TINY, *LONG, NORMSCALE_PROCESSES_PER_TASK=str(processes))
    run_dir, job = Path(record["run_dirs"][0]), f"{record['jobs'][0]['job_id']}_0"
    wait_for_training(run_dir / "train_metrics.jsonl")
    status = sweep_cli(tmp_path, "status", f"name={name}", *TINY, *LONG)
    assert "0 finished, 1 running, 0 failed, 0 missing" in status and f"{job} RUNNING" in status
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for_jobs(f"ns-{name}", timeout=600)
    log = (run_dir.parents[1] / "sweeps" / "logs" / f"{job}.out").read_text(errors="replace")
    assert f"{processes} process(es)): " in log and f"on {processes} process(es)" in log, log[-3000:]
    assert "requeueing job" in log and "restart 1" in log, log[-3000:]
    assert resumed_steps(log) and resumed_steps(log)[0] > 0, log[-3000:]
    assert [s for s, _ in list_checkpoints(run_dir)] == LONG_SCHEDULE
    assert resume_step(run_dir) == LONG_STEPS


def test_requeued_task_keeps_its_frozen_point_after_the_preset_changed(cluster, tmp_path):
    """A checkout whose preset sweeps num_tasks=4; while the array task trains, the preset changes to 16 and the task
    is requeued with `scontrol requeue`: it resumes point 0 of the frozen manifest (num_tasks=4), not the new grid's."""
    checkout = tmp_path / "checkout"
    for part in ("normscale", "conf", "slurm", "launch"):
        shutil.copytree(ROOT / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    preset = checkout / "conf/experiment/frozen.yaml"

    def write_preset(num_tasks: int) -> None:
        preset.write_text(f"# @package _global_\nname: frozen\nhydra:\n  sweeper:\n    params:\n"
                          f"      task_kwargs.num_tasks: {num_tasks}\n")

    write_preset(4)
    overrides = ["experiment=frozen", *TINY, *LONG]
    record = submit_sweep(tmp_path, "frozen", *overrides, cwd=checkout, NORMSCALE_PYTHON=sys.executable)
    assert record["points"][0][-1] == "task_kwargs.num_tasks=4"
    run_dir, job = Path(record["run_dirs"][0]), f"{record['jobs'][0]['job_id']}_0"
    wait_for_training(run_dir / "train_metrics.jsonl")
    write_preset(16)
    assert "task_kwargs.num_tasks=16" in sweep_cli(tmp_path, "plan", *overrides, cwd=checkout)  # the grid moved
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for_jobs("ns-frozen", timeout=600)
    log = (run_dir.parents[1] / "sweeps" / "logs" / f"{job}.out").read_text(errors="replace")
    starts = [line for line in log.splitlines() if line.startswith("normscale: sweep point 0 ")]
    assert len(starts) == 2 and "restart 1" in starts[1] and all(s.endswith("task_kwargs.num_tasks=4") for s in starts)
    assert resumed_steps(log) and resumed_steps(log)[0] > 0, log[-3000:]
    assert [r.name for r in run_dir.parent.iterdir()] == [run_dir.name]
    assert [s for s, _ in list_checkpoints(run_dir)] == LONG_SCHEDULE and resume_step(run_dir) == LONG_STEPS


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
    scripts = list((tmp_path / "experiments/balls_and_urns/hyd/.submitit").rglob("*_submission.sh"))
    assert scripts  # it went through submitit, asking for a requeueable job and the warning signal
    for script in scripts:
        lines = script.read_text().splitlines()
        assert "#SBATCH --requeue" in lines and "#SBATCH --signal=USR2@120" in lines


def test_multinode_job_as_two_slurm_tasks_requeues_on_the_warning_signal_and_resumes(cluster, tmp_path):
    """slurm/submit with the site settings, 2 SLURM tasks acting as 2 machines; USR1 to the batch shell: every rank
    gets it, all stop at the same step and save, the job requeues itself and the requeued job resumes the run."""
    out = tmp_path / "multinode.out"
    job = sbatch(tmp_path, "--job-name=ns-mnpre", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                 f"--output={out}", "slurm/train_multinode.sh", "name=mn", *TINY, *LONG, submit="bash slurm/submit",
                 NORMSCALE_GPUS_PER_NODE="0", NORMSCALE_PARTITION="debug")
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    assert "Partition=debug" in shown and "TimeLimit=00:20:00" in shown and "Requeue=1" in shown
    run_dir = tmp_path / "experiments/balls_and_urns/mn/runs" / sweep.resolve(["name=mn", *TINY, *LONG]).run_dir.name
    wait_for_training(run_dir / "train_metrics.jsonl")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for_jobs("ns-mnpre", timeout=600)
    text = out.read_text(errors="replace")
    assert "2 machine(s) x 1 process(es), rendezvous 127.0.0.1" in text
    assert "on 2 process(es)" in text and "parameters identical on all 2 ranks" in text
    assert "requeueing job" in text and "restart 1" in text, text[-3000:]
    assert resumed_steps(text) and resumed_steps(text)[0] > 0, text[-3000:]
    assert [s for s, _ in list_checkpoints(run_dir)] == LONG_SCHEDULE and resume_step(run_dir) == LONG_STEPS


def test_hydra_path_preemption_follows_submitits_checkpoint_and_requeue_contract(cluster, tmp_path):
    """USR2 (submitit's warning signal) mid-run: the run saves its resume state, submitit requeues the job, and the
    requeued job resumes the run at a step > 0 and ends with every scheduled checkpoint."""
    args = ["-m", "hydra/launcher=slurm", "name=hpre", *TINY, *LONG]
    hydra = subprocess.Popen([sys.executable, "-m", "normscale.train", *args], cwd=ROOT, env=env_for(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    experiment_dir = tmp_path / "experiments/balls_and_urns/hpre"
    deadline = time.time() + 300
    while not list(experiment_dir.glob("runs/*/train_metrics.jsonl")) or \
            len(next(experiment_dir.glob("runs/*/train_metrics.jsonl")).read_text().splitlines()) < 3:
        assert time.time() < deadline and hydra.poll() is None, "training never started"
        time.sleep(0.5)
    job = next(d.name for d in (experiment_dir / ".submitit").iterdir() if d.name.isdigit())  # ours, by its folder
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out, _ = hydra.communicate(timeout=600)
    assert hydra.returncode == 0, out[-3000:]
    run_dir = next(experiment_dir.glob("runs/*"))
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((experiment_dir / ".submitit").rglob("*_log.*")))  # out and err
    assert "normscale: preempted; resume state saved at step" in logs, logs[-3000:]
    assert "Caught signal SIGUSR2" in logs and "DUE TO JOB REQUEUE" in logs, logs[-3000:]  # submitit requeued it
    assert resumed_steps(logs) and resumed_steps(logs)[0] > 0, logs[-3000:]
    assert [s for s, _ in list_checkpoints(run_dir)] == LONG_SCHEDULE
    assert resume_step(run_dir) == LONG_STEPS


def test_llm_eval_script_shards_a_model_over_two_slurm_tasks(cluster, tmp_path):
    from llm_fixture import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny", vocab_size=512)
    out = tmp_path / "llm.out"
    sbatch(tmp_path, "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={out}",
           "slurm/llm_eval.sh", "experiment=llm_eval", f"model_kwargs.model_path={model}", "model_kwargs.dtype=float32",
           "task_kwargs.num_dims=4", "task_kwargs.context_length=12", "task_kwargs.num_tasks=4",
           "task_kwargs.num_ood_tasks=20", "training_kwargs.batch_size=8", "data_kwargs.eval_size=32",
           "eval_kwargs.batch_size=8", "eval_kwargs.num_eval_batches=2", NORMSCALE_GPUS_PER_NODE="0")
    text = out.read_text(errors="replace")
    assert "2 machine(s) x 1 process(es)" in text and "rank 1 holds" in text and "(fsdp)" in text, text[-3000:]
    results = list((tmp_path / "experiments/balls_and_urns/llm_eval/runs/llm-tiny").glob("*/metrics.pt"))
    assert len(results) == 1


def test_batch_scripts_validate_once_before_starting_any_process(cluster, tmp_path):
    """Submitted with plain sbatch (slurm/submit would refuse them before submitting): a bad override of a multi-node
    run, and an LLM that cannot be loaded offline, end the job before srun starts any process, with exit code 2 and
    one error line in the job's log (no traceback, no launcher summary)."""
    from faults import one_error_line

    jobs = {"multinode": ("slurm/train_multinode.sh", ["name=bad", "bogus_key=1"], "unknown key bogus_key"),
            "llm": ("slurm/llm_eval.sh", ["experiment=llm_eval", "model_kwargs.model_path=org/absent"],
                    "HF_HUB_OFFLINE=1 forbids downloading")}
    for name, (script, args, message) in jobs.items():
        out = tmp_path / f"{name}.out"
        done = subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1",
                               f"--job-name=ns-bad-{name}", f"--output={out}", script, *args], cwd=ROOT,
                              env=env_for(tmp_path, NORMSCALE_GPUS_PER_NODE="0", HF_HUB_OFFLINE="1",
                                          HF_HOME=str(tmp_path / "hf")),
                              capture_output=True, text=True, timeout=300)
        text = out.read_text(errors="replace")
        assert done.returncode == 2, text[-3000:]
        assert message in one_error_line(text) and "ChildFailedError" not in text, text[-3000:]
    assert not (tmp_path / "experiments").exists()  # nothing written
