"""A run across its life: identity, one writer, overwrite that validates first, non-finite losses, Ctrl-C, damaged
resume states, exact metrics after a resume, and a chaos resume test (docs/RELIABILITY.md). Real processes, real
files, real faults (tests/faults.py)."""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_module, small_config
from faults import flip, one_error_line, run_on_small_disk, tree_bytes, truncate

from normscale.checkpoints import load_checkpoint, read_jsonl
from normscale.layout import FAILED_FILE, LOCK_FILE, list_checkpoints, resume_step
from normscale.runlock import RunLock

TINY = ["setting=balls_and_urns", "name=t", "task_kwargs.num_dims=4", "task_kwargs.context_length=12",
        "task_kwargs.num_ood_tasks=20", "training_kwargs.batch_size=8", "data_kwargs.eval_size=64",
        "data_kwargs.shard_mb=0.003", "eval_kwargs.batch_size=16", "eval_kwargs.num_eval_batches=4",
        "logging.wandb=false", "model_kwargs.hidden_size=16", "training_kwargs.warmup_steps=5"]


def start(cache: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "CACHE_DIR": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "normscale.train", *TINY, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train(cache: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = run_module("normscale.train", *TINY, *args, env={"CACHE_DIR": str(cache)})
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def the_run(cache: Path, name: str = "t") -> Path:
    runs = list((cache / "experiments/balls_and_urns" / name / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def wait_for(predicate, timeout: float = 120, every: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError("timed out waiting")


def preempted(cache: Path, *args: str) -> None:
    """Start a run, let it save its first resume state, then preempt it (SIGTERM: saved, exit 0)."""
    proc = start(cache, *args)
    wait_for(lambda: list(cache.glob("experiments/*/t/runs/*/resume/state.json")))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0


def holds_lock(cache: Path, proc: subprocess.Popen) -> bool:
    """Whether `proc` holds its run's lock (so its signal handlers are installed: train() installs them first)."""
    lock = next(cache.glob(f"experiments/*/*/runs/*/{LOCK_FILE}"), None)
    return lock is not None and f'"pid": {proc.pid},' in lock.read_text()


def records(run_dir: Path, name: str) -> list[dict]:
    """Metrics records without their wall-clock field."""
    return [{k: v for k, v in r.items() if k != "seconds_per_step"} for r in read_jsonl(run_dir / name)]


def all_checkpoints(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {step: load_checkpoint(path)[0] for step, path in list_checkpoints(run_dir)}


def assert_same_checkpoints(a: Path, b: Path) -> None:
    ca, cb = all_checkpoints(a), all_checkpoints(b)
    assert ca.keys() == cb.keys()
    for step in ca:
        for k in ca[step]:
            assert torch.equal(ca[step][k], cb[step][k]), (step, k)


# --- identity -----------------------------------------------------------------------------------------------------

def test_a_changed_preset_under_one_name_is_refused_before_any_work_naming_the_keys(tmp_path):
    """experiment=demo then experiment=default under one name= give one run directory (presets do not name runs):
    the second is refused (exit 2, one line naming the differing keys and both ways out); the run and the data are
    untouched, also when the first was killed mid-run."""
    cache = tmp_path / "cache"
    args = ["name=collide", "training_kwargs.max_steps=400", "training_kwargs.log_every=10"]
    first = start(cache, "experiment=demo", *args)
    wait_for(lambda: list(cache.glob("experiments/*/collide/runs/*/resume/state.json")))
    first.kill()
    first.wait()
    run_dir = the_run(cache, "collide")
    before = tree_bytes(cache)
    result = train(cache, "experiment=default", *args, expect=2)
    line = one_error_line(result.stderr)
    assert "task_kwargs.num_tasks: 16 -> 64" in line and "name=" in line and "overwrite=true" in line, line
    assert tree_bytes(cache) == {k: v for k, v in before.items() if not k.endswith(LOCK_FILE)}
    assert not (run_dir / LOCK_FILE).exists()


def test_raising_max_steps_continues_a_constant_schedule_and_is_refused_for_a_decaying_one(tmp_path):
    """A preset's max_steps raised after the run finished (same run directory): continued where the learning rate
    does not depend on max_steps, bit-identical to a run trained that long at once; refused otherwise."""
    from normscale.train import train as train_in_process

    def config(cache, steps, *extra):
        return small_config(cache, "balls_and_urns", f"training_kwargs.max_steps={steps}",
                            "training_kwargs.warmup_steps=5", "logging.wandb=false", *extra)

    extended, direct = tmp_path / "extended", tmp_path / "direct"
    train_in_process(config(extended, 30), [])
    run_dir = train_in_process(config(extended, 50), [])
    train_in_process(config(direct, 50), [])
    final = load_checkpoint(run_dir / "checkpoint-50")[0]
    reference = load_checkpoint(the_run(direct, "test") / "checkpoint-50")[0]
    assert all(torch.equal(final[k], reference[k]) for k in final)
    assert read_jsonl(run_dir / "eval_metrics.jsonl")[-1] == read_jsonl(the_run(direct, "test") / "eval_metrics.jsonl")[-1]
    from normscale.layout import identity_hash, read_config
    early = load_checkpoint(run_dir / "checkpoint-20")[1]  # written before max_steps grew: still the run's own
    assert early["identity_hash"] == identity_hash(read_config(run_dir))

    cosine = tmp_path / "cosine"
    train_in_process(config(cosine, 30, "training_kwargs.lr_schedule=cosine"), [])
    from normscale.config import ConfigError
    with pytest.raises(ConfigError, match="cosine learning-rate schedule depends on max_steps"):
        train_in_process(config(cosine, 50, "training_kwargs.lr_schedule=cosine"), [])


# --- one writer -------------------------------------------------------------------------------------------------

def test_a_second_live_process_on_a_run_exits_75_naming_the_holder(tmp_path):
    cache = tmp_path / "cache"
    holder = start(cache, "training_kwargs.max_steps=2000")
    wait_for(lambda: list(cache.glob(f"experiments/*/t/runs/*/{LOCK_FILE}")))
    second = train(cache, "training_kwargs.max_steps=2000", expect=75)
    line = one_error_line(second.stderr)
    assert f"host {socket.gethostname()} pid {holder.pid}" in line and "since" in line, line
    holder.send_signal(signal.SIGTERM)  # preempted: saves and exits 0
    assert holder.wait() == 0, holder.stderr.read()[-2000:]


def test_two_simultaneous_launches_of_one_run_train_it_once(tmp_path):
    cache = tmp_path / "cache"
    procs = [start(cache, "training_kwargs.max_steps=300", "training_kwargs.log_every=10") for _ in range(2)]
    codes = sorted(p.wait() for p in procs)
    assert codes == [0, 75], [p.stderr.read()[-2000:] for p in procs]
    steps = [r["step"] for r in read_jsonl(the_run(cache) / "train_metrics.jsonl")]
    assert steps == list(range(10, 301, 10))  # no duplicated or out-of-order record


def test_a_killed_holders_lock_is_taken_over_with_one_line(tmp_path):
    cache = tmp_path / "cache"
    holder = start(cache, "training_kwargs.max_steps=120", "training_kwargs.log_every=10")
    wait_for(lambda: list(cache.glob(f"experiments/*/t/runs/*/{LOCK_FILE}")))
    holder.kill()
    holder.wait()
    result = train(cache, "training_kwargs.max_steps=120", "training_kwargs.log_every=10")
    assert f"took over the lock of run {the_run(cache)} from host {socket.gethostname()} pid {holder.pid}" in result.stdout
    assert "its process is gone" in result.stdout
    steps = [r["step"] for r in read_jsonl(the_run(cache) / "train_metrics.jsonl")]
    assert steps == list(range(10, 121, 10))


@pytest.mark.parametrize("heartbeat_age, expect", [(30, 75), (3600, 0)])
def test_a_holder_on_another_node_counts_as_alive_until_its_heartbeat_is_stale(tmp_path, heartbeat_age, expect):
    """A lock record written by a process on another host (no pid to check there, no SLURM job): alive while its
    heartbeat is fresh, taken over once it is older than the stale limit."""
    cache = tmp_path / "cache"
    train(cache, "training_kwargs.max_steps=20")
    run_dir = the_run(cache)
    now = time.time()
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": "another-node", "pid": 4242, "job": None, "since": now - 7200,
                                                 "heartbeat": now - heartbeat_age, "token": "theirs"}))
    result = train(cache, "training_kwargs.max_steps=20", expect=expect)
    if expect == 75:
        assert "host another-node pid 4242" in one_error_line(result.stderr)
    else:
        assert "took over the lock" in result.stdout and re.search(r"heartbeat is 360\d s old", result.stdout)
        assert not (run_dir / LOCK_FILE).exists()  # released at the end


def test_a_locked_point_of_a_sweep_is_skipped_and_the_sweep_ends_with_75(tmp_path):
    """Two copies of one sweep share its points: a point held by another process is skipped with its line, the
    others are trained, and the command ends with 75 listing the skipped point."""
    cache = tmp_path / "cache"
    holder = start(cache, "training_kwargs.max_steps=20000")
    wait_for(lambda: list(cache.glob(f"experiments/*/t/runs/*/{LOCK_FILE}")))
    sweep = run_module("normscale.train", "-m", *TINY, "training_kwargs.max_steps=20000,20",
                       env={"CACHE_DIR": str(cache)})
    holder.send_signal(signal.SIGTERM)
    assert holder.wait() == 0
    assert sweep.returncode == 75, sweep.stderr[-2000:]
    assert "normscale: skipped: run" in sweep.stderr and f"pid {holder.pid}" in sweep.stderr
    assert "training_kwargs.max_steps=20000" in one_error_line(sweep.stderr)
    steps = sorted(json.loads((p / "resume/state.json").read_text())["step"]
                   for p in (cache / "experiments/balls_and_urns/t/runs").iterdir())
    assert len(steps) == 2 and steps[1] == 20 and steps[0] < 20000  # the free point was trained, the held one not


# --- overwrite, failure, interrupt ----------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["held", "budget"])
def test_a_failing_overwrite_loses_nothing(tmp_path, fault):
    """overwrite=true validates config, data plan and lock before it replaces anything: refused, the finished run's
    files are byte-identical afterwards."""
    cache = tmp_path / "cache"
    train(cache, "training_kwargs.max_steps=30")
    run_dir = the_run(cache)
    before = tree_bytes(run_dir)
    if fault == "held":
        lock = RunLock(run_dir)  # this very test process, alive, holds the run
        lock.acquire()
        result = train(cache, "training_kwargs.max_steps=30", "overwrite=true", expect=75)
        assert f"pid {os.getpid()}" in result.stderr
        lock.release()
    else:
        result = train(cache, "training_kwargs.max_steps=30", "overwrite=true", "data_kwargs.max_storage_gb=1e-9",
                       expect=2)
    one_error_line(result.stderr)
    assert tree_bytes(run_dir) == before


def test_overwrite_verifies_the_data_before_replacing_the_run(tmp_path):
    """With a damaged shard, overwrite=true first restores the shard (data command's repair), then replaces the run."""
    cache = tmp_path / "cache"
    train(cache, "training_kwargs.max_steps=30")
    shard = sorted(cache.glob("experiments/*/t/data/*/train/shard-*.h5"))[1]
    original = shard.read_bytes()
    flip(shard)
    train(cache, "training_kwargs.max_steps=30", "overwrite=true")
    assert shard.read_bytes() == original
    assert [s for s, _ in list_checkpoints(the_run(cache))][-1] == 30


def test_a_non_finite_loss_fails_the_run_with_exit_3_and_it_is_not_trained_again(tmp_path):
    cache = tmp_path / "cache"
    result = train(cache, "training_kwargs.max_steps=50", "training_kwargs.log_every=10",
                   "training_kwargs.learning_rate=1e30", "training_kwargs.warmup_steps=0", expect=3)
    line = one_error_line(result.stderr)
    assert "not finite" in line and FAILED_FILE in line and "overwrite=true" in line
    run_dir = the_run(cache)
    failure = json.loads((run_dir / FAILED_FILE).read_text())
    assert failure["step"] == 10 and failure["last_finite_step"] == 0
    assert [s for s, _ in list_checkpoints(run_dir)] == [0]  # nothing non-finite was saved
    assert all(torch.isfinite(t).all() for t in load_checkpoint(run_dir / "checkpoint-0")[0].values())
    again = train(cache, "training_kwargs.max_steps=50", "training_kwargs.log_every=10",
                  "training_kwargs.learning_rate=1e30", "training_kwargs.warmup_steps=0", expect=2)
    assert "failed at step 10" in one_error_line(again.stderr)


def test_ctrl_c_saves_the_resume_state_and_exits_130(tmp_path):
    cache = tmp_path / "cache"
    proc = start(cache, "training_kwargs.max_steps=5000", "training_kwargs.log_every=10")
    wait_for(lambda: list(cache.glob("experiments/*/t/runs/*/checkpoint-20")))
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted (Ctrl-C) at step" in one_error_line(stderr)
    step = json.loads((the_run(cache) / "resume/state.json").read_text())["step"]
    assert step >= 20 and not (the_run(cache) / LOCK_FILE).exists()


# --- resume ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: logging every 7 steps, evaluation every 13, checkpoints on a sqrt schedule."""
    cache = tmp_path_factory.mktemp("reference")
    train(cache, *CHAOS)
    return the_run(cache)


CHAOS = ["training_kwargs.max_steps=400", "training_kwargs.log_every=7", "training_kwargs.eval_every=13",
         "training_kwargs.save_steps.num_checkpoints=8"]


def test_a_run_resumed_between_logging_steps_writes_the_same_metrics(tmp_path, reference):
    """Stopped at a step that is not a logging step (SIGTERM), resumed: every record equals the uninterrupted run's."""
    cache = tmp_path / "cache"
    stops = []
    while not any(step % 7 for step in stops):  # until one stop lands between logging steps (6 in 7 do)
        assert len(stops) < 5, stops
        proc = start(cache, *CHAOS)
        last = stops[-1] if stops else 0  # this process's own progress: its lock, then a record past the last stop
        wait_for(lambda: holds_lock(cache, proc) and
                 (read_jsonl(the_run(cache) / "train_metrics.jsonl") or [{"step": 0}])[-1]["step"] > last)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
        stops.append(json.loads((the_run(cache) / "resume/state.json").read_text())["step"])
    assert stops[-1] < 400, stops
    train(cache, *CHAOS)
    run_dir = the_run(cache)
    assert records(run_dir, "train_metrics.jsonl") == records(reference, "train_metrics.jsonl")
    assert records(run_dir, "eval_metrics.jsonl") == records(reference, "eval_metrics.jsonl")


@pytest.mark.parametrize("damage", ["flip", "truncate", "record"])
def test_a_damaged_resume_state_falls_back_to_the_previous_intact_one(tmp_path, reference, damage):
    cache = tmp_path / "cache"
    proc = start(cache, *CHAOS)
    wait_for(lambda: len(list(cache.glob("experiments/*/t/runs/*/.resume-*/state.json"))) >= 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0
    run_dir = the_run(cache)
    newest = (run_dir / "resume").resolve()
    target = newest / "state.json" if damage == "record" else newest / "model.safetensors"
    {"flip": flip, "truncate": truncate, "record": truncate}[damage](target)
    result = train(cache, *CHAOS)
    assert f"resume state {newest.name} is damaged" in result.stdout
    assert_same_checkpoints(run_dir, reference)
    assert records(run_dir, "train_metrics.jsonl") == records(reference, "train_metrics.jsonl")


def test_chaos_sigkill_at_random_moments_and_inside_writes_ends_bit_identical(tmp_path, reference):
    """One run killed with SIGKILL 12 times, half at random moments after it took its lock (start-up, resume,
    training), half the instant it starts writing a checkpoint or a resume state (a temporary name of
    this process, or a new unfinished resume state, appears), resumed each time: its checkpoints are bit-identical to the uninterrupted run's and its
    metrics records identical (wall-clock aside), none duplicated."""
    cache = tmp_path / "cache"
    runs = cache / "experiments/balls_and_urns/t/runs"
    rng = random.Random(0)
    kills, in_write = 0, 0

    def holds_lock(proc) -> bool:
        lock = next(runs.glob(f"*/{LOCK_FILE}"), None) if runs.exists() else None
        return lock is not None and f'"pid": {proc.pid},' in lock.read_text()

    def writing(proc, present: set) -> bool:
        for entry in os.scandir(next(runs.iterdir())):
            mine = entry.name.startswith((".checkpoint-", ".resume")) and entry.name.endswith(f".tmp-{proc.pid}")
            new_staging = entry.name.startswith(".resume-") and entry.name not in present and not os.path.exists(
                os.path.join(entry.path, "state.json"))
            if mine or new_staging:
                return True
        return False

    while kills < 12:
        if runs.exists():
            assert (resume_step(next(runs.iterdir())) or 0) < 400, "finished before 12 kills: make the run longer"
        proc = start(cache, *CHAOS)
        wait_for(lambda: proc.poll() is not None or holds_lock(proc), every=0.005)
        inside_write = kills % 2 == 1
        if inside_write:
            present = {e.name for e in os.scandir(next(runs.iterdir()))}
            while proc.poll() is None and not writing(proc, present):
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0, 1.5))
        if proc.poll() is None:
            proc.kill()
            kills += 1
            in_write += inside_write
        proc.wait()
    assert in_write >= 5, (kills, in_write)
    train(cache, *CHAOS)
    run_dir = the_run(cache)
    assert_same_checkpoints(run_dir, reference)
    for name in ("train_metrics.jsonl", "eval_metrics.jsonl"):
        assert records(run_dir, name) == records(reference, name)
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]  # no temporary file outlives its writer


def test_a_full_disk_stops_training_with_one_line_and_keeps_what_was_finished(tmp_path):
    """CACHE_DIR on a 1 MiB tmpfs (its own mount namespace): the data fit, the checkpoints do not. Training stops with
    exit 1 and one line naming the path and what was kept; every checkpoint left loads and verifies, and the resume
    state chosen from what is left is intact (copied out of the namespace before it vanishes)."""
    small, kept = tmp_path / "small", tmp_path / "kept"
    command = " ".join(["python", "-m", "normscale.train", *TINY, "training_kwargs.max_steps=400"])
    script = (f"CACHE_DIR={small} {command} 2> {tmp_path}/stderr; echo $? > {tmp_path}/rc; "
              f"cp -a {small} {kept}")
    result = run_on_small_disk(small, "1m", ["sh", "-c", script], env={"PATH": f"{Path(sys.executable).parent}:"
                                                                       f"{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", stderr[-3000:]
    line = one_error_line(stderr)
    assert "no space left on the device writing" in line and str(small) in line and "are kept" in line, line
    run_dir = the_run(kept)
    steps = [s for s, _ in list_checkpoints(run_dir)]
    assert steps and steps[-1] < 400
    all_checkpoints(run_dir)  # every finished checkpoint verifies against its recorded hash
    from normscale.checkpoints import choose_resume
    state, record, notes = choose_resume(run_dir)
    assert state is not None and record["step"] <= steps[-1], notes


def test_a_resume_under_another_world_size_is_refused(tmp_path):
    """Saved by one process, resumed by two (launch/cpu.sh): refused with one line, exit 2, the state untouched."""
    cache = tmp_path / "cache"
    preempted(cache, "training_kwargs.max_steps=400")
    before = tree_bytes(the_run(cache))
    result = subprocess.run(["bash", "launch/cpu.sh", "2", "-m", "normscale.train", *TINY, "training_kwargs.max_steps=400"],
                            cwd=ROOT, env={**os.environ, "CACHE_DIR": str(cache), "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "was saved by 1 process(es)" in one_error_line(result.stderr)
    assert tree_bytes(the_run(cache)) == before


def test_a_two_process_run_holds_one_lock_and_refuses_a_second_launch(tmp_path):
    """launch/cpu.sh 2: rank 0 holds the run's one lock (recorded with its own pid); another launch of the run exits
    75 naming it."""
    cache = tmp_path / "cache"
    launcher = subprocess.Popen(["bash", "launch/cpu.sh", "2", "-m", "normscale.train", *TINY,
                                 "training_kwargs.max_steps=20000"], cwd=ROOT, start_new_session=True,
                                env={**os.environ, "CACHE_DIR": str(cache), "PYTHON": sys.executable},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list(cache.glob(f"experiments/*/t/runs/*/{LOCK_FILE}")))
        run_dir = the_run(cache)
        holder = json.loads((run_dir / LOCK_FILE).read_text())["pid"]
        assert holder != launcher.pid and Path(f"/proc/{holder}").exists()  # a worker (rank 0), not the launcher
        result = train(cache, "training_kwargs.max_steps=20000", expect=75)
        assert f"pid {holder}" in one_error_line(result.stderr)
        assert [p.name for p in run_dir.iterdir() if "lock" in p.name] == [LOCK_FILE]
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def test_a_run_resumed_under_other_code_says_so(tmp_path):
    cache = tmp_path / "cache"
    preempted(cache, "training_kwargs.max_steps=400")
    record_path = (the_run(cache) / "resume").resolve() / "state.json"
    record = json.loads(record_path.read_text())
    assert record["provenance"]["libraries"]["torch"] == torch.__version__
    record["provenance"]["code_version"] = "git:0000000"
    record_path.write_text(json.dumps(record))  # the record is not among the hashed files
    result = train(cache, "training_kwargs.max_steps=400")
    assert "the code changed since this run was saved (git:0000000 -> " in result.stdout


def test_six_processes_taking_over_one_dead_lock_leave_exactly_one_holder(tmp_path):
    """A dead holder's record (stale heartbeat, another node) and six processes racing to take it over at once:
    exactly one holds the run, the five others exit 75 naming it, whatever the interleaving (repeated 5 times)."""
    code = ("import sys, time; from normscale.runlock import RunLock; from normscale.config import RunHeldError\n"
            "lock = RunLock(sys.argv[1]); time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "try:\n    note = lock.acquire()\nexcept RunHeldError as error:\n    print('held', error); sys.exit(75)\n"
            "print('won', note); time.sleep(1.5); lock.release()\n")
    for attempt in range(5):
        run_dir = tmp_path / f"run{attempt}"
        run_dir.mkdir()
        (run_dir / LOCK_FILE).write_text(json.dumps({"host": "another-node", "pid": 1, "since": 0.0,
                                                     "heartbeat": 0.0, "token": "dead"}))
        go = time.time() + 2.0
        procs = [subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(go)], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
        results = [p.communicate(timeout=60) for p in procs]
        outs = [out + err for out, err in results]
        winners = [o for o in outs if o.startswith("won")]
        assert len(winners) == 1, outs  # usually the taker; or one whose create came between removal and re-create
        assert sorted(p.returncode for p in procs) == [0] + [75] * 5, outs
        assert not (run_dir / LOCK_FILE).exists() and not list(run_dir.glob(".lock.json*"))


@pytest.mark.parametrize("content", ["{}", "[]", "\xff\xfe not json"])
def test_a_damaged_lock_record_counts_as_a_dead_holder(tmp_path, content):
    cache = tmp_path / "cache"
    train(cache, "training_kwargs.max_steps=20")
    (the_run(cache) / LOCK_FILE).write_bytes(content.encode("latin-1"))
    result = train(cache, "training_kwargs.max_steps=20")
    assert "took over the lock" in result.stdout and "heartbeat is" in result.stdout


def test_a_diverging_point_of_a_sweep_does_not_stop_the_others(tmp_path):
    """-m over two learning rates, one diverging: the other point is still trained and the sweep ends with 3 listing
    the failed point; run again, the failed point is refused (skipped, exit 2) and the finished one is complete."""
    cache = tmp_path / "cache"
    args = ["-m", *TINY, "training_kwargs.max_steps=20", "training_kwargs.log_every=10",
            "training_kwargs.warmup_steps=0", "training_kwargs.learning_rate=1e30,1e-3"]
    first = run_module("normscale.train", *args, env={"CACHE_DIR": str(cache)})
    assert first.returncode == 3, first.stderr[-2000:]
    line = one_error_line(first.stderr)
    assert "1 sweep point(s) skipped" in line and "learning_rate=1e+30 (failed)" in line, line
    runs = {p.name: p for p in (cache / "experiments/balls_and_urns/t/runs").iterdir()}
    assert len(runs) == 2
    trained = next(p for p in runs.values() if not (p / FAILED_FILE).exists())
    assert (trained / "checkpoint-20").exists()
    again = run_module("normscale.train", *args, env={"CACHE_DIR": str(cache)})
    assert again.returncode == 2, again.stderr[-2000:]
    assert "(refused)" in one_error_line(again.stderr) and "is complete" in again.stdout


def test_checkpoints_without_their_config_are_refused(tmp_path):
    cache = tmp_path / "cache"
    train(cache, "training_kwargs.max_steps=20")
    (the_run(cache) / "config_resolved.yaml").unlink()
    result = train(cache, "training_kwargs.max_steps=20", expect=2)
    assert "but no config_resolved.yaml" in one_error_line(result.stderr)


def test_damaged_metrics_lines_and_failure_records_get_one_line(tmp_path):
    """A flipped byte in train_metrics.jsonl: the resume drops that line with a note and goes on. A truncated
    failed.json still marks the run as failed."""
    cache = tmp_path / "cache"
    proc = start(cache, "training_kwargs.max_steps=400", "training_kwargs.log_every=10")
    wait_for(lambda: list(cache.glob("experiments/*/t/runs/*/resume/state.json")))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0
    run_dir = the_run(cache)
    metrics = run_dir / "train_metrics.jsonl"
    data = bytearray(metrics.read_bytes())
    data[5] = 0xFF  # not UTF-8: the first record no longer decodes
    metrics.write_bytes(bytes(data))
    result = train(cache, "training_kwargs.max_steps=400", "training_kwargs.log_every=10")
    assert "had 1 damaged line(s); dropped" in result.stdout
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(20, 401, 10))
    (run_dir / FAILED_FILE).write_text('{"step": 4')
    refused = train(cache, "training_kwargs.max_steps=400", "training_kwargs.log_every=10", expect=2)
    assert "failed.json is damaged" in one_error_line(refused.stderr)
