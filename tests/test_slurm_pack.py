"""Packed sweeps as SLURM array tasks (issue 13): `sweep plan` with pack=N lists the packs and the array it would
submit (one task per pack); a packed manifest's task trains its pack in one process (`sweep train-pack`), validates
its points first, ends with the most telling exit code and requeues on the warning signal (`progress --task`); a
task set up for G processes (G GPUs) trains G packs, one process each;
`status` maps array task -> pack -> points. The end-to-end test runs a packed and an unpacked sweep through
slurm/sweep.sh on the real local cluster (the `cluster` fixture, conftest.py) and compares their collated tables."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, compose_config, run_module
from faults import one_error_line
from normscale import sweep
from normscale.cli import fail_skipped
from normscale.layout import list_checkpoints, resume_step, sweep_log, write_config
from test_slurm import TINY, env_for, manifests, resumed_steps, sbatch, sweep_cli, wait_for_jobs, wait_for_training

STEPS = 250  # a pack of two runs trains for seconds after its first resume state: long enough to be preempted
# Four points of two shapes, listed so that each pack's points are not neighbours: packs [0, 2] (width 16) and [1, 3].
SWEEP = [*(o for o in TINY if not o.startswith(("model_kwargs.hidden_size=", "training_kwargs.max_steps="))),
         f"training_kwargs.max_steps={STEPS}", "task_kwargs.num_tasks=2,4", "model_kwargs.hidden_size=16,8"]
PACKS = [[0, 2], [1, 3]]


def sweep_module(cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normscale.sweep", *args], cwd=ROOT, env=env_for(cache),
                          capture_output=True, text=True, timeout=300)


def write_manifest(path: Path, points: list[list[str]], **record) -> Path:
    path.write_text(json.dumps({"points": points, "jobs": [], **record}))
    return path


def test_the_most_telling_code_of_skipped_points_ends_the_command(capsys):
    for skipped, code in (([(75, "a"), (2, "b")], 2), ([(75, "a"), (3, "b"), (2, "c")], 3), ([(75, "a")], 75)):
        with pytest.raises(SystemExit) as ended:
            fail_skipped(skipped)
        assert ended.value.code == code
        assert f"{len(skipped)} sweep point(s) skipped" in one_error_line(capsys.readouterr().err)


def test_a_pack_task_says_what_is_wrong_in_one_line_before_any_work(tmp_path):
    """A bad manifest, pack index or point (the manifest is frozen, the checkout may have changed since): exit 2 and
    one line, from `train-pack` and from the `progress --pack` the requeue rule calls, with nothing written."""
    points = [["name=bad", "task_kwargs.num_tasks=2"], ["name=bad", "task_kwargs.num_tasks=4", "bogus_key=1"]]
    packed = write_manifest(tmp_path / "packed.json", points, packs=[[0], [1]])
    solo = write_manifest(tmp_path / "solo.json", points)
    cases = {("train-pack", "--manifest", str(packed), "--index", "1"): "unknown key bogus_key",
             ("progress", "--manifest", str(packed), "--task", "1"): "unknown key bogus_key",
             ("train-pack", "--manifest", str(packed), "--index", "2"): "array task 2 is outside",
             ("train-pack", "--manifest", str(packed), "--pack", "2"): "pack index 2 is outside",
             ("train-pack", "--manifest", str(packed)): "one of --index TASK or --pack I",
             ("train-pack", "--manifest", str(solo), "--index", "0"): "has no packs",
             ("train-pack", "--manifest", str(tmp_path / "absent.json"), "--index", "0"): "cannot read the sweep manifest",
             ("progress", "--manifest", str(packed), "--task", "0", "seed=1"): "takes --manifest PATH --task I and no"}
    for args, message in cases.items():
        done = sweep_module(tmp_path, *args)
        assert done.returncode == 2 and message in one_error_line(done.stderr), (args, done.stderr)
    assert not (tmp_path / "experiments").exists()


def test_a_pack_task_trains_the_runs_it_can_and_ends_with_the_code_of_the_one_it_cannot(tmp_path):
    """Pack [0, 1] where point 0's run directory holds another identity: that run is refused with its line, point 1
    trains to the end, and the task ends with exit code 2 (refused) listing the point; `progress --pack` sums the
    runs' resume steps (0 + 12) and max_steps (12 + 12)."""
    points = [["name=packtask", *TINY, "training_kwargs.max_steps=12", f"task_kwargs.num_tasks={d}", "pack=2"]
              for d in (2, 4)]
    manifest = write_manifest(tmp_path / "m.json", points, packs=[[0, 1]])
    refused = sweep.resolve([*points[0], f"cache_dir={tmp_path}"])
    refused.run_dir.mkdir(parents=True)
    write_config(refused.run_dir, compose_config(*points[0], f"cache_dir={tmp_path}", "model_kwargs.hidden_size=32"),
                 points[0])
    done = sweep_module(tmp_path, "train-pack", "--manifest", str(manifest), "--index", "0")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "left out of the pack" in done.stderr and "was trained with another config" in done.stderr
    assert f"1 sweep point(s) skipped, each named above: {' '.join(points[0])} (refused)" in done.stderr
    assert "normscale: pack 0, point 1: " in done.stdout and "training 1 run(s) as one pack" in done.stdout
    assert resume_step(sweep.resolve([*points[1], f"cache_dir={tmp_path}"]).run_dir) == 12
    progress = sweep_module(tmp_path, "progress", "--manifest", str(manifest), "--task", "0")
    assert progress.stdout.startswith(f"12 24 pack(s) 0 of {manifest}"), progress.stderr


def test_status_maps_each_point_of_a_packed_manifest_to_its_packs_array_task(tmp_path, monkeypatch, capsys):
    """Packs [0, 2] and [1, 3] submitted as two arrays (chunks: pack offsets 0 and 1): points 0 and 2 show task
    71_0's state, points 1 and 3 task 72_0's, with its log."""
    monkeypatch.setenv("CACHE_DIR", str(tmp_path))
    points = sweep.grid(["name=st", *SWEEP, "pack=2"])
    manifest = write_manifest(tmp_path / "m.json", points, packs=PACKS,
                              jobs=[{"job_id": "71", "offset": 0, "array": "0"},
                                    {"job_id": "72", "offset": 1, "array": "0"}])
    monkeypatch.setattr(sweep, "slurm_states", lambda jobs: {"71_0": ("RUNNING", "0:0"), "72_0": ("FAILED", "1:0")})
    assert sweep.status([], manifest) == {"finished": [], "running": [0, 2], "failed": [1, 3], "missing": [],
                                          "conflict": []}
    lines = capsys.readouterr().out.splitlines()
    for i in (0, 2):
        assert lines[i].endswith("71_0 RUNNING"), lines[i]
    for i in (1, 3):
        assert lines[i].endswith(f"72_0 FAILED exit 1:0, log {sweep_log(manifest, '72_0')}"), lines[i]


def test_plan_lists_the_packs_and_the_array_of_one_task_per_pack_it_would_submit(cluster, tmp_path):
    args = ["plan", "--throttle", "1", "name=pl", *SWEEP, "pack=2"]
    out = sweep_cli(tmp_path, *args)
    assert "pack   0  points 0, 2\npack   1  points 1, 3\n" in out
    assert "normscale: 4 point(s) to run form 2 pack(s) of at most 2" in out
    command = next(line for line in out.splitlines() if line.startswith("normscale: would submit: sbatch "))
    assert " --array=0-1%1 " in command and ",NORMSCALE_SWEEP_PACKS=1 " in command and " --requeue " in command
    assert command.endswith(str(ROOT / "slurm/sweep.sh"))
    assert "each array task trains 1 pack(s), one process (and GPU) each" in out
    several = subprocess.run([sys.executable, "-m", "normscale.sweep", *args], cwd=ROOT, capture_output=True,
                             text=True, env=env_for(tmp_path, NORMSCALE_PROCESSES_PER_TASK="2"))
    assert several.returncode == 0, several.stderr[-2000:]
    assert " --array=0%1 " in several.stdout and "each array task trains 2 pack(s)" in several.stdout
    assert not (tmp_path / "experiments/balls_and_urns/pl/sweeps").exists()  # nothing frozen, nothing submitted


def submitted(cache: Path, name: str, timeout: float = 120) -> dict:
    """The manifest of the sweep a planning job submitted, once its array is submitted."""
    deadline = time.time() + timeout
    while not manifests(cache, name) or not json.loads(manifests(cache, name)[-1].read_text())["jobs"]:
        assert time.time() < deadline, "\n".join(p.read_text() for p in cache.glob("plan-*.out"))
        time.sleep(1)
    return json.loads(manifests(cache, name)[-1].read_text())


def collated_tables(name: str, *caches: Path) -> list[dict[str, np.ndarray]]:
    """Evaluate every checkpoint of each cache's sweep (the caches at once), collate, and read each metrics.h5's flat
    table back (plain h5py)."""
    evals = []
    for cache in caches:
        with open(cache / "eval.out", "w") as out:
            evals.append(subprocess.Popen([sys.executable, "-m", "normscale.eval", "-m", f"name={name}", *SWEEP],
                                          cwd=ROOT, env=env_for(cache), stdout=out, stderr=subprocess.STDOUT))
    tables = []
    for cache, proc in zip(caches, evals):
        assert proc.wait(timeout=600) == 0, (cache / "eval.out").read_text(errors="replace")[-3000:]
        done = run_module("normscale.collate", f"name={name}", env={"CACHE_DIR": str(cache)})
        assert done.returncode == 0, done.stderr[-3000:]
        with h5py.File(cache / "experiments/balls_and_urns" / name / "metrics.h5", "r") as f:
            tables.append({k: c.asstr()[()] if c.dtype.kind == "O" else c[()] for k, c in f["table"].items()})
    return tables


def test_a_packed_sweep_preempted_and_requeued_collates_to_the_table_of_the_same_sweep_unpacked(cluster, tmp_path):
    """`sbatch slurm/sweep.sh <sweep> pack=2` and the same sweep unpacked, on the local cluster. The packed array has
    a task per pack; while it trains, `status` maps pack 0's points to task 0; pack 0's task then gets the warning
    signal (USR1 to its batch shell), both its runs save their resume state, the task requeues itself and resumes
    them; pack 1's task runs undisturbed. Every checkpoint's weights are the solo run's, byte for byte, and the
    collated tables (every evaluated metric of every checkpoint) are equal value by value, with tolerance zero: a pack
    runs its runs' steps in turn, bit-identical to the solo runs."""
    name, packed_cache, solo_cache = "slurmpack", tmp_path / "packed", tmp_path / "solo"
    packed_cache.mkdir(), solo_cache.mkdir()  # where the planning jobs write their logs
    for cache, extra in ((packed_cache, ["pack=2"]), (solo_cache, [])):  # both planning jobs before any array task
        sbatch(cache, f"--output={cache}/plan-%j.out", "slurm/sweep.sh", f"name={name}", *SWEEP, *extra)
    record, solo = submitted(packed_cache, name), submitted(solo_cache, name)
    assert record["packs"] == PACKS and record["submitted"] == [0, 1, 2, 3] and record["jobs"][0]["array"] == "0-1"
    assert "packs" not in solo and solo["jobs"][0]["array"] == "0-3"
    job = record["jobs"][0]["job_id"]
    wait_for_training(Path(record["run_dirs"][0]) / "train_metrics.jsonl")
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"], check=True)
    status = sweep_cli(packed_cache, "status", f"name={name}", *SWEEP, "pack=2").splitlines()
    for i, pack in ((0, 0), (2, 0), (1, 1), (3, 1)):  # pack 0 stopping or requeued, pack 1 running or finished
        assert "  running   name=" in status[i] and f" {job}_{pack} " in status[i] or \
            pack == 1 and "  finished  " in status[i], status[i]
    wait_for_jobs(f"ns-{name}", timeout=600)
    logs = packed_cache / "experiments/balls_and_urns" / name / "sweeps/logs"
    preempted = (logs / f"{job}_0.out").read_text(errors="replace")
    assert "requeueing job" in preempted and f"sweep pack task 0 (job {job}_0, restart 1)" in preempted, \
        preempted[-3000:]
    assert len(resumed_steps(preempted)) == 2 and min(resumed_steps(preempted)) > 0, preempted[-3000:]  # both runs
    undisturbed = (logs / f"{job}_1.out").read_text(errors="replace")
    assert "training 2 run(s) as one pack" in undisturbed and "requeueing" not in undisturbed, undisturbed[-3000:]
    assert "4 finished, 0 running, 0 failed, 0 missing" in sweep_cli(packed_cache, "status", f"name={name}", *SWEEP,
                                                                     "pack=2")
    for solo_run, packed_run in zip(solo["run_dirs"], record["run_dirs"]):
        assert Path(solo_run).name == Path(packed_run).name and resume_step(Path(packed_run)) == STEPS
        weights = [[(step, (path / "model.safetensors").read_bytes()) for step, path in list_checkpoints(Path(run))]
                   for run in (solo_run, packed_run)]
        assert len(weights[0]) >= 3 and weights[0] == weights[1]
    unpacked, packed = collated_tables(name, solo_cache, packed_cache)
    assert len(set(unpacked["run"])) == 4 and len(set(unpacked["metric.loss"])) > 4  # four runs that differ
    assert unpacked.keys() == packed.keys()
    for column in unpacked:
        np.testing.assert_array_equal(packed[column], unpacked[column], err_msg=column)


def test_a_task_of_two_packs_trains_each_in_its_own_process_and_both_stop_on_the_warning_signal(tmp_path):
    """packs_per_task=2 (a task with 2 GPUs, or NORMSCALE_PROCESSES_PER_TASK=2): `train-pack --index 0` starts one
    process per pack; USR1 to the task's process (what slurm/common.sh forwards) reaches both, each saves its runs'
    resume states and exits 0; run again, both packs finish, and `progress --task 0` sums all four runs."""
    points = [["name=twopacks", *TINY, "training_kwargs.max_steps=400", f"task_kwargs.num_tasks={d}", "pack=2"]
              for d in (2, 4, 8, 16)]
    manifest = write_manifest(tmp_path / "m.json", points, packs=[[0, 1], [2, 3]], packs_per_task=2)
    runs = [sweep.resolve([*p, f"cache_dir={tmp_path}"]).run_dir for p in points]
    log = tmp_path / "task.out"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "normscale.sweep", "train-pack", "--manifest", str(manifest),
                                 "--index", "0"], cwd=ROOT, env=env_for(tmp_path), stdout=out, stderr=out)
    for run in (runs[0], runs[2]):  # both packs are training
        wait_for_training(run / "train_metrics.jsonl")
    deadline = time.time() + 300
    while proc.poll() is None:  # as slurm/common.sh forwards the warning signal: every 2 s until the task ends
        assert time.time() < deadline, log.read_text(errors="replace")[-3000:]
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    assert out.count("preempted; resume state saved at step") == 4 and out.count("as one pack") == 2, out[-3000:]
    assert all(0 < (resume_step(run) or 0) < 400 for run in runs)
    again = sweep_module(tmp_path, "train-pack", "--manifest", str(manifest), "--index", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(resume_step(run) == 400 for run in runs)
    progress = sweep_module(tmp_path, "progress", "--manifest", str(manifest), "--task", "0")
    assert progress.stdout.startswith(f"1600 1600 pack(s) 0, 1 of {manifest} (4 runs"), progress.stderr
