"""The HDF5 store: step-indexed shards, data identity, manifest, corruption, budget, and concurrent generation."""
import json

import h5py
import numpy as np
import pytest
import torch

from conftest import small_config
from faults import at_once
from normscale import settings
from normscale.config import ConfigError
from normscale.data import (DataIntegrityError, GeneratedBatches, MixtureDataset, ShardReader, load_eval_splits,
                            load_task_pools, open_train_batches, plan_data, prepare_data)
from normscale.data.store import check_budget, content_hash, read_manifest
from normscale.fileio import atomic_path

SETTINGS = ["balls_and_urns", "linear_regression", "classification"]


def setting_of(config):
    return settings.get(config.setting, config.task_kwargs)


def file_hashes(directory):
    return {name: entry["sha256"] for name, entry in read_manifest(directory)["files"].items()}


@pytest.mark.parametrize("setting", SETTINGS)
def test_identical_config_and_seed_give_byte_identical_files(tmp_path, setting):
    a = prepare_data(small_config(tmp_path / "a", setting))
    b = prepare_data(small_config(tmp_path / "b", setting))
    assert a.plan.directory.name == b.plan.directory.name and a.plan.num_shards > 2
    for name in file_hashes(a.plan.directory):
        assert (a.plan.directory / name).read_bytes() == (b.plan.directory / name).read_bytes(), name
    other_seed = prepare_data(small_config(tmp_path / "c", setting, "seed=1"))
    assert file_hashes(other_seed.plan.directory)["train/shard-00000.h5"] != file_hashes(a.plan.directory)["train/shard-00000.h5"]


@pytest.mark.parametrize("setting", SETTINGS)
def test_batch_i_is_the_batch_of_step_i(cache_dir, setting):
    config = small_config(cache_dir, setting)
    prepared = prepare_data(config)
    reader = ShardReader(prepared.plan.directory, setting_of(config))
    tasks = load_task_pools(prepared.plan.directory)["train"]
    dataset = MixtureDataset(setting_of(config), tasks, config.task_kwargs.prior, 8, config.seed)
    S = prepared.plan.steps_per_shard
    for step in [0, 1, S - 1, S, 2 * S + 1, config.training_kwargs.max_steps - 1, 3, 0]:  # out of order: resume
        got, expected = reader.batch(step), dataset.batch(step)
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), (step, name)
    first = "tokens" if setting == "balls_and_urns" else "xs"
    assert not torch.equal(reader.batch(0)[first], reader.batch(1)[first])


@pytest.mark.parametrize("setting", SETTINGS)
def test_cpu_generate_source_equals_the_shards(cache_dir, setting):
    config = small_config(cache_dir, setting)
    prepared = prepare_data(config)
    generated = GeneratedBatches(config, load_task_pools(prepared.plan.directory)["train"])
    reader = ShardReader(prepared.plan.directory, setting_of(config))
    for step in (0, 7, 31):
        assert all(torch.equal(reader.batch(step)[n], t) for n, t in generated.batch(step).items())


def test_ranks_get_disjoint_complete_slices(cache_dir):
    config = small_config(cache_dir)
    prepared, setting = prepare_data(config), setting_of(config)
    whole = ShardReader(prepared.plan.directory, setting).batch(5)
    parts = [ShardReader(prepared.plan.directory, setting, rank, 4).batch(5) for rank in range(4)]
    for name in whole:
        assert all(len(p[name]) == 2 for p in parts)
        assert torch.equal(torch.cat([p[name] for p in parts]), whole[name])
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        ShardReader(prepared.plan.directory, setting, 0, 3)


def test_data_are_shared_by_what_determines_them(cache_dir):
    base = plan_data(small_config(cache_dir)).directory
    for same in ["model_kwargs.hidden_size=512", "training_kwargs.learning_rate=0.01", "model=mlp",
                 "training_kwargs.max_steps=300", "overwrite=true", "eval_kwargs.num_eval_batches=2"]:
        assert plan_data(small_config(cache_dir, "balls_and_urns", same)).directory == base, same
    for different in ["task_kwargs.num_tasks=9", "task_kwargs.prior=power_law", "task_kwargs.prior_exponent=2",
                      "seed=1", "training_kwargs.batch_size=16", "task_kwargs.context_length=13",
                      "task_kwargs.num_dims=5", "task_kwargs.dirichlet_alpha=0.5", "data_kwargs.eval_size=128"]:
        assert plan_data(small_config(cache_dir, "balls_and_urns", different)).directory != base, different


def test_longer_runs_reuse_existing_shards(cache_dir):
    first = prepare_data(small_config(cache_dir))
    longer = prepare_data(small_config(cache_dir, "balls_and_urns", "training_kwargs.max_steps=120"))
    assert longer.plan.directory == first.plan.directory
    assert longer.generated and all(name.startswith("train/") for name in longer.generated)
    assert not set(longer.generated) & set(first.generated)
    assert prepare_data(small_config(cache_dir)).generated == []


def test_manifest_records_shapes_dtypes_and_hashes(cache_dir):
    prepared = prepare_data(small_config(cache_dir, "classification"))
    directory, manifest = prepared.plan.directory, json.loads((prepared.plan.directory / "manifest.json").read_text())
    assert manifest["spec"]["setting"] == "classification" and manifest["key"] in directory.name
    shard = manifest["files"]["train/shard-00000.h5"]
    S = manifest["steps_per_shard"]
    assert shard["arrays"]["xs"] == {"shape": [S, 8, 8, 4], "dtype": "float32"}
    assert shard["arrays"]["labels"]["dtype"] == "int8" and shard["arrays"]["task_ids"]["shape"] == [S, 8]
    with h5py.File(directory / "train/shard-00000.h5") as f:
        for name, info in shard["arrays"].items():
            assert list(f[name].shape) == info["shape"] and str(f[name].dtype) == info["dtype"]
    assert set(manifest["files"]["eval.h5"]["arrays"]) >= {"id/xs", "ood/xs", "iwl/xs", "id/query_x"}
    splits = load_eval_splits(directory)
    with h5py.File(directory / "eval.h5") as f:
        assert all(f[s].attrs["content_hash"] == content_hash(splits[s]) for s in splits)
    assert set(prepare_data(small_config(cache_dir, "classification"), verify=True).verified) == set(manifest["files"])


def test_eval_sets_do_not_depend_on_batch_size(cache_dir):
    a = load_eval_splits(prepare_data(small_config(cache_dir)).plan.directory)
    b = load_eval_splits(prepare_data(small_config(cache_dir, "balls_and_urns", "training_kwargs.batch_size=4")).plan.directory)
    assert all(content_hash(a[s]) == content_hash(b[s]) for s in a)


def test_truncated_or_altered_shards_give_an_error_naming_the_file(cache_dir):
    config = small_config(cache_dir)
    directory = prepare_data(config).plan.directory
    shard = directory / "train/shard-00001.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataIntegrityError, match=f"{shard}.*truncated.*regenerate"):
        prepare_data(config)
    with pytest.raises(DataIntegrityError, match=str(shard)):
        ShardReader(directory, setting_of(config), read_ahead=False).batch(plan_data(config).steps_per_shard)
    altered = bytearray(data)
    altered[-100] ^= 0xFF
    shard.write_bytes(bytes(altered))
    prepare_data(config)  # sizes match: the quick check passes ...
    with pytest.raises(DataIntegrityError, match=f"{shard} is altered"):
        ShardReader(directory, setting_of(config), read_ahead=False).batch(plan_data(config).steps_per_shard)
    repaired = prepare_data(config, verify=True)  # ... the full one finds it and regenerates it, byte-identical
    assert list(repaired.repaired) == ["train/shard-00001.h5"] and "was altered" in repaired.repaired["train/shard-00001.h5"]
    assert shard.read_bytes() == data
    (directory / "eval.h5").write_bytes(b"x" * 10)
    with pytest.raises(DataIntegrityError, match="eval.h5"):
        load_eval_splits(directory)


def test_read_ahead_surfaces_errors_of_the_next_shard(cache_dir):
    config = small_config(cache_dir)
    directory = prepare_data(config).plan.directory
    S = plan_data(config).steps_per_shard
    (directory / "train/shard-00001.h5").write_bytes(b"")
    reader = ShardReader(directory, setting_of(config))
    reader.batch(0)  # starts reading shard 1 ahead, which fails on its thread
    with pytest.raises(DataIntegrityError, match="shard-00001.h5 is truncated"):
        reader.batch(S)


def test_shards_over_the_budget_are_refused_before_writing(cache_dir):
    config = small_config(cache_dir, "linear_regression", "training_kwargs.max_steps=100000", "data_kwargs.max_storage_gb=0.01")
    with pytest.raises(ConfigError, match=r"need 80.0 MB of HDF5 shards .* data_kwargs\.source=generate"):
        prepare_data(config)
    assert not cache_dir.exists()
    generate = small_config(cache_dir, "linear_regression", "training_kwargs.max_steps=100000",
                            "data_kwargs.max_storage_gb=0.01", "data_kwargs.source=generate")
    check_budget(generate, plan_data(generate))
    prepared = prepare_data(generate)
    assert sorted(prepared.generated) == ["eval.h5", "tasks.h5"]
    batches = open_train_batches(generate, prepared)
    assert isinstance(batches, GeneratedBatches) and batches.batch(99_999)["xs"].shape == (8, 6, 3)


def test_full_length_regression_exceeds_the_default_budget(cache_dir):
    from conftest import compose_config
    config = compose_config("setting=linear_regression", "task_kwargs.context_length=64", "task_kwargs.num_dims=16",
                            f"cache_dir={cache_dir}")
    with pytest.raises(ConfigError) as error:
        check_budget(config, plan_data(config))
    assert "GB of HDF5 shards" in str(error.value) and "max_storage_gb=10" in str(error.value)


def test_an_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "file.h5"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def _prepare_in_process(cache_dir, barrier, results):
    config = small_config(cache_dir, "balls_and_urns", "training_kwargs.max_steps=400")
    barrier.wait()
    prepared = prepare_data(config)
    results.put(prepared.generated)


def test_four_processes_asking_at_once_generate_one_copy(cache_dir):
    generated = at_once(_prepare_in_process, (cache_dir,), processes=4, timeout=240)
    assert sorted(len(g) > 0 for g in generated) == [False, False, False, True]  # exactly one generated
    config = small_config(cache_dir, "balls_and_urns", "training_kwargs.max_steps=400")
    again = prepare_data(config, verify=True)
    assert again.generated == [] and set(again.verified) == set(next(g for g in generated if g))
    directory = again.plan.directory
    assert not [p for p in directory.rglob("*") if ".tmp-" in p.name]
    assert [d.name for d in directory.parent.iterdir()] == [directory.name]


def test_default_eval_splits_hold_2048_sequences_each(cache_dir):
    from conftest import compose_config
    config = compose_config("setting=classification", f"cache_dir={cache_dir}", "data_kwargs.source=generate")
    assert config.data_kwargs.eval_size == 2048
    splits = load_eval_splits(prepare_data(config).plan.directory)
    assert {s: len(a["task_ids"]) for s, a in splits.items()} == {"id": 2048, "ood": 2048, "iwl": 2048}
    assert 490 <= splits["ood"]["task_ids"].max() < 500 and len(np.unique(splits["ood"]["task_ids"])) > 450  # 500 OOD tasks
