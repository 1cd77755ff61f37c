"""A sweep trained as stacked packs (pack_execution=stacked: one model with a leading run axis, normscale.pack.stacked)
from the command line: every run ends as its solo run (within fp32 rounding), and a stacked pack killed mid-way
resumes bit-exactly."""
import json
import re
import signal

import pytest
import torch

from conftest import run_module
from normscale.checkpoints import load_checkpoint
from normscale.layout import list_checkpoints
from test_pack_forming import stopped_once_saved

TOLERANCE = 1e-5  # max |packed - solo| over every weight of every checkpoint (fp32; batched kernels round differently)

COMMON = ["-m", "name=stacked", "task_kwargs.context_length=12", "task_kwargs.num_ood_tasks=8",
          "model_kwargs.hidden_size=16", "training_kwargs.batch_size=8",
          "training_kwargs.save_steps.schedule=linear_schedule", "training_kwargs.save_steps.num_checkpoints=2",
          "training_kwargs.save_steps.first_step=4", "training_kwargs.log_every=4", "training_kwargs.eval_every=4",
          "data_kwargs.eval_size=32", "eval_kwargs.batch_size=16", "eval_kwargs.num_eval_batches=2",
          "logging.wandb=false"]
# Runs that differ in D and clipping (0.05 clips every step, 100 never), and in one more of max_steps, seed, learning
# rate and warmup per setting (tests/test_pack.py varies them all at once, in process).
DIFFERING = ["task_kwargs.num_tasks=2,16", "training_kwargs.max_grad_norm=0.05,100"]
CASES = {
    "balls_and_urns": ["setting=balls_and_urns", "task_kwargs.num_dims=4", "model=transformer", "seed=0",
                       "training_kwargs.learning_rate=0.003", "training_kwargs.max_steps=8,12"],
    "linear_regression": ["setting=linear_regression", "task_kwargs.num_dims=4", "model=mlp", "seed=1,2",
                          "training_kwargs.learning_rate=0.01", "training_kwargs.warmup_steps=3",
                          "training_kwargs.max_steps=8"],
    "classification": ["setting=classification", "task_kwargs.num_dims=4", "model=transformer",
                       "model_kwargs.parametrization=mup", "model_kwargs.base_width=8", "seed=3",
                       "training_kwargs.learning_rate=0.003,0.01", "training_kwargs.warmup_steps=0",
                       "training_kwargs.max_steps=8"],
}


def sweep(cache, *args: str):
    return run_module("normscale.train", *COMMON, *args, env={"CACHE_DIR": str(cache)})


def runs_of(cache):
    return sorted(cache.glob("experiments/*/stacked/runs/*"))


def weights(run) -> dict[int, dict[str, torch.Tensor]]:
    return {step: load_checkpoint(path)[0] for step, path in list_checkpoints(run)}


def eval_records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "eval_metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("setting", sorted(CASES))
def test_a_stacked_pack_ends_as_its_solo_runs(tmp_path, setting):
    """8 runs stepped as one stacked pack on this CPU: the same checkpoints, within TOLERANCE, as the same sweep
    trained run by run; the same eval records within 1e-4; clipping was active for some runs only."""
    solo = sweep(tmp_path / "solo", *CASES[setting], *DIFFERING)
    packed = sweep(tmp_path / "packed", *CASES[setting], *DIFFERING, "pack=8", "pack_execution=stacked")
    assert solo.returncode == 0 and packed.returncode == 0, packed.stderr[-3000:]
    assert "as one pack, stacked" in packed.stdout
    solo_runs, packed_runs = runs_of(tmp_path / "solo"), runs_of(tmp_path / "packed")
    assert [r.name for r in solo_runs] == [r.name for r in packed_runs] and len(solo_runs) == 8
    worst = 0.0
    for a, b in zip(solo_runs, packed_runs):
        wa, wb = weights(a), weights(b)
        assert sorted(wa) == sorted(wb) and len(wa) == 3
        worst = max(worst, *((wa[s][n] - wb[s][n]).abs().max().item() for s in wa for n in wa[s]))
        for ra, rb in zip(eval_records(a), eval_records(b), strict=True):
            assert ra["step"] == rb["step"]
            for split in ("id", "ood"):
                assert ra[split] == pytest.approx(rb[split], rel=1e-4, abs=1e-6)
    assert 0 < worst < TOLERANCE  # not bit-identical: the stacked kernels ran
    clipped = [json.loads(line)["grad_norm"] > 0.05 for run in solo_runs
               for line in (run / "train_metrics.jsonl").read_text().splitlines()]
    assert any(clipped)


def run_files(cache) -> dict[str, bytes]:
    """Checkpoint weights, eval records and the latest resume state's model and optimizer files of every run."""
    return {str(path.relative_to(cache)): path.read_bytes() for run in runs_of(cache)
            for path in sorted([*run.glob("checkpoint-*/*.safetensors"), run / "eval_metrics.jsonl",
                                *run.glob("resume/*.safetensors"), *run.glob("resume/*.bin")])}


LONGER = [*CASES["balls_and_urns"][:-1], "task_kwargs.num_tasks=2,16", "training_kwargs.max_steps=40,56", "pack=4",
          "pack_execution=stacked"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("uninterrupted")
    result = sweep(cache, *LONGER)
    assert result.returncode == 0, result.stderr[-2000:]
    return cache


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGUSR1])
def test_a_stacked_pack_stopped_then_run_again_ends_bit_exactly_as_an_uninterrupted_one(uninterrupted, tmp_path,
                                                                                         stop):
    """Killed (anywhere, also between its runs' saves: they may resume at different steps) or preempted once a
    resume state exists, then the same command: every file equals the uninterrupted pack's, byte for byte."""
    code, out, err = stopped_once_saved(tmp_path, [*COMMON, *LONGER], stop)
    if stop == signal.SIGUSR1:
        assert code == 0, err[-2000:]
        assert out.count("preempted; resume state saved at step") == 4
    again = sweep(tmp_path, *LONGER)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed at step" in again.stdout
    assert run_files(tmp_path).keys() == run_files(uninterrupted).keys()
    assert run_files(tmp_path) == run_files(uninterrupted)


def test_a_pack_with_one_run_whose_data_is_damaged_refuses_before_any_run_is_written(tmp_path):
    """Four runs, four datasets (D differs); one dataset's task file truncated: the pack says which file and the
    command that repairs it, exits 2, and no run of the pack has a file."""
    from faults import truncate

    args = [*CASES["balls_and_urns"][:-1], "task_kwargs.num_tasks=2,4,8,16", "training_kwargs.max_steps=8"]
    prepared = run_module("normscale.data", *COMMON[1:], *[a for a in args if "num_tasks" not in a],
                          "task_kwargs.num_tasks=8", env={"CACHE_DIR": str(tmp_path)})
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    [tasks] = tmp_path.glob("experiments/*/stacked/data/*/tasks.h5")
    truncate(tasks)
    result = sweep(tmp_path, *args, "pack=4", "pack_execution=stacked")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"data file {tasks} is truncated" in result.stderr and "python -m normscale.data" in result.stderr
    assert "Traceback" not in result.stderr and "as one pack" not in result.stdout
    assert not list(tmp_path.glob("experiments/*/stacked/runs/*/*"))


def test_a_pack_too_big_for_the_device_is_refused_before_any_work_with_the_estimate(tmp_path):
    """The estimate (normscale.pack.memory: one step traced on the meta device) of 4 runs at batch 4096 and width
    2048 exceeds this machine's memory: one line with the estimate and the pack size that fits, exit 2, nothing
    written."""
    result = sweep(tmp_path, *CASES["balls_and_urns"][:-1], "task_kwargs.num_tasks=2,4,8,16",
                   "training_kwargs.max_steps=8", "training_kwargs.batch_size=4096", "model_kwargs.hidden_size=2048",
                   "pack=4", "pack_execution=stacked")
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"normscale: error: pack=4: 4 run\(s\) stacked need about [0-9.]+ GiB \(per run: [0-9.]+ GiB "
                        r"of activations, [0-9.]+ GiB of parameters, held 7 times\) but cpu has [0-9.]+ GiB free; use "
                        r"pack=1.* or pack=auto", line), line
    assert not (tmp_path / "experiments").exists() or not list(tmp_path.glob("experiments/*/stacked/*/*"))


def test_the_memory_estimate_counts_what_autograd_keeps():
    """Activations grow linearly with the batch and the parameters with width squared; a stacked pack of N needs N
    runs' activations, runs in turn one run's."""
    from normscale.pack.memory import largest_fitting, run_memory
    from conftest import compose_config

    small = run_memory(compose_config("training_kwargs.batch_size=16", "model_kwargs.hidden_size=32"))
    double = run_memory(compose_config("training_kwargs.batch_size=32", "model_kwargs.hidden_size=32"))
    wide = run_memory(compose_config("training_kwargs.batch_size=16", "model_kwargs.hidden_size=64"))
    assert double.activations == pytest.approx(2 * small.activations, rel=0.01)
    assert 3 < wide.parameters / small.parameters < 4.2
    assert small.pack(8, stacked=True) > 7 * small.pack(1, stacked=True) > small.pack(8, stacked=False)
    for stacked in (True, False):  # the largest pack that fits: the most N with pack(N) within 90% of the memory
        for free in (10**8, 10**9, 3 * 10**10):
            n = largest_fitting(small, stacked, free)
            assert small.pack(n + 1, stacked) > 0.9 * free and (n == 0 or small.pack(n, stacked) <= 0.9 * free)


def test_a_stacked_pack_killed_then_run_again_re_formed_ends_within_tolerance_of_an_uninterrupted_one(uninterrupted,
                                                                                                        tmp_path):
    """Killed once a resume state exists, then run again as packs of 2 instead of 4 (re-formed: other runs beside
    each run): every checkpoint within TOLERANCE of the uninterrupted pack's."""
    stopped_once_saved(tmp_path, [*COMMON, *LONGER], signal.SIGKILL)
    again = sweep(tmp_path, *[a for a in LONGER if a != "pack=4"], "pack=2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("training 2 run(s) as one pack, stacked") == 2 and "resumed at step" in again.stdout
    for a, b in zip(runs_of(uninterrupted), runs_of(tmp_path), strict=True):
        wa, wb = weights(a), weights(b)
        assert sorted(wa) == sorted(wb)
        assert max((wa[s][n] - wb[s][n]).abs().max().item() for s in wa for n in wa[s]) < TOLERANCE
