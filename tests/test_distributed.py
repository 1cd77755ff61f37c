"""Sharded training on 2 CPU processes over real gloo process groups: DeepSpeed ZeRO-2/ZeRO-3 through
`accelerate launch --config_file launch/zero{2,3}.yaml`, FSDP2 through launch/fsdp.yaml (with accelerate's CPU
fall-back to no wrapping switched off by tests/fsdp_cpu_train.py, INFRA.md), and repeated DDP launches."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose_config
from normscale.checkpoints import load_checkpoint, read_jsonl
from normscale.layout import list_checkpoints, read_config, resume_step
from normscale.dist.accel import configure_deepspeed
from normscale.model import build_model
from test_train import QUICK, URNS, wait_until

MAX_STEPS = 200
ARGS = [*QUICK, *URNS, f"training_kwargs.max_steps={MAX_STEPS}", "training_kwargs.log_every=10",
        "training_kwargs.eval_every=100", "training_kwargs.save_steps.schedule=end_only"]
SHARDING = re.compile(r"rank (\d): parameters (sharded|replicated), local (\d+) of (\d+) elements")


def accelerate_launch(config_file: str, *entry: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / config_file),
            "--num_processes", "2", "--main_process_port", "0", *entry]


def start(command: list[str], cache: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "CACHE_DIR": str(cache)})


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def runs_of(cache: Path, name: str) -> list[Path]:
    runs = cache / "experiments" / "balls_and_urns" / name / "runs"
    return list(runs.iterdir()) if runs.exists() else []


def preempted_then_resumed(command: list[str], cache: Path, name: str) -> tuple[Path, str, str]:
    """Train until the first logging step, SIGUSR1 the launcher's worker processes (what SLURM's --signal does),
    then launch again: (run directory, output of the preempted launch, output of the resumed one)."""
    proc = start(command, cache)
    wait_until(lambda: any(read_jsonl(r / "train_metrics.jsonl") for r in runs_of(cache, name)), timeout=240)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)
    preempted = finish(proc)
    resumed = finish(start(command, cache))
    [run_dir] = runs_of(cache, name)
    return run_dir, preempted, resumed


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return preempted_then_resumed(accelerate_launch("zero3.yaml", "-m", "normscale.train", "name=z3", *ARGS),
                                  tmp_path_factory.mktemp("zero3"), "z3")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    command = accelerate_launch("fsdp.yaml", str(ROOT / "tests" / "fsdp_cpu_train.py"), "name=fsdp", *ARGS)
    return preempted_then_resumed(command, tmp_path_factory.mktemp("fsdp"), "fsdp")


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zero2")
    out = finish(start(accelerate_launch("zero2.yaml", "-m", "normscale.train", "name=z2", *ARGS), cache))
    [run_dir] = runs_of(cache, "z2")
    return run_dir, out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's consolidated weights, loaded in this one process into a fresh model (strictly)."""
    checkpoints = list_checkpoints(run_dir)
    assert [s for s, _ in checkpoints] == [0, MAX_STEPS]
    state, meta = load_checkpoint(checkpoints[-1][1])
    assert meta["step"] == MAX_STEPS and meta["world_size"] == 2
    build_model(read_config(run_dir)).load_state_dict(state)
    return state


def assert_sharded_preempted_and_resumed(run, distributed_type: str) -> None:
    run_dir, preempted, resumed = run
    assert f"on 2 process(es), DistributedType.{distributed_type}" in preempted
    shares = sorted((int(r), kind, int(local), int(full)) for r, kind, local, full in SHARDING.findall(preempted))
    assert [r for r, *_ in shares] == [0, 1], preempted
    full = shares[0][3]
    assert all(kind == "sharded" and 0 < local < full and f == full for _, kind, local, f in shares), shares
    assert sum(local for _, _, local, _ in shares) >= full  # together the ranks hold the whole model
    step = int(re.search(r"preempted; resume state saved at step (\d+)", preempted).group(1))
    assert 0 < step < MAX_STEPS and f"trained {MAX_STEPS} steps" not in preempted
    assert f"resumed at step {step}" in resumed and resume_step(run_dir) == MAX_STEPS
    records = read_jsonl(run_dir / "train_metrics.jsonl")
    assert [r["step"] for r in records] == list(range(10, MAX_STEPS + 1, 10))
    assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in records)
    final_weights(run_dir)


def test_deepspeed_config_comes_from_the_training_config():
    config = compose_config("training_kwargs.max_grad_norm=0.5", "training_kwargs.batch_size=32",
                            "training_kwargs.gradient_accumulation_steps=2")
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}}
    configure_deepspeed(ds, config, num_processes=4)
    assert ds["gradient_clipping"] == 0.5 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 32
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}


def test_zero3_shards_parameters_saves_is_preempted_and_resumes(zero3):
    assert_sharded_preempted_and_resumed(zero3, "DEEPSPEED")


def test_fsdp2_shards_parameters_saves_is_preempted_and_resumes(fsdp):
    assert_sharded_preempted_and_resumed(fsdp, "FSDP")


def test_zero2_keeps_whole_parameters_on_each_rank_and_saves_them(zero2):
    run_dir, out = zero2
    assert "on 2 process(es), DistributedType.DEEPSPEED" in out
    shares = SHARDING.findall(out)
    assert len(shares) == 2 and all(kind == "replicated" and local == full for _, kind, local, full in shares)
    final_weights(run_dir)


def test_zero2_zero3_and_fsdp_reach_the_same_weights(zero2, zero3, fsdp):
    """The same global batches, clipping and schedule, interrupted (ZeRO-3, FSDP) or not (ZeRO-2): a lost optimizer
    or scheduler state on resume would show here (weights move by ~0.06 in these runs; they agree to ~1e-7)."""
    reference = final_weights(zero2[0])
    for run in (zero3, fsdp):
        weights = final_weights(run[0])
        for k in reference:
            assert torch.allclose(weights[k], reference[k], atol=1e-5), k


def test_fsdp_launch_without_gpus_is_refused_rather_than_training_unsynchronised_copies(tmp_path):
    result = subprocess.run(accelerate_launch("fsdp.yaml", "-m", "normscale.train", "name=refused", *ARGS), cwd=ROOT,
                            env={**os.environ, "CACHE_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "accelerate set up no data parallelism" in result.stderr and "launch/cpu.sh" in result.stderr
    assert not list(tmp_path.rglob("checkpoint-*"))


def test_repeated_two_process_ddp_launches_all_exit_cleanly(tmp_path):
    """Gloo's worker threads abort a fraction of 2-process runs at interpreter shutdown unless the worker ends
    through finish_process (INFRA.md): every launch must exit 0."""
    args = ["name=exits", *QUICK, *URNS, "training_kwargs.max_steps=4", "training_kwargs.warmup_steps=1",
            "training_kwargs.save_steps.schedule=end_only", "overwrite=true"]
    env = {**os.environ, "CACHE_DIR": str(tmp_path), "PYTHON": sys.executable}
    codes = []
    for _ in range(4):
        result = subprocess.run(["bash", str(ROOT / "launch/cpu.sh"), "2", "-m", "normscale.train", *args], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert "on 2 process(es)" in result.stdout, result.stderr[-3000:]
        codes.append(result.returncode)
    assert codes == [0, 0, 0, 0]
