"""Faults produced for real: truncated and flipped files, a full disk, processes killed at chosen moments.

A fault that cannot be set up fails the test (never a skip): a test that did not meet its fault proves nothing.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut `path` to a fraction of its size (as a kill or a full disk mid-write would leave it)."""
    path = Path(path)
    size = path.stat().st_size
    assert size > 1, f"cannot truncate {path}: {size} bytes"
    os.truncate(path, max(1, int(size * keep)))


def flip(path: Path, offset: int | None = None) -> None:
    """Invert one byte of `path` (the middle one by default), size unchanged: silent corruption."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    assert data, f"cannot flip a byte of the empty file {path}"
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def at_once(target, args: tuple, processes: int, timeout: float) -> list:
    """A real race: `processes` spawned processes run target(*args, barrier, results), released together by the
    barrier, each putting one result. Their results in arrival order, once every process has exited 0."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for _ in range(processes)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return outcomes


def one_error_line(stderr: str) -> str:
    """The single `normscale: error:` line of a failed command's stderr; fails on a traceback or several errors."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("normscale: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """{relative path: content} of every regular file under `directory` (symlinks as their target's name)."""
    directory = Path(directory)
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink():
            out[rel] = os.readlink(path).encode()
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


def run_on_small_disk(mount_point: Path, size: str, args: list[str], env: dict | None = None, cwd=None,
                      timeout: int = 300, before: str = "") -> subprocess.CompletedProcess:
    """Run `args` in a private mount namespace (`unshare -m`, needs root) where `mount_point` is a fresh tmpfs of
    `size` (e.g. "2m"): a real full disk (ENOSPC), invisible to every other process. `before` is a shell snippet run
    inside the namespace after mounting (e.g. copying files onto the small disk)."""
    mount_point = Path(mount_point)
    mount_point.mkdir(parents=True, exist_ok=True)
    script = (f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount_point))} && {before or 'true'} && "
              f"exec {shlex.join(args)}")
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=cwd or ROOT,
                            env=full_env, capture_output=True, text=True, timeout=timeout)
    assert "mount:" not in result.stderr and "unshare:" not in result.stderr, \
        f"could not set up the small disk: {result.stderr}"
    return result


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
