"""What produced a result: the code version and the versions of the libraries that decide its numbers. Stdlib only."""
from __future__ import annotations

import functools
import importlib.metadata
import shutil
import subprocess
from pathlib import Path

import normscale

LIBRARIES = ("torch", "numpy", "h5py", "transformers", "accelerate", "deepspeed")
CHECKOUT = Path(normscale.__file__).resolve().parents[1]


@functools.cache
def code_version() -> str:
    """`git:<commit>` (`+dirty` when tracked files differ from it) inside a git checkout, else `normscale==<version>`."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True)

    if not (CHECKOUT / ".git").exists():
        return f"normscale=={normscale.__version__}"
    if shutil.which("git") is None:
        return f"normscale=={normscale.__version__} (a git checkout, but no git here to name its commit)"
    head = git("rev-parse", "HEAD")
    if head.returncode:
        return f"normscale=={normscale.__version__} (git could not read the checkout's commit)"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return f"git:{head.stdout.strip()}" + ("+dirty" if dirty else "")


@functools.cache
def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # an optional library that is not installed
            versions[name] = None
    return versions


def provenance() -> dict:
    return {"code_version": code_version(), "libraries": library_versions()}
