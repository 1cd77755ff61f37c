"""`python -m normscale.data`, end to end in a fresh interpreter as a user runs it."""
from conftest import run_module

QUICK = ["experiment=demo", "training_kwargs.max_steps=300", "data_kwargs.shard_mb=0.5"]


def test_generates_then_verifies_and_repairs_corruption(tmp_path):
    env = {"CACHE_DIR": str(tmp_path)}
    first = run_module("normscale.data", *QUICK, env=env)
    assert first.returncode == 0, first.stderr
    assert "needs       train: 300 steps x 64 sequences: 5 shard(s) of 61 steps" in first.stdout
    assert "5 generated" not in first.stdout and "7 generated, 0 verified" in first.stdout
    assert "eval/id     512 sequences, content hash" in first.stdout and "eval/ood" in first.stdout
    second = run_module("normscale.data", *QUICK, env=env)
    assert "0 generated, 7 verified against the manifest" in second.stdout
    shard = next(tmp_path.glob("experiments/balls_and_urns/demo/data/*/train/shard-00002.h5"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    third = run_module("normscale.data", *QUICK, env=env)  # finds the altered shard and restores it
    assert third.returncode == 0, third.stderr
    assert f"repaired    {shard}: was altered: its sha256 differs from the manifest; regenerated, byte-identical" \
        in third.stdout
    assert "0 generated, 1 repaired, 7 verified against the manifest" in third.stdout
    data[len(data) // 2] ^= 1
    assert shard.read_bytes() == bytes(data)


def test_over_budget_names_the_size_and_the_generate_source(tmp_path):
    result = run_module("normscale.data", "setting=linear_regression", "task_kwargs.context_length=64",
                        "task_kwargs.num_dims=16", env={"CACHE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "need 55.8 GB of HDF5 shards (100000 steps x 557.6 KB per batch)" in result.stderr
    assert "data_kwargs.source=generate" in result.stderr and "needs       train" in result.stdout
    assert not list(tmp_path.rglob("*.h5"))


def test_a_sweep_prepares_each_dataset_and_leaves_nothing_in_the_working_directory(tmp_path):
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    result = run_module("normscale.data", "-m", "experiment=demo", "task_kwargs.num_tasks=4,8",
                        "training_kwargs.max_steps=100", cwd=work, env={"CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    datasets = sorted(p.name.split("-")[0] for p in (cache / "experiments/balls_and_urns/demo/data").iterdir())
    assert datasets == ["D4", "D8"] and list(work.iterdir()) == []
    assert (cache / "experiments/balls_and_urns/demo/multirun.yaml").exists()


def test_inspect_shards_prints_the_manifest_and_a_batch(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    run_module("normscale.data", *QUICK, env={"CACHE_DIR": str(tmp_path)})
    directory = next(tmp_path.glob("experiments/balls_and_urns/demo/data/*"))
    out = subprocess.run([sys.executable, str(ROOT / "tools/inspect_shards.py"), str(directory), "--step", "70"],
                         capture_output=True, text=True, check=True).stdout
    assert '"setting": "balls_and_urns"' in out and "train/shard-00001.h5" in out
    assert "step 70 (row 9 of shard-00001.h5):" in out and "tokens: [[8 " in out
