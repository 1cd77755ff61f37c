"""Repair that works: every data error names the data command, and running that command, literally as the message
gives it, restores exactly the damaged files, byte-identical to the originals (generation is deterministic: batch i
is a function of (seed, i)), leaving every other file untouched (same inode, same mtime)."""
import json
import re
import shlex
import shutil

import pytest

from conftest import compose_config, run_module, small_config
from faults import at_once, flip, one_error_line, tree_bytes, truncate
from normscale import settings
from normscale.data import ShardReader, load_eval_splits, load_single_task_split, load_task_pools, plan_data, prepare_data
from normscale.data.store import DataIntegrityError, read_manifest
from normscale.fileio import sha256_bytes

ADVICE = re.compile(r"run `(python -m normscale\.data [^`]+)`")


def setting_of(config):
    return settings.get(config.setting, config.task_kwargs)


def advised_overrides(message: str) -> list[str]:
    """The overrides of the one data command a message advises."""
    commands = ADVICE.findall(message)
    assert len(commands) == 1, message
    argv = shlex.split(commands[0])
    assert argv[:3] == ["python", "-m", "normscale.data"], commands[0]
    return argv[3:]


def follow(message: str, tmp_path):
    """Run the advised command as a user would paste it: another working directory, no CACHE_DIR in the
    environment (the command itself must say where the data are)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return run_module("normscale.data", *advised_overrides(message), cwd=elsewhere, env={"CACHE_DIR": None})


def error_of(read) -> str:
    """The message of the DataIntegrityError that `read()` raises: one line (the CLI prints it as one)."""
    with pytest.raises(DataIntegrityError) as error:
        read()
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def stats(directory) -> dict[str, tuple[int, int]]:
    return {p.relative_to(directory).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file()}


def repaired_lines(stdout: str) -> dict[str, str]:
    lines = [line.strip().removeprefix("repaired").strip() for line in stdout.splitlines()
             if line.strip().startswith("repaired ")]
    return dict(line.split(": ", 1) for line in lines)


def test_following_the_advice_restores_exactly_the_damaged_files(tmp_path):
    config = small_config(tmp_path / "cache", "balls_and_urns", "training_kwargs.max_steps=120")
    prepared = prepare_data(config)
    directory, S = prepared.plan.directory, prepared.plan.steps_per_shard
    assert prepared.plan.num_shards >= 5, "needs damaged and untouched shards"
    before, stat_before = tree_bytes(directory), stats(directory)
    damaged = ["train/shard-00000.h5", "train/shard-00001.h5", "train/shard-00002.h5", "eval.h5", "tasks.h5"]
    truncate(directory / "train/shard-00000.h5")
    flip(directory / "train/shard-00001.h5")
    (directory / "train/shard-00002.h5").unlink()
    flip(directory / "eval.h5")
    truncate(directory / "tasks.h5", keep=0.3)

    reads = {"train/shard-00000.h5": lambda: ShardReader(directory, setting_of(config), read_ahead=False).batch(0),
             "train/shard-00001.h5": lambda: ShardReader(directory, setting_of(config), read_ahead=False).batch(S + 1),
             "train/shard-00002.h5": lambda: ShardReader(directory, setting_of(config), read_ahead=False).batch(2 * S),
             "eval.h5": lambda: load_eval_splits(directory),
             "tasks.h5": lambda: load_task_pools(directory)}
    messages = {name: error_of(read) for name, read in reads.items()}
    for name, message in messages.items():
        assert f"data file {directory / name} is " in message, message
        assert "regenerate it" in message and "delete" not in message  # no step before the command
    assert "is missing" in messages["train/shard-00002.h5"] and "truncated" in messages["tasks.h5"]
    assert "sha256 differs" in messages["train/shard-00001.h5"]
    training = error_of(lambda: prepare_data(config))  # what `python -m normscale.train` meets first
    assert f"{directory / 'tasks.h5'} is truncated" in training
    for message in [*messages.values(), training]:  # every advised command names this very dataset
        assert plan_data(compose_config(*advised_overrides(message))).directory == directory

    result = follow(messages["train/shard-00000.h5"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = repaired_lines(result.stdout)
    assert sorted(lines) == sorted(str(directory / name) for name in damaged), result.stdout
    assert all("byte-identical to the original" in what for what in lines.values())
    assert tree_bytes(directory) == before  # every file, manifest included, as it was before the damage
    after = stats(directory)
    untouched = [name for name in stat_before if name not in damaged]
    assert len(untouched) >= 5 and {n: after[n] for n in untouched} == {n: stat_before[n] for n in untouched}
    manifest = read_manifest(directory)
    assert all(sha256_bytes((directory / n).read_bytes()) == e["sha256"] for n, e in manifest["files"].items())
    ShardReader(directory, setting_of(config), read_ahead=False).batch(2 * S)
    again = follow(training, tmp_path)  # the training path's advice: nothing left to repair
    assert again.returncode == 0 and "repaired" not in again.stdout and stats(directory) == after, again.stdout


def test_a_damaged_manifest_is_rebuilt_from_the_files(tmp_path):
    config = small_config(tmp_path / "cache")
    directory = prepare_data(config).plan.directory
    before, stat_before = tree_bytes(directory), stats(directory)
    truncate(directory / "manifest.json")
    truncate(directory / "train/shard-00001.h5")  # damaged too: nothing records its hash any more
    reader = error_of(lambda: ShardReader(directory, setting_of(config)))
    assert f"{directory / 'manifest.json'} is damaged (not valid JSON" in reader and "rebuilds the manifest" in reader
    training = error_of(lambda: prepare_data(config))
    assert f"{directory / 'manifest.json'} is damaged (not valid JSON" in training

    result = follow(training, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = repaired_lines(result.stdout)
    assert sorted(lines) == [str(directory / "manifest.json"), str(directory / "train/shard-00001.h5")], result.stdout
    assert lines[str(directory / "manifest.json")].startswith("was damaged (not valid JSON")
    assert "identical and kept, 1 regenerated" in lines[str(directory / "manifest.json")]
    assert tree_bytes(directory) == before
    after = stats(directory)
    untouched = [n for n in stat_before if n not in ("manifest.json", "train/shard-00001.h5")]
    assert {n: after[n] for n in untouched} == {n: stat_before[n] for n in untouched}


def test_a_manifest_describing_other_data_is_rebuilt_by_the_data_command(tmp_path):
    config = small_config(tmp_path / "cache")
    directory = prepare_data(config).plan.directory
    before, stat_before = tree_bytes(directory), stats(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["spec"]["seed"] = 7  # valid JSON, other data: nothing it says about the files can be trusted
    (directory / "manifest.json").write_text(json.dumps(manifest))
    message = error_of(lambda: prepare_data(config))
    assert f"{directory / 'manifest.json'} is altered: it describes other data" in message
    assert plan_data(compose_config(*advised_overrides(message))).directory == directory
    rebuilt = prepare_data(config, verify=True)
    assert list(rebuilt.repaired) == ["manifest.json"] and rebuilt.repaired["manifest.json"].startswith("was altered")
    assert tree_bytes(directory) == before
    after = stats(directory)
    assert {n: after[n] for n in after if n != "manifest.json"} == {n: stat_before[n] for n in after if n != "manifest.json"}


def test_a_file_that_cannot_be_reproduced_is_named_and_the_advice_still_works(tmp_path):
    """A manifest whose hash no fresh generation gives (data made by another version): nothing wrong is installed,
    and the advice (delete the dataset, run the command) works when followed."""
    config = small_config(tmp_path / "cache")
    directory = prepare_data(config).plan.directory
    original = (directory / "tasks.h5").read_bytes()
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["tasks.h5"]["sha256"] = "0" * 64
    (directory / "manifest.json").write_text(json.dumps(manifest))
    truncate(directory / "tasks.h5")
    damaged = (directory / "tasks.h5").read_bytes()
    message = error_of(lambda: load_task_pools(directory))

    result = follow(message, tmp_path)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"cannot restore {directory / 'tasks.h5'} byte-identically" in line
    assert (directory / "tasks.h5").read_bytes() == damaged  # nothing installed that the manifest does not vouch for
    deleted = re.search(r"delete (\S+) and run `", line)
    assert deleted and deleted.group(1) == str(directory), line
    shutil.rmtree(deleted.group(1))
    anew = follow(line, tmp_path)
    assert anew.returncode == 0, anew.stderr
    assert (directory / "tasks.h5").read_bytes() == original


@pytest.mark.parametrize("setting, extra", [
    ("balls_and_urns", ["task_kwargs.dirichlet_alpha=0.5", "training_kwargs.max_steps=10",
                        "training_kwargs.save_steps.schedule=end_only"]),
    ("linear_regression", ["task_kwargs.noise_variance=0.25", "++task_kwargs.exemplar_noise=0.2",
                           "data_kwargs.eval_size=100", "training_kwargs.batch_size=4"]),
    ("classification", ["task_kwargs.prior=power_law", "task_kwargs.prior_exponent=1.5", "data_kwargs.source=generate"]),
])
def test_the_advised_command_names_the_same_dataset_in_every_setting(tmp_path, setting, extra):
    cache = tmp_path / "a cache, with a space"  # the command must quote it for the shell and for Hydra
    config = small_config(f"'{cache}'", setting, *extra)
    assert config.cache_dir == str(cache)
    directory = prepare_data(config).plan.directory
    before = tree_bytes(directory)
    for read in (lambda: load_eval_splits(directory), lambda: prepare_data(config)):  # a reader's, training's
        (directory / "eval.h5").unlink()
        message = error_of(read)
        followed = compose_config(*advised_overrides(message))
        repaired = prepare_data(followed, verify=True)
        assert repaired.plan.directory == directory and repaired.generated == [], message
        assert list(repaired.repaired) == ["eval.h5"] and tree_bytes(directory) == before


def test_repair_covers_every_listed_file_whatever_max_steps_asks(tmp_path):
    """Shards of a longer run and single-task eval files are part of the dataset: the data command of a shorter run
    verifies and repairs them too."""
    short, longer = small_config(tmp_path / "cache"), small_config(tmp_path / "cache", "balls_and_urns",
                                                                   "training_kwargs.max_steps=150")
    directory = prepare_data(longer).plan.directory
    assert plan_data(short).num_shards < plan_data(longer).num_shards
    load_single_task_split(short, 2)
    before = tree_bytes(directory)
    last = sorted(n for n in before if n.startswith("train/"))[-1]
    flip(directory / last)
    (directory / "single_task-2.h5").unlink()
    assert prepare_data(short).repaired == {}  # training's quick check looks at its own files only
    repaired = prepare_data(short, verify=True)
    assert sorted(repaired.repaired) == sorted([last, "single_task-2.h5"])
    assert tree_bytes(directory) == before


def _repair_in_process(cache_dir, barrier, results):
    config = small_config(cache_dir)
    barrier.wait()
    results.put(sorted(prepare_data(config, verify=True).repaired))


def test_two_repairs_at_once_regenerate_each_file_once(tmp_path):
    cache = tmp_path / "cache"
    directory = prepare_data(small_config(cache)).plan.directory
    before = tree_bytes(directory)
    truncate(directory / "train/shard-00000.h5")
    flip(directory / "eval.h5")
    reports = sorted(at_once(_repair_in_process, (cache,), processes=2, timeout=240))
    assert reports == [[], ["eval.h5", "train/shard-00000.h5"]]  # one repaired, the other found them repaired
    assert tree_bytes(directory) == before
    assert not [p for p in directory.rglob("*") if ".tmp-" in p.name]
