"""Atomic writes and inter-process locks: every file another step reads is complete or absent."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from normscale.config import FaultError


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_is_full(path: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system holding `path` (or its nearest existing parent) has less than `margin` bytes free."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free < margin


@contextlib.contextmanager
def disk_full_guard(path: Path, kept: str):
    """Turn a write that failed for lack of space (an ENOSPC OSError, or the RuntimeError that torch.save and
    h5py raise for it) into one FaultError naming `path` and what was `kept`."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        full = getattr(error, "errno", None) in DISK_FULL_ERRNOS or disk_is_full(path)
        if not full:
            raise
        raise FaultError(f"no space left on the device writing {path}: {kept} are kept, nothing is half-written; "
                         "free space, then run the same command again") from None


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path` (atomic on POSIX).
    A full disk raises FaultError (the previous `path`, if any, is untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_full_guard(path, f"the previous {path.name} (if any) and every other finished file"):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (flock) on `path`, held for the block; waits for other holders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()
