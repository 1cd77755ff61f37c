"""One writer per run: a lock record in the run directory, held for the run's whole life. Standard library only.

`<run_dir>/lock.json` (layout.LOCK_FILE) holds the holder's host, pid (and the pid's start time, so a reused pid is
not mistaken for it), SLURM job id, when it took the lock and a heartbeat refreshed every HEARTBEAT_SECONDS by a
thread. No flock: shared file systems differ in how (and whether) they honour it across nodes. The record is created with `link(2)` from a
complete temporary file, which fails when the lock exists (atomic, also on NFS), so a reader never sees a partial one.

The holder counts as dead when its pid is gone (same host), its SLURM job has left the queue (or it is this very job,
requeued), or its heartbeat is older than STALE_SECONDS; a SLURM controller that does not answer proves nothing. A
dead holder's lock is taken over one contender at a time: the one that creates the takeover marker (again with
link(2)) checks that the record is still the one it judged dead, removes it and creates its own.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from normscale.config import RunHeldError
from normscale.layout import LOCK_FILE

HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0
STALE_TAKEOVER_SECONDS = 30.0  # a takeover takes milliseconds; a marker older than this was left by a dead contender


def _pid_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _slurm_job() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def _job_in_queue(job: str) -> bool:
    """False only when SLURM says the job is not in the queue; no SLURM client here, or a controller that does not
    answer, counts as in the queue (the heartbeat decides then)."""
    if shutil.which("squeue") is None:
        return True
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    if out.returncode == 0:
        return bool(out.stdout.strip())
    return "invalid job id" not in out.stderr.lower()


def why_dead(record: dict, now: float | None = None) -> str | None:
    """Why the holder of `record` is dead, or None while it counts as alive."""
    age = (now or time.time()) - record["heartbeat"]
    if age > STALE_SECONDS:
        return f"its heartbeat is {age:.0f} s old"
    if record["host"] == socket.gethostname():
        if record.get("pid_start"):
            start = _pid_start(record["pid"])
            if start is None:
                return "its process is gone"
            if start != record["pid_start"]:
                return "its process is gone (its pid belongs to another process now)"
        elif not _pid_exists(record["pid"]):
            return "its process is gone"
        return None
    job = record.get("job")
    if job and job == _slurm_job():
        return "it is an earlier start of this SLURM job (requeued)"
    if job and not _job_in_queue(job):
        return f"its SLURM job {job} has left the queue"
    return None


def _pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def describe(record: dict) -> str:
    job = f", SLURM job {record['job']}" if record.get("job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["since"]))
    age = time.time() - record["heartbeat"]
    return f"host {record['host']} pid {record['pid']}{job} since {since} (heartbeat {age:.0f} s ago)"


RECORD_KEYS = {"host": str, "pid": int, "since": float, "heartbeat": float, "token": str}


def read_record(path: Path) -> dict | None:
    """The lock record at `path`; None when absent. A damaged record (not JSON, or without the keys a record has:
    records are created whole, so no holder wrote it) counts as a dead holder's."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    intact = isinstance(record, dict) and all(isinstance(record.get(k), (t, int) if t is float else t)
                                              for k, t in RECORD_KEYS.items())
    return record if intact else {"host": "?", "pid": -1, "since": 0.0, "heartbeat": 0.0,
                                  "token": f"damaged:{data[:64]!r}"}


class RunLock:
    """`acquire()` takes the run's lock (or raises RunHeldError, exit 75); a thread refreshes the heartbeat until
    `release()`. `lost` turns true if the record stops being ours (another process judged us dead)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                       "job": _slurm_job(), "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
                       "since": time.time(), "heartbeat": time.time(), "token": self.token}

    def acquire(self) -> str | None:
        """Take the lock; returns a line saying whose dead lock was taken over, if any."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            if self._create(self.path):
                self._start_heartbeat()
                return None
            record = read_record(self.path)
            if record is None:
                continue  # released meanwhile
            reason = why_dead(record)
            if reason is None:
                raise RunHeldError(f"run {self.path.parent} is held by {describe(record)}; wait for it to finish or "
                                   f"stop it (a dead holder's lock is taken over: pid gone, job left the queue, or "
                                   f"no heartbeat for {STALE_SECONDS:.0f} s)")
            if self._take_over(record):
                self._start_heartbeat()
                return f"took over the lock of run {self.path.parent} from {describe(record)}: {reason}"
            time.sleep(0.1)  # another process is taking it over: see who wins
        raise RunHeldError(f"run {self.path.parent}: other processes keep taking its lock; try again")

    def _create(self, path: Path) -> bool:
        """Create `path` holding our record, atomically and only if it does not exist (link(2) of a whole file)."""
        tmp = self.path.with_name(f".{LOCK_FILE}.{self.token}")
        tmp.write_text(json.dumps(self.record))
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _take_over(self, dead: dict) -> bool:
        """Replace the dead holder's record by ours, one contender at a time: only the creator of the takeover
        marker may remove a record, and only the one it judged dead (a marker left by a contender that died is
        removed after STALE_TAKEOVER_SECONDS)."""
        marker = self.path.with_name(f".{LOCK_FILE}.takeover")
        if not self._create(marker):
            try:
                if time.time() - marker.stat().st_mtime > STALE_TAKEOVER_SECONDS:
                    marker.unlink(missing_ok=True)
            except FileNotFoundError:  # the other contender finished meanwhile
                pass
            return False
        try:
            current = read_record(self.path)
            if current is not None and current["token"] != dead["token"]:
                return False  # replaced meanwhile (by a live process or a finished takeover)
            self.path.unlink(missing_ok=True)
            return self._create(self.path)
        finally:
            marker.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="normscale-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.heartbeat()
            except OSError as error:  # a full disk, say: try again at the next beat (stale only after 10 minutes)
                print(f"normscale: warning: could not refresh the lock of run {self.path.parent} ({error}); "
                      "trying again in a minute", file=sys.stderr, flush=True)

    def heartbeat(self) -> None:
        """Refresh the record's heartbeat (atomic replace), unless it is no longer ours."""
        current = read_record(self.path)
        if current is None or current.get("token") != self.token:
            self.lost = True
            return
        self.record["heartbeat"] = time.time()
        tmp = self.path.with_name(f".{LOCK_FILE}.beat-{self.token}")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = read_record(self.path)
        if current is not None and current.get("token") == self.token:
            self.path.unlink()
