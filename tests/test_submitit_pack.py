"""`python -m normscale.train -m <sweep> pack=N hydra/launcher=local|slurm` (normscale.launcher): one submitit
job per pack, in the run directories and with the very files of the solo sweep; a pack job that raises ends the sweep
with its line while the other packs train; on the real local cluster, packs as SLURM jobs, and a pack warned with USR2
saves every run, is requeued by submitit and resumes."""
import shutil
import subprocess
import sys
import time

from conftest import ROOT, run_module
from faults import truncate
from normscale import sweep
from normscale.config import checkpoint_schedule
from normscale.layout import list_checkpoints, resume_step
from test_pack_forming import SWEEP, run_files
from test_slurm import TINY, assert_complete, env_for, resumed_steps

FOUR = [o.replace("num_tasks=2,4,8", "num_tasks=2,4") for o in SWEEP if o != "-m"]  # D x learning rate
EXPERIMENT = ("experiments", "balls_and_urns", "packed")


def train_sweep(cache, *args: str) -> subprocess.CompletedProcess:
    return run_module("normscale.train", "-m", *args, env=env_for(cache), timeout=600)


def jobs(experiment_dir) -> list[str]:
    """The ids of a sweep's submitit jobs (SLURM: its array's tasks), by their folders."""
    return sorted(p.parent.name for p in (experiment_dir / ".submitit").glob("*/*_submitted.pkl"))


def job_logs(experiment_dir) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((experiment_dir / ".submitit").rglob("*_log.*")))


def test_local_launcher_trains_a_job_per_pack_with_the_files_of_the_solo_sweep(tmp_path):
    """pack=2 over 4 points (num_tasks x learning rate): 2 submitit jobs of 2 runs, the pack each holds printed, and
    every run directory holds the very checkpoints, resume states and eval records of the solo sweep."""
    solo = train_sweep(tmp_path / "solo", *FOUR)
    packed = train_sweep(tmp_path / "packed", "hydra/launcher=local", *FOUR, "pack=2")
    assert solo.returncode == 0 and packed.returncode == 0, (solo.stderr + packed.stderr)[-3000:]
    assert "normscale: pack 0: points 0, 1 (task_kwargs.num_tasks=2 training_kwargs.learning_rate=0.001 | " \
           "task_kwargs.num_tasks=2 training_kwargs.learning_rate=0.003)" in packed.stdout
    assert "normscale: pack 1: points 2, 3 (task_kwargs.num_tasks=4 " in packed.stdout
    experiment_dir = tmp_path.joinpath("packed", *EXPERIMENT)
    assert len(jobs(experiment_dir)) == 2
    assert job_logs(experiment_dir).count("training 2 run(s) as one pack, their steps in turn") == 2
    a, b = run_files(tmp_path / "solo"), run_files(tmp_path / "packed")
    assert len(a) == 4 * 8 and a == b


def test_a_pack_job_that_raises_ends_the_sweep_with_its_line_and_the_other_packs_train(tmp_path):
    """The D=2 dataset damaged: the pack of those runs refuses before any run writes a file; the launcher ends with
    that pack's one line and exit 2, and the D=4 pack trains."""
    one_rate = [o for o in FOUR if not o.startswith("training_kwargs.learning_rate=")]
    first = train_sweep(tmp_path / "first", *one_rate, "training_kwargs.learning_rate=0.001")  # makes the data
    assert first.returncode == 0, first.stderr[-3000:]
    data = tmp_path.joinpath("first", *EXPERIMENT, "data")
    shutil.copytree(data, tmp_path.joinpath(*EXPERIMENT, "data"))
    tasks = next(tmp_path.joinpath(*EXPERIMENT, "data").glob("D2-*/tasks.h5"))
    truncate(tasks)
    result = train_sweep(tmp_path, "hydra/launcher=local", *FOUR, "pack=2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"normscale: error: pack 0: data file {tasks} is truncated or altered" in result.stderr
    assert "Traceback" not in result.stderr
    runs = list(tmp_path.joinpath(*EXPERIMENT, "runs").iterdir())
    trained = [run for run in runs if "task_kwargs.num_tasks=4," in run.name]
    assert len(trained) == 2 and all([s for s, _ in list_checkpoints(run)] == [0, 4, 8] for run in trained)
    assert not any(path for run in runs if run not in trained for path in run.iterdir())  # nothing written


def test_pack_auto_with_a_submitit_launcher_is_one_line(tmp_path):
    result = train_sweep(tmp_path, "hydra/launcher=local", *FOUR, "pack=auto")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == ("normscale: error: pack=auto with hydra/launcher=local: a pack's size "
                                              "is fixed when its job is submitted, before the job sees its device; "
                                              "give pack=N")
    assert not tmp_path.joinpath(*EXPERIMENT, "runs").exists()


def test_a_command_that_trains_nothing_runs_its_points_as_jobs_whatever_pack_says(tmp_path):
    """The data command with the training sweep's overrides, pack=2 included (as users copy them): one job per point
    preparing its dataset, as without pack; no run is trained."""
    result = run_module("normscale.data", "-m", "hydra/launcher=local", *FOUR, "pack=2", env=env_for(tmp_path),
                        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "as one pack" not in result.stdout and "normscale: pack 0" not in result.stdout
    assert len(jobs(tmp_path.joinpath(*EXPERIMENT))) == 4
    assert len(list(tmp_path.joinpath(*EXPERIMENT, "data").glob("D*"))) == 2  # D=2 and D=4
    assert not tmp_path.joinpath(*EXPERIMENT, "runs").exists()


def test_solo_jobs_send_back_a_refused_point_and_an_error_as_the_default_launcher_reports_them(tmp_path):
    """pack=1 under hydra/launcher=local: a point refused in its job (failed.json) is listed and sets the exit code;
    a point whose config is bad ends the sweep with its one line, not submitit's traceback; the other points train."""
    one_rate = [o for o in FOUR if not o.startswith("training_kwargs.learning_rate=")]
    first = train_sweep(tmp_path, "hydra/launcher=local", *one_rate, "training_kwargs.learning_rate=0.001")
    assert first.returncode == 0, first.stderr[-3000:]
    failed = next(tmp_path.joinpath(*EXPERIMENT, "runs").glob("*num_tasks=2,*"))
    (failed / "failed.json").write_text('{"step": 3, "last_finite_step": 0, "reason": "a test"}')
    refused = train_sweep(tmp_path, "hydra/launcher=local", *FOUR)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "normscale: skipped: run " in refused.stderr and "failed at step 3 (a test)" in refused.stderr
    assert refused.stderr.splitlines()[-1].startswith("normscale: error: 1 sweep point(s) skipped, each named above: ")
    assert len([run for run in tmp_path.joinpath(*EXPERIMENT, "runs").iterdir() if (run / "checkpoint-8").exists()]) == 4
    bad = train_sweep(tmp_path / "bad", "hydra/launcher=local", "training_kwargs.learning_rate=0.001",
                      *[o for o in one_rate if not o.startswith("training_kwargs.warmup_steps=")],
                      "training_kwargs.warmup_steps=-1,2")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert bad.stderr.splitlines()[-1].startswith("normscale: error: point 0: training_kwargs.warmup_steps=-1")


# ---------------------------------------------------------------- on the real local cluster


def test_slurm_launcher_trains_a_slurm_job_per_pack_in_the_solo_run_directories(cluster, tmp_path):
    overrides = ["name=hpk", *TINY, "task_kwargs.num_tasks=2,4,8"]
    done = subprocess.run([sys.executable, "-m", "normscale.train", "-m", "hydra/launcher=slurm", *overrides, "pack=2"],
                          cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "normscale: pack 0: points 0, 1 (" in done.stdout and "normscale: pack 1: points 2 (" in done.stdout
    planned = [sweep.resolve(p).run_dir.name for p in sweep.grid(overrides)]
    experiment_dir = tmp_path / "experiments/balls_and_urns/hpk"
    runs = sorted((experiment_dir / "runs").iterdir())
    assert [r.name for r in runs] == sorted(planned)
    for run_dir in runs:
        assert_complete(run_dir)
    assert len(jobs(experiment_dir)) == 2
    logs = job_logs(experiment_dir)
    assert "training 2 run(s) as one pack" in logs and "training 1 run(s) as one pack" in logs
    for script in (experiment_dir / ".submitit").rglob("*_submission.sh"):
        lines = script.read_text().splitlines()
        assert "#SBATCH --requeue" in lines and "#SBATCH --signal=USR2@120" in lines


PREEMPTED_STEPS = 2000  # two runs in turn: seconds on a quiet machine, so the signal reaches the pack before its end
PREEMPTED = [f"training_kwargs.max_steps={PREEMPTED_STEPS}", "training_kwargs.save_steps.num_checkpoints=4"]


def test_a_pack_warned_with_usr2_is_requeued_by_submitit_and_resumes_every_run(cluster, tmp_path):
    """USR2 to a pack job mid-run: both runs save their resume state, submitit requeues the job (the launcher's
    checkpoint), the requeued job resumes both at a step > 0 and they end with every scheduled checkpoint."""
    args = ["-m", "hydra/launcher=slurm", "name=hppre", *TINY, *PREEMPTED, "task_kwargs.num_tasks=2,4", "pack=2"]
    hydra = subprocess.Popen([sys.executable, "-m", "normscale.train", *args], cwd=ROOT, env=env_for(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    experiment_dir = tmp_path / "experiments/balls_and_urns/hppre"
    deadline = time.time() + 300
    while not any(len(m.read_text().splitlines()) >= 3 for m in experiment_dir.glob("runs/*/train_metrics.jsonl")):
        assert time.time() < deadline and hydra.poll() is None, "training never started"
        time.sleep(0.5)
    [job] = jobs(experiment_dir)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out, _ = hydra.communicate(timeout=600)
    assert hydra.returncode == 0, out[-3000:]
    logs = job_logs(experiment_dir)
    assert logs.count("normscale: preempted; resume state saved at step") == 2, logs[-3000:]
    assert "Caught signal SIGUSR2" in logs and "DUE TO JOB REQUEUE" in logs, logs[-3000:]
    assert len(resumed_steps(logs)) == 2 and min(resumed_steps(logs)) > 0, logs[-3000:]
    schedule = sorted({0, *checkpoint_schedule("sqrt_schedule", PREEMPTED_STEPS, 4, 10)})
    for run_dir in experiment_dir.glob("runs/*"):
        assert [s for s, _ in list_checkpoints(run_dir)] == schedule and resume_step(run_dir) == PREEMPTED_STEPS
