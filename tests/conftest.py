import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from normscale.cli import CONF_DIR, to_config
from normscale.config import Config

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# A small experiment per setting: seconds to generate, several shards per run.
SMALL = {
    "balls_and_urns": ["task_kwargs.num_dims=4", "task_kwargs.context_length=12"],
    "linear_regression": ["task_kwargs.num_dims=3", "task_kwargs.context_length=6"],
    "classification": ["task_kwargs.num_dims=4", "task_kwargs.context_length=8"],
}


def compose_config(*overrides: str) -> Config:
    """The Config users get from `python -m normscale.<entry> <overrides>`, composed by Hydra itself."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def small_config(cache_dir, setting="balls_and_urns", *overrides: str) -> Config:
    return compose_config(f"setting={setting}", f"cache_dir={cache_dir}", "name=test", *SMALL[setting],
                          "task_kwargs.num_tasks=8", "task_kwargs.num_ood_tasks=20", "training_kwargs.batch_size=8",
                          "training_kwargs.max_steps=50", "data_kwargs.eval_size=64", "data_kwargs.shard_mb=0.003",
                          "eval_kwargs.batch_size=16", "eval_kwargs.num_eval_batches=4", *overrides)


def run_module(module: str, *args: str, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a fresh interpreter, as a user would type it (env value None: unset)."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


# ---------------------------------------------------------------- a real local SLURM cluster (tools/local_slurm.sh)


def cluster_problem(started: Path) -> str | None:
    """Why no local SLURM cluster is usable here (None when it is), starting one where possible (the daemons it
    starts are listed in `started`)."""
    if shutil.which("sinfo") and subprocess.run(["bash", str(ROOT / "tools/local_slurm.sh"), "status"],
                                                capture_output=True).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "tools/local_slurm.sh needs root to install and start slurm, munge and mariadb"
    start = subprocess.run(["bash", str(ROOT / "tools/local_slurm.sh"), "start", "--started", str(started)],
                           capture_output=True, text=True)
    return None if start.returncode == 0 else f"tools/local_slurm.sh start failed: {start.stderr[-500:]}"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    started = tmp_path_factory.mktemp("local_slurm") / "started"

    def stop_what_was_started():  # exactly the daemons this session started (also after a failed start)
        if started.exists():
            subprocess.run(["bash", str(ROOT / "tools/local_slurm.sh"), "stop", "--started", str(started)], check=True)

    problem = cluster_problem(started)
    if problem:
        stop_what_was_started()
        if os.environ.get("NORMSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"NORMSCALE_REQUIRE_SLURM=1 but no local SLURM cluster: {problem}")
        pytest.skip(f"no local SLURM cluster: {problem}")
    yield
    stop_what_was_started()
