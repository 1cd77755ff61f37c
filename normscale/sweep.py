"""Sweeps as SLURM job arrays, planned without importing torch (instant on a login node).

    python -m normscale.sweep plan   [--submit] [--throttle N] <overrides>   list the points; with --submit freeze them
                                                                            to a manifest and sbatch the array(s)
    python -m normscale.sweep status [--manifest PATH] <overrides>         finished / running / failed / missing /
                                                                            conflicting points
    python -m normscale.sweep point  --manifest PATH --index I             one point's overrides, one per line
    python -m normscale.sweep progress <overrides>                         one run's resume step, max_steps, directory
    python -m normscale.sweep progress --manifest PATH --task I            the same, summed over an array task's packs
    python -m normscale.sweep train-pack --manifest PATH --index I         train array task I's packs (--pack K: one)

The grid is the experiment preset's `hydra.sweeper.params` crossed with the command line's `-m`-style overrides
(comma lists; the command line wins for a key in both), exactly the points `python -m normscale.train -m` runs, with
the same run directories (no `-m` here: these commands always sweep). `plan` prints the sweep's cost (run-steps,
sequences, packs) and the sbatch command(s) it would submit; `plan --submit` skips finished points (resume state at
max_steps), failed ones (failed.json: a non-finite loss, shown with its reason) and conflicting ones (a run
directory trained with another identity, shown with the keys that differ), writes
<experiment>/sweeps/<stamp>-<hash>.json (points, submitted indices, job ids, resources), and submits slurm/sweep.sh
as one array per chunk of at most MaxArraySize indices (`scontrol show config`), throttled with `%N`. Array task i
of a chunk runs point offset + i of the manifest: a requeued or resubmitted task maps to the same point even if the
preset changed since. Site settings (partition, account, time, GPUs and CPUs per task) come from slurm/site.env (the
one place to edit them; the environment wins).

With pack=N > 1 the manifest also records the packs the unfinished points form (normscale.pack.forming: lists of
point indices), and each array task trains G packs, one process each (G = NORMSCALE_PROCESSES_PER_TASK, else the
task's GPUs, one per process, else 1): array task i of a chunk trains packs (offset + i) G .. (offset + i) G + G - 1
(`train-pack`, which slurm/sweep.sh runs; `progress --task` is what its requeue rule compares).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from normscale.cli import (check_overrides, compose, fail, fail_on, fail_skipped, grid, load_env, most_telling,
                           to_config)
from normscale.config import Config, ConfigError, NormscaleError
from normscale.fileio import write_json
from normscale.pack.forming import form_packs, shape_key, why_apart
from normscale.layout import (CONFIG_FILE, FAILED_FILE, experiment_dir, identity_diff, latest_sweep_manifest,
                              max_steps_change, read_config, read_failure, resume_step, run_directory, sweep_log,
                              sweep_logs_dir, sweep_manifest)

ROOT = Path(__file__).resolve().parents[1]
SWEEP_SCRIPT = ROOT / "slurm" / "sweep.sh"
DEFAULT_MAX_ARRAY_SIZE = 1001
SKIPPED = ("finished", "failed", "conflict")  # states `plan --submit` does not submit
FIX = "overwrite=true trains such a point again, or choose another name= for this sweep"


@dataclass(frozen=True)
class Point:
    overrides: list[str]
    run_dir: Path
    max_steps: int
    config: Config | None = None  # the point's own config (its identity is compared with the run directory's)

    def step(self) -> int | None:
        """The step of the run's resume state (None: there is none)."""
        return resume_step(self.run_dir)

    def failure(self) -> str | None:
        """Why the run failed (failed.json: a non-finite loss), or None."""
        try:
            failure = read_failure(self.run_dir)
        except (OSError, ValueError):
            return f"{FAILED_FILE} is unreadable"
        return None if failure is None else f"at step {failure.get('step')}: {failure.get('reason')}"

    def conflict(self) -> list[str]:
        """How the run directory's saved config differs from this point's in identity (`key: saved -> wanted`; a
        max_steps the learning-rate schedule cannot follow, as normscale.train decides); [] when it does not, or
        when nothing is saved yet."""
        if self.config is None or not (self.run_dir / CONFIG_FILE).exists():
            return []
        try:
            saved = read_config(self.run_dir)
        except NormscaleError as error:  # unreadable or no longer a valid config: shown as the conflict it is
            return [f"{CONFIG_FILE} cannot be read back ({' '.join(str(error).split())[:200]})"]
        differ = identity_diff(saved, self.config, ignore=("training_kwargs.max_steps",))
        if differ:
            return differ
        reason = max_steps_change(saved, self.config, self.step() or 0)
        return [reason] if reason else []

    def state(self) -> str:
        """failed (recorded in failed.json) | conflict (the run directory holds another identity) | replace (either,
        with overwrite=true: the point trains again from scratch) | finished | started (a resume state short of
        max_steps) | missing."""
        overwrite = self.config is not None and self.config.overwrite
        if self.failure():
            return "replace" if overwrite else "failed"
        if self.conflict():
            return "replace" if overwrite else "conflict"
        step = self.step()
        return "missing" if step is None else "finished" if step >= self.max_steps else "started"

    def detail(self, state: str) -> str:
        """What a failed or conflicting point's line says about it."""
        if state == "failed":
            return f"failed {self.failure()}"
        if state == "conflict":
            return f"{self.run_dir.name} was trained with another config: {'; '.join(self.conflict())}"
        if state == "replace":
            failure = self.failure()
            return "overwrite=true trains it again: " + (f"failed {failure}" if failure else "; ".join(self.conflict()))
        return ""


def resolve(point: list[str]) -> Point:
    config: Config = to_config(compose(point))
    return Point(point, run_directory(config, point), config.training_kwargs.max_steps, config)


def array_spec(indices: list[int]) -> str:
    """Compressed sbatch --array spec: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    parts = []
    for _, run in itertools.groupby(enumerate(indices), key=lambda pair: pair[1] - pair[0]):
        run = [i for _, i in run]
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def chunks(indices: list[int], max_array_size: int) -> list[tuple[int, list[int]]]:
    """(offset, task ids relative to it) per array: task ids stay below MaxArraySize."""
    out = []
    for index in indices:
        if not out or index - out[-1][0] >= max_array_size:
            out.append((index, []))
        out[-1][1].append(index - out[-1][0])
    return out


def max_array_size() -> int:
    if shutil.which("scontrol") is None:  # planning without SLURM: what a default SLURM allows
        return DEFAULT_MAX_ARRAY_SIZE
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", shown, re.MULTILINE)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


def resources() -> dict[str, str]:
    """Per-array-task resources: slurm/site.env, loaded by normscale.cli.load_env (the environment wins)."""
    return {"partition": os.environ.get("NORMSCALE_PARTITION", ""), "account": os.environ.get("NORMSCALE_ACCOUNT", ""),
            "time": os.environ.get("NORMSCALE_TIME_MIN", ""),
            "cpus_per_task": os.environ.get("NORMSCALE_CPUS_PER_TASK", "2"),
            "gpus_per_task": os.environ.get("NORMSCALE_GPUS_PER_TASK", "0"),
            "mem": os.environ.get("NORMSCALE_MEM", ""),
            "signal_seconds": os.environ.get("NORMSCALE_SIGNAL_SECONDS", "120"),
            "throttle": os.environ.get("NORMSCALE_ARRAY_THROTTLE", "0")}


def sbatch_command(manifest: Path, offset: int, task_ids: list[int], name: str, res: dict,
                   throttle: int, packs: bool = False) -> list[str]:
    """The sbatch command of one array: task i runs point offset + i of the manifest (with `packs`: pack offset + i,
    told to slurm/sweep.sh by NORMSCALE_SWEEP_PACKS=1)."""
    spec = array_spec(task_ids) + (f"%{throttle}" if throttle > 0 else "")
    log = sweep_log(manifest, "%A_%a")  # sbatch's pattern; slurm/sweep.sh names the log from NORMSCALE_SWEEP_LOG
    command = ["sbatch", "--parsable", f"--array={spec}", f"--job-name=ns-{name}",
               f"--output={log}", "--open-mode=append", "--requeue",
               f"--signal=B:USR1@{res['signal_seconds']}", f"--cpus-per-task={res['cpus_per_task']}",
               f"--export=ALL,NORMSCALE_ROOT={ROOT},NORMSCALE_SWEEP_MANIFEST={manifest},NORMSCALE_SWEEP_OFFSET={offset},"
               f"NORMSCALE_SWEEP_LOG={log}" + (",NORMSCALE_SWEEP_PACKS=1" if packs else "")]
    for key in ("partition", "account", "time"):
        if res[key]:
            command.append(f"--{key}={res[key]}")
    if int(res["gpus_per_task"]):
        command.append(f"--gpus-per-task={res['gpus_per_task']}")
    if res["mem"]:
        command.append(f"--mem={res['mem']}")
    return [*command, str(SWEEP_SCRIPT)]


def plan(overrides: list[str], submit: bool, throttle: int | None) -> Path | None:
    """List the points; print the sbatch command(s) for the unfinished ones, or (submit) freeze the manifest and
    submit them. Failed and conflicting points are listed with the reason and never submitted."""
    points = [resolve(p) for p in grid(overrides)]
    states = [p.state() for p in points]
    todo = [i for i, s in enumerate(states) if s not in SKIPPED]
    for i, (point, state) in enumerate(zip(points, states)):
        detail = point.detail(state)
        print(f"{i:4d}  {state:8s}  {' '.join(point.overrides)}" + (f"  ({detail})" if detail else ""))
    count = {s: states.count(s) for s in SKIPPED}
    print(f"normscale: {len(points)} point(s), {count['finished']} finished, {len(todo)} to run" +
          "".join(f", {count[s]} {s}" for s in ("failed", "conflict") if count[s]))
    if count["failed"] or count["conflict"]:
        print(f"normscale: {count['failed'] + count['conflict']} failed or conflicting point(s) are not submitted; "
              f"{FIX}")
    if not todo:
        print(cost_line(points, states, 0))
        return None
    res = resources()
    size = array_pack_size(points[0].config.pack, res)
    packs = show_packs([points[i] for i in todo], todo, size) if size > 1 else None
    print(cost_line(points, states, len(packs) if packs else len(todo)))
    per_task = processes_per_task(res) if packs else 1
    throttle = int(res["throttle"]) if throttle is None else throttle
    experiment = experiment_dir(points[0].config)
    record = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "overrides": overrides,
              "points": [p.overrides for p in points], "run_dirs": [str(p.run_dir) for p in points],
              "submitted": todo, **({"packs": packs, "packs_per_task": per_task} if packs else {}),
              "resources": res, "throttle": throttle,
              "jobs": []}
    digest = hashlib.sha256(json.dumps(record["points"]).encode()).hexdigest()[:8]
    manifest = sweep_manifest(experiment, time.strftime('%Y%m%d-%H%M%S'), digest)
    tasks = list(range(-(-len(packs) // per_task))) if packs else todo  # array task -> its packs, or -> point
    arrays = [(offset, ids, sbatch_command(manifest, offset, ids, experiment.name, res, throttle, bool(packs)))
              for offset, ids in chunks(tasks, max_array_size())]
    if not submit:
        for _, _, command in arrays:
            print(f"normscale: would submit: {shlex.join(command)}")
        print("normscale: `plan --submit` (or sbatch slurm/sweep.sh with the same overrides) writes that manifest "
              "and submits" + (f"; each array task trains {per_task} pack(s), one process (and GPU) each "
                               "(`python -m normscale.train -m <the same overrides>` trains them all here)"
                               if packs else ""))
        return None
    sweep_logs_dir(manifest).mkdir(parents=True, exist_ok=True)
    write_json(manifest, record)  # frozen before any task can start
    for offset, task_ids, command in arrays:
        job_id = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
        record["jobs"].append({"job_id": job_id, "offset": offset, "array": array_spec(task_ids)})
        print(f"normscale: submitted array job {job_id} (--array={array_spec(task_ids)}, offset {offset}"
              f"{f', {per_task} pack(s) per task' if packs else ''}); logs {sweep_log(manifest, f'{job_id}_<task>')}")
    write_json(manifest, record)
    print(f"normscale: manifest {manifest}")
    return manifest


def cost_line(points: list[Point], states: list[str], packs: int) -> str:
    """The sweep's size: run-steps (max_steps summed over the points) and sequences (times each point's batch size),
    the run-steps still to train (a started point's resume step deducted) and the packs they form."""
    total = sum(p.max_steps for p in points)
    sequences = sum(p.max_steps * p.config.training_kwargs.batch_size for p in points)
    left = sum(p.max_steps - ((p.step() or 0) if s == "started" else 0)
               for p, s in zip(points, states) if s not in SKIPPED)
    return (f"normscale: cost: {total} run-steps ({sequences} sequences) over {len(points)} point(s); {left} "
            f"run-steps to run in {packs} pack(s)")


def show_packs(points: list[Point], indices: list[int], size: int) -> list[list[int]]:
    """The packs the unfinished `points` (sweep indices `indices`) form (pack=size), printed with why points of
    different shapes train apart; returned as lists of sweep indices."""
    configs = [p.config for p in points]
    packs = [[indices[m] for m in members] for members in form_packs(configs, size)]
    for j, members in enumerate(packs):
        print(f"pack {j:3d}  points {', '.join(map(str, members))}")
    first_of_shape: dict[tuple, int] = {}
    for m, config in enumerate(configs):
        first_of_shape.setdefault(shape_key(config), m)
    for m in list(first_of_shape.values())[1:11]:
        print(f"normscale: point {indices[m]} cannot share a pack with point {indices[0]}: "
              f"{'; '.join(why_apart(configs[m], configs[0]))}")
    print(f"normscale: {len(points)} point(s) to run form {len(packs)} pack(s) of at most {size}")
    return packs


def array_pack_size(pack: int | str, res: dict) -> int:
    """The pack size of the array's tasks: pack=N, or auto: 1 for tasks without a GPU (parallel tasks beat a pack on
    a CPU); with GPUs auto is refused, since it is chosen from the memory of a GPU the planner cannot see."""
    if pack != "auto":
        return pack
    if int(res["gpus_per_task"]):
        raise ConfigError("pack=auto is chosen from the free memory of the GPU a run starts on, which the planner "
                          "cannot see; give pack=N (`python -m normscale.train -m <sweep> pack=auto` on a GPU node "
                          "prints the size it picks, and a pack too big is refused with the estimate)")
    print("normscale: pack=auto: array tasks without a GPU train one run each (on a CPU parallel tasks beat a pack)")
    return 1


def processes_per_task(res: dict) -> int:
    """How many packs an array task trains, one process each: NORMSCALE_PROCESSES_PER_TASK, else one per GPU of the
    task (each process sees one GPU), else one."""
    gpus = int(res["gpus_per_task"])
    return int(os.environ.get("NORMSCALE_PROCESSES_PER_TASK") or max(gpus, 1))


def task_packs(record: dict, task: int) -> list[int]:
    """The pack indices array task `task` (offset included) of a packed manifest trains."""
    per_task = record.get("packs_per_task", 1)
    return list(range(task * per_task, min((task + 1) * per_task, len(record["packs"]))))


def read_manifest(manifest: Path) -> dict:
    try:
        return json.loads(Path(manifest).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the sweep manifest {manifest}: {error}; pass the manifest that `sweep plan "
                          "--submit` wrote (<experiment>/sweeps/*.json)") from None


def point(manifest: Path, index: int) -> list[str]:
    points = read_manifest(manifest)["points"]
    if not 0 <= index < len(points):
        raise ConfigError(f"sweep index {index} is outside {manifest} ({len(points)} points)")
    return points[index]


def read_packed(manifest: Path) -> dict:
    """A packed sweep's manifest (ConfigError for one without packs)."""
    record = read_manifest(manifest)
    if "packs" not in record:
        raise ConfigError(f"{manifest} has no packs (submitted without pack=N > 1): its array tasks train one point "
                          "each; use `sweep point` / `sweep progress <overrides>`")
    return record


def pack_points(manifest: Path, index: int) -> dict[int, Point]:
    """{sweep index: point} of pack `index` of a packed manifest, each point validated (as progress validates one)."""
    record = read_packed(manifest)
    packs = record["packs"]
    if not 0 <= index < len(packs):
        raise ConfigError(f"pack index {index} is outside {manifest} ({len(packs)} packs)")
    for i in packs[index]:
        check_overrides(record["points"][i])
    return {i: resolve(record["points"][i]) for i in packs[index]}


def progress(overrides: list[str]) -> str:
    """`<resume step> <max_steps> <run dir>` of one run (step 0 before any resume state): slurm/common.sh compares
    it before and after a preempted run to decide on a requeue, and its validation (one line, exit 2, as the entry
    point says it) is the check the scripts make once before they start the run's processes."""
    check_overrides(overrides)
    run = resolve(overrides)
    return f"{run.step() or 0} {run.max_steps} {run.run_dir}"


def pack_progress(manifest: Path, task: int) -> str:
    """`progress` of an array task of packs: resume steps and max_steps summed over the runs of its packs, and a
    label. The same requeue rule holds: the task saved progress (the sum grew) and is not complete (the sum is short
    of the max)."""
    packs = task_packs(read_packed(manifest), task)
    points = [p for k in packs for p in pack_points(manifest, k).values()]
    return (f"{sum(p.step() or 0 for p in points)} {sum(p.max_steps for p in points)} "
            f"pack(s) {', '.join(map(str, packs))} of {manifest} ({len(points)} runs, steps summed)")


def train_pack_task(manifest: Path, task: int) -> None:
    """Array task `task` of a packed sweep: its one pack trained in this process (train_pack_here), or its several
    packs in one process each, on one GPU each when the task has GPUs (CUDA_VISIBLE_DEVICES). Signals reach every
    pack process (they save and stop); the task ends with the most telling of their exit codes."""
    packs = task_packs(read_packed(manifest), task)
    if not packs:
        raise ConfigError(f"array task {task} is outside {manifest} (no pack left for it)")
    if len(packs) == 1:
        return train_pack_here(manifest, packs[0])
    for k in packs:
        pack_points(manifest, k)  # every point validated before any process starts
    gpus = int(os.environ.get("SLURM_GPUS_ON_NODE") or 0)
    for signum in (signal.SIGUSR1, signal.SIGTERM):  # inherited: a pack process ignores them until it trains, and
        signal.signal(signum, signal.SIG_IGN)        # after (as slurm/common.sh starts a run), so a repeat is harmless
    children = [subprocess.Popen([sys.executable, "-m", "normscale.sweep", "train-pack", "--manifest", str(manifest),
                                  "--pack", str(k)], env={**os.environ, **({"CUDA_VISIBLE_DEVICES": str(g)} if gpus
                                                                             else {})})
                for g, k in enumerate(packs)]
    forward = lambda signum, frame: [child.send_signal(signum) for child in children]  # noqa: E731
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, forward)
    codes = [child.wait() for child in children]
    failed = [c for c in codes if c]
    if failed:
        sys.exit(most_telling(failed))


def train_pack_here(manifest: Path, index: int) -> None:
    """Pack `index`'s points, all validated first, trained in this process (normscale.train.train_pack). Ends as a
    `-m` sweep with skipped points does: the most telling exit code."""
    points = pack_points(manifest, index)
    for i, p in points.items():
        print(f"normscale: pack {index}, point {i}: {' '.join(p.overrides)}")
    print(f"normscale: CACHE_DIR={next(iter(points.values())).config.cache_dir}", flush=True)
    from normscale.train import train_pack

    try:
        problems = train_pack([(p.config, p.overrides) for p in points.values()])
    except BaseException as error:
        fail_on(error)
    if problems:
        fail_skipped([(error.exit_code, " ".join(overrides)) for error, overrides in problems])


def slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{"<job>_<task>": (state, exit code)} of array tasks: sacct's latest record of each, overlaid with squeue's
    state of the tasks still in the queue (the accounting database learns of a start seconds after the controller)."""
    if not job_ids:
        return {}
    out = subprocess.run(["sacct", "-n", "-X", "-P", "--format=JobID,State,ExitCode", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, check=True).stdout
    states = {}
    for line in out.splitlines():
        job, state, code = line.split("|")
        states[job] = (state.split()[0], code)
    live = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(job_ids)], capture_output=True, text=True)
    if live.returncode and "invalid job id" not in live.stderr.lower():  # (all of them left the queue: nothing live)
        raise subprocess.CalledProcessError(live.returncode, live.args, live.stdout, live.stderr)
    for line in live.stdout.splitlines() if live.returncode == 0 else []:
        job, state = line.split("|")
        states[job] = (state, states.get(job, ("", ""))[1])
    return states


def status(overrides: list[str], manifest: Path | None) -> dict[str, list[int]]:
    """Print and return the points by state: finished, running, failed (with the reason a run recorded, and log
    paths), missing, conflict (a run directory trained with another identity, with the keys that differ)."""
    if manifest is None:
        points = grid(overrides)
        manifest = latest_sweep_manifest(experiment_dir(resolve(points[0]).config))
    record = read_manifest(manifest) if manifest else {"points": grid(overrides), "jobs": []}
    packs = record.get("packs")
    by_index = {}  # point -> its array task
    for job in record["jobs"]:
        task_ids = [int(t) for part in job["array"].split(",") for t in _expand(part)]
        for task in task_ids:
            members = [i for k in task_packs(record, job["offset"] + task) for i in packs[k]] if packs else \
                [job["offset"] + task]
            for i in members:
                by_index[i] = f"{job['job_id']}_{task}"
    states = slurm_states([j["job_id"] for j in record["jobs"]])
    groups = {"finished": [], "running": [], "failed": [], "missing": [], "conflict": []}
    for i, overrides_i in enumerate(record["points"]):
        point_i = resolve(overrides_i)
        disk = point_i.state()
        task = by_index.get(i)
        slurm, code = states.get(task, ("", "")) if task else ("", "")
        log = f", log {sweep_log(manifest, task)}" if task else ""
        if disk in ("finished", "conflict"):
            group, detail = disk, point_i.detail(disk)
        elif disk == "failed":
            group, detail = "failed", point_i.detail(disk) + log
        elif slurm in ("RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED"):
            group, detail = "running", f"{task} {slurm}"
        elif slurm in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "PREEMPTED", "BOOT_FAIL",
                       "DEADLINE", "COMPLETED"):
            group, detail = "failed", f"{task} {slurm} exit {code}, log {sweep_log(manifest, task)}"
        else:
            group, detail = "missing", ""
        groups[group].append(i)
        print(f"{i:4d}  {group:8s}  {' '.join(overrides_i)}  {detail}".rstrip())
    print("normscale: " + ", ".join(f"{len(v)} {k}" for k, v in groups.items() if k != "conflict" or v) +
          (f" (manifest {manifest})" if manifest else " (never submitted)"))
    if groups["conflict"]:
        print(f"normscale: conflicting points are not submitted; {FIX}")
    return groups


def _expand(part: str) -> list[int]:
    first, _, last = part.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m normscale.sweep", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_plan = sub.add_parser("plan", help="list the sweep's points; --submit sends the array to SLURM")
    p_plan.add_argument("--submit", action="store_true")
    p_plan.add_argument("--throttle", type=int, help="at most N array tasks at once (%%N); default NORMSCALE_ARRAY_THROTTLE")
    p_status = sub.add_parser("status", help="finished, running, failed and missing points")
    p_status.add_argument("--manifest", type=Path)
    p_point = sub.add_parser("point", help="one point's overrides (used by slurm/sweep.sh)")
    p_point.add_argument("--manifest", type=Path, required=True)
    p_point.add_argument("--index", type=int, required=True)
    p_progress = sub.add_parser("progress", help="one run's (or with --task the packs of an array task's) resume "
                                                 "step, max_steps and directory (used by slurm/common.sh)")
    p_progress.add_argument("--manifest", type=Path)
    p_progress.add_argument("--task", type=int)
    p_train = sub.add_parser("train-pack", help="train one pack of a manifest in this process (used by "
                                                "slurm/sweep.sh)")
    p_train.add_argument("--manifest", type=Path, required=True)
    p_train.add_argument("--index", type=int, help="the array task (its packs)")
    p_train.add_argument("--pack", type=int, help="one pack, trained in this process")
    args, overrides = parser.parse_known_args()
    if any(a in ("-m", "--multirun") for a in overrides):
        fail(f"python -m normscale.sweep {args.command} always sweeps: list a key's values as a comma list "
             "(e.g. task_kwargs.num_tasks=4,64), without -m")
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        fail(f"unknown option {unknown[0]} for python -m normscale.sweep {args.command} (see --help)")
    load_env()
    try:
        if args.command == "plan":
            plan(overrides, args.submit, args.throttle)
        elif args.command == "status":
            status(overrides, args.manifest)
        elif args.command == "progress" and (args.manifest or args.task is not None):
            if args.manifest is None or args.task is None or overrides:
                raise ConfigError("progress of a pack task takes --manifest PATH --task I and no overrides")
            print(pack_progress(args.manifest, args.task))
        elif args.command == "progress":
            print(progress(overrides))
        elif args.command == "train-pack":
            if overrides:
                raise ConfigError(f"train-pack takes its points from the manifest, not overrides ({overrides[0]})")
            if (args.index is None) == (args.pack is None):
                raise ConfigError("train-pack takes --manifest PATH and one of --index TASK or --pack I")
            if args.pack is not None:
                train_pack_here(args.manifest, args.pack)
            else:
                train_pack_task(args.manifest, args.index)
        else:
            print("\n".join(point(args.manifest, args.index)))
    except NormscaleError as error:
        fail(str(error), error.exit_code)
    except subprocess.CalledProcessError as error:
        fail(f"{' '.join(error.cmd)} failed ({error.returncode}): {error.stderr.strip()}")


if __name__ == "__main__":
    sys.exit(main())
