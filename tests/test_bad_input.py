"""Bad input, table-driven, through real processes as users type the commands: every row ends with exit code 2, exactly
one `normscale: error:` line on stderr, no traceback, and nothing written under CACHE_DIR (docs/RELIABILITY.md).

Each row is (command, environment, setup): the command's `{cache}` and `{tmp}` are filled in; `setup(tmp, cache)`
makes what the row needs (a trained experiment's directory, a read-only mount) and returns a command prefix, if any.
A fault that cannot be set up fails the row (tests/faults.py): it never skips."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from faults import one_error_line

PY = [sys.executable]
TINY = ["task_kwargs.num_dims=4", "task_kwargs.context_length=12", "training_kwargs.max_steps=40"]


def trained_experiment(tmp: Path, cache: Path) -> list[str]:
    """An experiment trained earlier under CACHE_DIR (its directory is what identifies it)."""
    (cache / "experiments" / "balls_and_urns" / "mine" / "runs" / "seed=0").mkdir(parents=True)
    return []


def read_only_mount(tmp: Path, cache: Path) -> list[str]:
    """CACHE_DIR on a read-only mount: the directory bind-mounted read-only onto itself, in a private mount namespace
    of the command alone (root ignores permission bits, not a read-only mount)."""
    assert shutil.which("unshare") and os.geteuid() == 0, "a read-only mount needs unshare and root"
    cache.mkdir(parents=True)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount --bind -o ro "{cache}" "{cache}" && exec "$@"', "sh"]


def file_in_the_way(tmp: Path, cache: Path) -> list[str]:
    (tmp / "a-file").write_text("a regular file where CACHE_DIR's parent should be a directory\n")
    return []


# id: (command, extra environment (None: unset), setup, the message's telling part)
ROWS = {
    "unknown key": (PY + ["-m", "normscale.train", "bogus_key=1"], {}, None, "unknown key bogus_key"),
    "bad group choice": (PY + ["-m", "normscale.train", "setting=urns"], {}, None, "setting='urns' is not a known"),
    "+experiment": (PY + ["-m", "normscale.train", "+experiment=demo"], {}, None, "choose presets with experiment=demo"),
    "nan learning rate": (PY + ["-m", "normscale.train", "training_kwargs.learning_rate=nan"], {}, None,
                          "training_kwargs.learning_rate=nan must be a finite number"),
    "overflowing learning rate": (PY + ["-m", "normscale.train", "training_kwargs.learning_rate=1e38"], {}, None,
                                  "training_kwargs.learning_rate=1e+38 must be > 0 and <= 1e+30"),
    "beta of 1.5": (PY + ["-m", "normscale.train", "training_kwargs.adam_beta1=1.5"], {}, None,
                    "training_kwargs.adam_beta1=1.5 must be in [0, 1)"),
    "zero clipping norm": (PY + ["-m", "normscale.train", "training_kwargs.max_grad_norm=0"], {}, None,
                           "training_kwargs.max_grad_norm=0.0 must be > 0"),
    "zero max_steps": (PY + ["-m", "normscale.train", "training_kwargs.max_steps=0"], {}, None,
                       "training_kwargs.max_steps=0 must be >= 1"),
    "bad fit_from": (PY + ["-m", "normscale.analysis", "fit_from=threshold"], {}, None,
                     "fit_from='threshold' is not allowed; choose one of: all, interpolation_threshold"),
    "infinite prior exponent": (PY + ["-m", "normscale.train", "task_kwargs.prior_exponent=inf"], {}, None,
                                "task_kwargs.prior_exponent=inf must be a finite number"),
    "no eval batches": (PY + ["-m", "normscale.eval", "eval_kwargs.num_eval_batches=0"], {}, None,
                        "eval_kwargs.num_eval_batches=0 must be >= 1"),
    "eval set over the storage budget": (PY + ["-m", "normscale.train", "eval_kwargs.num_eval_batches=100000000"],
                                         {}, None, "eval_kwargs.num_eval_batches=100000000 x eval_kwargs.batch_size="
                                                    "128 sequences per split need 6250000 eval blocks"),
    "trained experiment as preset": (PY + ["-m", "normscale.eval", "experiment=mine"], {}, trained_experiment,
                                     "is a trained experiment: select it with name=mine"),
    "read-only CACHE_DIR": (PY + ["-m", "normscale.train", "experiment=demo"], {}, read_only_mount,
                            "cannot write in CACHE_DIR={cache}: Read-only file system; set CACHE_DIR to a writable"),
    "CACHE_DIR below a file": (PY + ["-m", "normscale.data", "experiment=demo"], {"CACHE_DIR": "{tmp}/a-file/cache"},
                               file_in_the_way, "cannot create CACHE_DIR={tmp}/a-file/cache: {tmp}/a-file is not a "
                                                "directory"),
    "CACHE_DIR below a file, a -m sweep": (PY + ["-m", "normscale.train", "-m", "experiment=demo", "seed=0,1"],
                                           {"CACHE_DIR": "{tmp}/a-file/cache"}, file_in_the_way,
                                           "cannot create CACHE_DIR={tmp}/a-file/cache: {tmp}/a-file is not a directory"),
    "CACHE_DIR under /proc": (PY + ["-m", "normscale.train"], {"CACHE_DIR": "/proc/normscale-cache"}, None,
                              "cannot create CACHE_DIR=/proc/normscale-cache"),
    "sweep plan -m": (PY + ["-m", "normscale.sweep", "plan", "-m", "experiment=demo"], {}, None,
                      "always sweeps: list a key's values as a comma list"),
    "sweep status -m": (PY + ["-m", "normscale.sweep", "status", "--multirun", "experiment=demo"], {}, None,
                        "always sweeps"),
    "sweep plan bad grammar": (PY + ["-m", "normscale.sweep", "plan", "task_kwargs.num_tasks=[4,"], {}, None,
                               "task_kwargs.num_tasks=[4,"),
    "LLM hub id offline": (PY + ["-m", "normscale.eval", "experiment=llm_eval", "model_kwargs.model_path=org/absent"],
                           {"HF_HUB_OFFLINE": "1", "HF_HOME": "{tmp}/hf"}, None,
                           "model_kwargs.model_path=org/absent is not a local directory nor in the hub cache, and "
                           "HF_HUB_OFFLINE=1 forbids downloading"),
    "LLM hub unreachable": (PY + ["-m", "normscale.eval", "experiment=llm_eval", "model_kwargs.model_path=org/absent"],
                            {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_HOME": "{tmp}/hf",
                             "HF_ENDPOINT": "http://127.0.0.1:9", "http_proxy": None, "HTTP_PROXY": None,
                             "all_proxy": None, "ALL_PROXY": None},
                            None, "the hub cannot be reached (127.0.0.1:9: Connection refused)"),
    "LLM missing local directory": (PY + ["-m", "normscale.eval", "experiment=llm_eval",
                                          "model_kwargs.model_path={tmp}/no-such-model"], {}, None,
                                    "model_kwargs.model_path={tmp}/no-such-model is not a local directory"),
    "launch/cpu.sh 2 processes": (["bash", "launch/cpu.sh", "2", "-m", "normscale.train", "bogus_key=1"],
                                  {"PYTHON": sys.executable}, None, "unknown key bogus_key"),
    "launch/cpu.sh sweep point": (["bash", "launch/cpu.sh", "2", "-m", "normscale.train", "-m",
                                   "training_kwargs.learning_rate=1e-3,nan", *TINY], {"PYTHON": sys.executable}, None,
                                  "training_kwargs.learning_rate=nan must be a finite number"),
    "slurm/submit train_multinode": (["bash", "slurm/submit", "--dry-run", "slurm/train_multinode.sh", "bogus_key=1"],
                                     {}, None, "unknown key bogus_key"),
    "slurm/submit sweep -m": (["bash", "slurm/submit", "--dry-run", "slurm/sweep.sh", "-m", "experiment=demo"], {},
                              None, "slurm/sweep.sh always sweeps"),
}


def everything_under(directory: Path) -> dict[str, bytes | None]:
    """{relative path: content (None for a directory)} of every entry under `directory`."""
    if not directory.exists():
        return {}
    return {p.relative_to(directory).as_posix(): None if p.is_dir() else p.read_bytes()
            for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
def test_bad_input_is_one_line_and_exit_code_2_with_nothing_written(row, tmp_path):
    command, extra, setup, message = ROWS[row]
    cache = tmp_path / "cache"

    def fill(text: str) -> str:
        return text.format(tmp=tmp_path, cache=cache)

    prefix = setup(tmp_path, cache) if setup else []
    before = everything_under(cache)
    env = {**os.environ, "CACHE_DIR": str(cache), "WANDB_MODE": "offline",
           **{k: fill(v) for k, v in extra.items() if v is not None}}
    for key in [k for k, v in extra.items() if v is None]:
        env.pop(key, None)
    start = time.monotonic()
    result = subprocess.run([*prefix, *map(fill, command)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    elapsed = time.monotonic() - start
    assert "mount:" not in result.stderr and "unshare:" not in result.stderr, f"could not set up: {result.stderr}"
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert fill(message) in line, line
    assert everything_under(cache) == before  # nothing written (and the probe of CACHE_DIR left nothing)
    if row.startswith("LLM"):
        assert elapsed < 15, f"{elapsed:.1f} s: a model path that cannot load must fail at once (no retries)"
    if row.startswith("launch/cpu.sh"):
        assert "ChildFailedError" not in result.stderr and elapsed < 15  # validated before any worker started
