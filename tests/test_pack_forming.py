"""Which runs can share a pack (normscale/pack/forming.py), the packs a sweep forms, and `pack` as an execution key
that names no run."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, compose_config, run_module
from normscale.config import ConfigError
from normscale.layout import identity_hash, read_config, read_overrides, run_name
from normscale.pack.forming import SHAPE_KEYS, form_packs, shape_key, why_apart
from normscale.sweep import resolve, show_packs


def replace(config, dotted: str, value):
    """`config` with one dotted key changed."""
    section, _, key = dotted.rpartition(".")
    if not section:
        return dataclasses.replace(config, **{key: value})
    head, _, rest = section.partition(".")
    inner = getattr(config, head)
    if rest:
        inner = dataclasses.replace(inner, **{rest: dataclasses.replace(getattr(inner, rest), **{key: value})})
        return dataclasses.replace(config, **{head: inner})
    return dataclasses.replace(config, **{head: dataclasses.replace(inner, **{key: value})})


SAME_SHAPE = {"task_kwargs.num_tasks": 1024, "task_kwargs.prior": "power_law", "seed": 7,
              "training_kwargs.learning_rate": 1e-3, "training_kwargs.warmup_steps": 10,
              "training_kwargs.max_steps": 500, "training_kwargs.max_grad_norm": 0.5,
              "training_kwargs.lr_schedule": "cosine", "training_kwargs.save_steps.schedule": "end_only",
              "task_kwargs.dirichlet_alpha": 0.5}
OTHER_SHAPE = {"setting": "linear_regression", "model": "mlp", "task_kwargs.num_dims": 16,
               "task_kwargs.context_length": 64, "model_kwargs.hidden_size": 128, "model_kwargs.num_layers": 2,
               "model_kwargs.num_heads": 2, "model_kwargs.mlp_expansion_factor": 2.0,
               "model_kwargs.parametrization": "mup", "model_kwargs.base_width": 64,
               "training_kwargs.batch_size": 32, "training_kwargs.gradient_accumulation_steps": 2,
               "training_kwargs.precision": "bf16", "training_kwargs.compile": True, "data_kwargs.source": "generate",
               "pack_execution": "stacked"}


def test_every_shape_key_is_covered_by_the_cases():
    assert set(OTHER_SHAPE) == set(SHAPE_KEYS)


@pytest.mark.parametrize("key", sorted(SAME_SHAPE))
def test_runs_differing_in_their_tasks_or_optimiser_numbers_share_a_shape(key):
    base = compose_config()
    assert shape_key(replace(base, key, SAME_SHAPE[key])) == shape_key(base)


@pytest.mark.parametrize("key", sorted(OTHER_SHAPE))
def test_runs_differing_in_a_shape_key_train_apart_and_say_why(key):
    base = compose_config()
    other = replace(base, key, OTHER_SHAPE[key])
    assert shape_key(other) != shape_key(base)
    assert why_apart(other, base) == [f"{key} {OTHER_SHAPE[key]!r} != {shape_key(base)[list(SHAPE_KEYS).index(key)]!r} "
                                      f"({SHAPE_KEYS[key]})"]


def test_packs_group_each_shape_in_sweep_order_and_cut_at_the_size():
    base = compose_config()
    wide = replace(base, "model_kwargs.hidden_size", 128)
    configs = [base, wide, base, base, wide, base, base]
    assert form_packs(configs, 2) == [[0, 2], [3, 5], [6], [1, 4]]
    assert form_packs(configs, 1) == [[i] for i in (0, 2, 3, 5, 6, 1, 4)]
    with pytest.raises(ValueError, match="pack=0"):
        form_packs(configs, 0)


def test_pack_names_no_run_and_is_no_identity():
    overrides = ["task_kwargs.num_tasks=8", "seed=1"]
    assert run_name([*overrides, "pack=16"], 1) == run_name(overrides, 1)
    assert identity_hash(compose_config(*overrides, "pack=16")) == identity_hash(compose_config(*overrides))
    with pytest.raises(ConfigError, match="pack=0 must be >= 1"):
        compose_config("pack=0")


def test_the_planner_shows_the_packs_and_why_points_train_apart(tmp_path, capsys):
    grid = [[f"cache_dir={tmp_path}", f"task_kwargs.num_tasks={D}", f"model_kwargs.hidden_size={H}", "pack=2"]
            for H in (32, 64) for D in (2, 4, 8)]
    points = [resolve(point) for point in grid]
    show_packs(points, list(range(len(points))), 2)
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["pack   0  points 0, 1", "pack   1  points 2", "pack   2  points 3, 4", "pack   3  points 5"]
    assert out[4] == ("normscale: point 3 cannot share a pack with point 0: model_kwargs.hidden_size 64 != 32 "
                      "(width)")
    assert out[5] == "normscale: 6 point(s) to run form 4 pack(s) of at most 2"


SWEEP = ["-m", "name=packed", "task_kwargs.num_dims=4", "task_kwargs.context_length=12", "task_kwargs.num_ood_tasks=8",
         "model_kwargs.hidden_size=16", "training_kwargs.batch_size=8", "training_kwargs.warmup_steps=2",
         "training_kwargs.save_steps.schedule=linear_schedule", "training_kwargs.save_steps.num_checkpoints=2",
         "training_kwargs.save_steps.first_step=4", "training_kwargs.log_every=4", "training_kwargs.eval_every=8",
         "data_kwargs.eval_size=32", "eval_kwargs.batch_size=16", "eval_kwargs.num_eval_batches=2", "logging.wandb=false",
         "task_kwargs.num_tasks=2,4,8", "training_kwargs.learning_rate=0.001,0.003", "training_kwargs.max_steps=8"]


def sweep(cache, *extra: str):
    return run_module("normscale.train", *SWEEP, *extra, env={"CACHE_DIR": str(cache)})


def run_files(cache) -> dict[str, bytes]:
    """What each run of the experiment ends with: checkpoints, metrics records and the latest resume state (a
    preempted run also keeps the state it stopped at, as the previous one). Left out: records holding times or hashes
    of those (meta.json, state.json, train_metrics.jsonl, compared apart), and the global RNG state a
    resume state records (random_states_*.pkl): a pack's runs share one process's generators, from which training
    draws nothing (batches come from counter-based streams, the models have no dropout). The config and overrides
    records hold cache_dir and pack= and are compared apart."""
    files, runs = {}, cache / "experiments" / "balls_and_urns" / "packed" / "runs"
    for run in sorted(runs.iterdir()):
        for path in sorted([*run.glob("checkpoint-*/*"), *run.glob("*.jsonl"), *(run / "resume").iterdir()]):
            if path.name not in ("meta.json", "train_metrics.jsonl", "state.json") \
                    and not path.name.startswith("random_states_"):
                files[str(path.relative_to(runs))] = path.read_bytes()
    return files


def test_a_packed_sweep_writes_what_the_solo_sweep_writes(tmp_path):
    """pack=4 over 6 points: packs of 4 and 2 runs, their steps in turn in one process; every run directory holds the
    very files (checkpoints, resume states, eval records) the solo sweep writes, and the same objectives."""
    solo, packed = sweep(tmp_path / "solo"), sweep(tmp_path / "packed", "pack=4")
    assert solo.returncode == 0 and packed.returncode == 0, packed.stderr[-3000:]
    assert packed.stdout.count("as one pack") == 2
    assert "training 4 run(s) as one pack" in packed.stdout and "training 2 run(s) as one pack" in packed.stdout
    a, b = run_files(tmp_path / "solo"), run_files(tmp_path / "packed")
    assert len(a) == 6 * 8 and a == b  # 3 checkpoints, eval records and 4 resume files per run
    for run in (tmp_path / "solo" / "experiments" / "balls_and_urns" / "packed" / "runs").iterdir():
        twin = tmp_path / "packed" / run.relative_to(tmp_path / "solo")
        assert identity_hash(read_config(twin)) == identity_hash(read_config(run))
        assert read_overrides(twin) == [*read_overrides(run), "pack=4"]
        strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "seconds_per_step"}  # noqa: E731
                              for line in text.splitlines()]
        assert strip((run / "train_metrics.jsonl").read_text()) == strip((twin / "train_metrics.jsonl").read_text())


def test_a_run_that_cannot_train_is_left_out_of_its_pack_and_the_rest_train(tmp_path):
    first = sweep(tmp_path, "task_kwargs.num_tasks=2", "training_kwargs.learning_rate=0.001")
    assert first.returncode == 0, first.stderr[-2000:]
    failed = next((tmp_path / "experiments" / "balls_and_urns" / "packed" / "runs").iterdir())
    (failed / "failed.json").write_text(json.dumps({"step": 3, "last_finite_step": 0, "reason": "a test"}))
    result = sweep(tmp_path, "pack=3")
    assert result.returncode == 2
    assert "left out of the pack" in result.stderr and "failed at step 3 (a test)" in result.stderr
    assert "1 sweep point(s) skipped" in result.stderr
    runs = list((tmp_path / "experiments" / "balls_and_urns" / "packed" / "runs").iterdir())
    assert len(runs) == 6 and all((run / "checkpoint-8").exists() for run in runs if run != failed)


def stopped_once_saved(cache, args: list[str], stop: int) -> tuple[int, str, str]:
    """`python -m normscale.train <args>` under CACHE_DIR=cache, sent `stop` once a run's first resume state exists:
    (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "normscale.train", *args], cwd=ROOT,
                            env={**os.environ, "CACHE_DIR": str(cache)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(cache.glob("experiments/*/*/runs/*/resume/state.json")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(stop)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


LONGER = ["training_kwargs.max_steps=48", "training_kwargs.learning_rate=0.001"]


@pytest.fixture(scope="module")
def solo_longer(tmp_path_factory):
    cache = tmp_path_factory.mktemp("solo")
    result = sweep(cache, *LONGER)
    assert result.returncode == 0, result.stderr[-2000:]
    return cache


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGUSR1])
def test_a_pack_stopped_mid_way_then_run_again_ends_as_the_solo_runs(solo_longer, tmp_path, stop):
    """SIGKILL (anywhere, also inside a save) or SIGUSR1 (every run saves its resume state, exit 0) once the pack's
    first resume state exists, then the same command: every run ends with the very files of its solo run."""
    code, out, err = stopped_once_saved(tmp_path, [*SWEEP, *LONGER, "pack=3"], stop)
    if stop == signal.SIGUSR1:
        assert code == 0, err[-2000:]
        assert out.count("preempted; resume state saved at step") == 3  # every run of the first pack
    again = sweep(tmp_path, *LONGER, "pack=3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed at step" in again.stdout
    assert run_files(tmp_path) == run_files(solo_longer)
    for run in (solo_longer / "experiments" / "balls_and_urns" / "packed" / "runs").iterdir():
        twin = tmp_path / run.relative_to(solo_longer)
        strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "seconds_per_step"}  # noqa: E731
                              for line in text.splitlines()]
        assert strip((run / "train_metrics.jsonl").read_text()) == strip((twin / "train_metrics.jsonl").read_text())


def test_a_pack_under_a_multi_process_launch_is_refused_before_any_work(tmp_path):
    """Packs train in one process; a launch of several (here rank 0 of 2, as torchrun or accelerate would set it) is
    refused with one line before anything is written or any process group is formed."""
    result = run_module("normscale.train", *SWEEP, "pack=2",
                        env={"CACHE_DIR": str(tmp_path), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pack=2 under a launch of 2 processes" in result.stderr
    assert not (tmp_path / "experiments" / "balls_and_urns" / "packed" / "runs").exists()


def test_the_planner_resolves_pack_auto_for_cpu_tasks_and_refuses_it_for_gpu_tasks(cluster, tmp_path):
    """An array task's pack size must be known when it is planned: auto is 1 for CPU tasks; for GPU tasks it depends
    on a GPU the planner cannot see, so it is refused with one line."""
    args = ["plan", "task_kwargs.num_tasks=2,4,8", "pack=auto"]
    cpu = run_module("normscale.sweep", *args, env={"CACHE_DIR": str(tmp_path), "NORMSCALE_GPUS_PER_TASK": "0"})
    assert cpu.returncode == 0, cpu.stderr[-2000:]
    assert "array tasks without a GPU train one run each" in cpu.stdout and "pack   0" not in cpu.stdout
    assert "--array=0-2" in cpu.stdout
    gpu = run_module("normscale.sweep", *args, env={"CACHE_DIR": str(tmp_path), "NORMSCALE_GPUS_PER_TASK": "1"})
    assert gpu.returncode == 2 and "pack=auto is chosen from the free memory of the GPU" in gpu.stderr
    assert "Traceback" not in gpu.stderr
