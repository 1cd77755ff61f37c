"""Eval sets of any size: block 0 is the eval set a dataset always had, further blocks extend it (issue 14).

An existing experiment's data (tests/fixtures/pre_eval_blocks, prepared before blocks existed) evaluated beyond its
saved size keeps its files, its key and its first eval_size sequences; a set of k blocks is a prefix of a set of k+1
whatever the order they were made in; a damaged block is named with the command that repairs it."""
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, compose_config, run_module, small_config
from faults import at_once
from normscale.data import DataIntegrityError, load_eval_splits, plan_data, prepare_data
from normscale.data.store import content_hash, extend_eval_set, read_manifest
from normscale.eval import ModelEvaluator
from normscale.results import load_metrics

FIXTURE = ROOT / "tests" / "fixtures" / "pre_eval_blocks"
_spec = importlib.util.spec_from_file_location("make_pre_eval_blocks", FIXTURE / "make.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)

SAVED = 24  # the fixture's data_kwargs.eval_size: sequences per split in block 0
BEYOND = ["eval_kwargs.batch_size=8", "eval_kwargs.num_eval_batches=5"]  # 40 sequences: blocks 0 and 1
TRAIN = ["training_kwargs.max_steps=4", "training_kwargs.warmup_steps=2", "training_kwargs.eval_every=2",
         "training_kwargs.save_steps.schedule=end_only", "model_kwargs.hidden_size=8", "model_kwargs.num_heads=2",
         "logging.wandb=false"]


def cli(module: str, cache, *args: str):
    result = run_module(module, f"cache_dir={cache}", *make.OVERRIDES, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_an_existing_experiment_is_evaluated_beyond_its_saved_eval_set(tmp_path):
    cache = tmp_path / "cache"
    data = cache / "experiments" / make.SETTING / make.NAME / "data"
    shutil.copytree(FIXTURE / "data", data)
    (dataset,) = data.iterdir()
    before = {p.name: p.read_bytes() for p in dataset.iterdir()}
    old_manifest = json.loads(before["manifest.json"])

    cli("normscale.train", cache, *TRAIN, *BEYOND)
    cli("normscale.eval", cache, *TRAIN, *BEYOND)
    cli("normscale.eval", cache, *BEYOND, "model=bayes", "model_kwargs.kind=generalizing",
        "eval_kwargs.return_all=true")

    assert [d.name for d in data.iterdir()] == [dataset.name]  # the same key: no second dataset
    assert all((dataset / name).read_bytes() == content for name, content in before.items() if name != "manifest.json")
    manifest = read_manifest(dataset)
    assert {k: manifest[k] for k in ("key", "spec", "steps_per_shard")} == {
        k: old_manifest[k] for k in ("key", "spec", "steps_per_shard")}
    assert {n: manifest["files"][n] for n in old_manifest["files"]} == old_manifest["files"]
    assert sorted(manifest["files"]) == ["eval.h5", "eval/block-00001.h5", "tasks.h5"]

    # training-time evaluation and normscale.eval read the same 40 sequences
    (run,) = [r for r in (data.parent / "runs").iterdir() if not r.name.startswith("bayes-")]
    in_training = json.loads((run / "eval_metrics.jsonl").read_text().splitlines()[-1])
    evaluated = load_metrics(run / "checkpoint-4" / "metrics.pt")
    for split in ("id", "ood"):
        assert evaluated["splits"][split]["num_sequences"] == 40
        assert evaluated["splits"][split]["scalars"]["loss"] == pytest.approx(in_training[split]["loss"], rel=1e-6)
    bayes = load_metrics(next((data.parent / "runs" / "bayes-generalizing").iterdir()) / "metrics.pt")
    assert bayes["eval_hashes"] == {n: manifest["files"][n]["sha256"] for n in manifest["files"]}

    # the first eval_size sequences are the saved set of before, scored as before
    config = compose_config(f"cache_dir={cache}", *make.OVERRIDES)
    assert plan_data(config).directory == dataset
    fresh = prepare_data(compose_config(f"cache_dir={tmp_path / 'fresh'}", *make.OVERRIDES)).plan.directory
    assert fresh.name == dataset.name and all((fresh / n).read_bytes() == before[n] for n in ("tasks.h5", "eval.h5"))
    within = ModelEvaluator(config)
    assert all(len(a["task_ids"]) == SAVED for a in within.splits.values())
    predictor = within.predictor("generalizing")
    for split in ("id", "ood"):
        assert torch.equal(bayes["predictions"][split][:SAVED], within.predict(predictor, split)[0])


@pytest.mark.parametrize("setting", ["balls_and_urns", "classification"])
def test_a_set_of_k_blocks_is_a_prefix_of_k_plus_1_in_either_order(tmp_path, setting):
    size = 16  # data_kwargs.eval_size: one block
    configs = [small_config(tmp_path / c, setting, f"data_kwargs.eval_size={size}", "data_kwargs.source=generate")
               for c in ("a", "b")]
    a, b = (prepare_data(c, train_shards=False).plan.directory for c in configs)
    small_then_large = [load_eval_splits(a, n) for n in (2 * size, size + 1, 3 * size)]
    large_then_small = [load_eval_splits(b, n) for n in (3 * size, size + 1, 2 * size)][::-1]
    for (x, y) in zip(small_then_large, large_then_small, strict=True):
        assert all(content_hash(x[s]) == content_hash(y[s]) for s in x)
    two, odd, three = small_then_large
    for s in three:
        assert {n: len(v) for n, v in odd[s].items()} == {n: size + 1 for n in odd[s]}
        for n in three[s]:
            assert np.array_equal(three[s][n][:2 * size], two[s][n]) and np.array_equal(two[s][n][:size + 1], odd[s][n])
        assert not np.array_equal(three[s]["task_ids"][:size], three[s]["task_ids"][size:2 * size])  # own streams
    files = [read_manifest(d)["files"] for d in (a, b)]
    assert files[0] == files[1] and sorted(files[0]) == ["eval.h5", "eval/block-00001.h5", "eval/block-00002.h5",
                                                          "tasks.h5"]
    for name in files[0]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert all(content_hash(load_eval_splits(a)[s]) == content_hash({n: v[:size] for n, v in three[s].items()})
               for s in three)  # block 0 alone is what load_eval_splits(directory) gives


def test_a_damaged_block_is_named_with_the_command_that_repairs_it(tmp_path):
    config = small_config(tmp_path, "balls_and_urns", "data_kwargs.eval_size=16", "data_kwargs.source=generate")
    directory = prepare_data(config, train_shards=False).plan.directory
    load_eval_splits(directory, 40)
    block = directory / "eval" / "block-00002.h5"
    original = block.read_bytes()
    altered = bytearray(original)
    altered[-200] ^= 0xFF
    for damage in (bytes(altered), original[:100]):
        block.write_bytes(damage)
        with pytest.raises(DataIntegrityError) as error:
            load_eval_splits(directory, 40)
        message = str(error.value)
        assert "\n" not in message and f"data file {block} is " in message
        assert "run `python -m normscale.data " in message and "to regenerate it" in message
        load_eval_splits(directory, 32)  # the blocks before it are intact
        repaired = prepare_data(config, train_shards=False, verify=True)  # what the advised command does
        assert list(repaired.repaired) == ["eval/block-00002.h5"] and block.read_bytes() == original
    (directory / "manifest.json").unlink()  # a rebuilt manifest keeps the blocks, compared with a fresh generation
    rebuilt = prepare_data(config, train_shards=False, verify=True)
    assert "eval/block-00002.h5" in rebuilt.manifest["files"] and block.read_bytes() == original


def _extend_in_process(directory, barrier, results):
    barrier.wait()
    results.put(extend_eval_set(directory, 64))


def test_two_processes_extending_at_once_write_one_copy(tmp_path):
    config = small_config(tmp_path, "balls_and_urns", "data_kwargs.eval_size=16", "data_kwargs.source=generate")
    directory = prepare_data(config, train_shards=False).plan.directory
    written = sorted(at_once(_extend_in_process, (directory,), processes=2, timeout=120))
    assert written == [[], ["eval/block-00001.h5", "eval/block-00002.h5", "eval/block-00003.h5"]]
    assert not [p for p in directory.rglob("*") if ".tmp-" in p.name]
    assert len(load_eval_splits(directory, 64)["id"]["task_ids"]) == 64
