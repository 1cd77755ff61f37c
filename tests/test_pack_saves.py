"""A pack's resume states are saved together and committed as one transaction (normscale.checkpoints.commit_pack,
normscale.train.PackSaves): a kill never leaves a pack's runs at different saves."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import save_file
import torch

from conftest import ROOT, run_module
from normscale.checkpoints import (choose_resume, commit_pack, publish_resume, remove_temporaries, resume_record,
                                   roll_forward, write_pack_journal)
from normscale.config import FaultError
from normscale.layout import PACK_JOURNAL_PREFIX, RESUME_RECORD, resume_state_dir, resume_step
from test_pack_forming import SWEEP, run_files


def stage(run_dir, step: int) -> None:
    """What stage_resume leaves: a state directory with its files and no record yet."""
    resume_state_dir(run_dir, step).mkdir(parents=True)
    save_file({"w": torch.full((4,), float(step))}, resume_state_dir(run_dir, step) / "model.safetensors")


@pytest.fixture
def runs(tmp_path):
    """Three runs of a pack whose save at step 4 is published and whose save at step 8 is staged."""
    runs = [tmp_path / "runs" / f"run{k}" for k in range(3)]
    for run in runs:
        stage(run, 4)
        publish_resume(run, 4, resume_record(run, 4, {}))
        stage(run, 8)
    return runs


def journals(runs) -> list:
    return [p for run in runs for p in run.glob(f"{PACK_JOURNAL_PREFIX}*")]


def test_a_save_killed_before_its_commit_leaves_every_run_at_its_previous_state(runs):
    for run in runs:
        assert roll_forward(run) == []
        remove_temporaries(run)
    assert [resume_step(run) for run in runs] == [4, 4, 4]
    assert not any(resume_state_dir(run, 8).exists() for run in runs)


def test_a_save_killed_after_its_commit_is_completed_by_each_run_when_it_is_next_claimed(runs):
    journal = write_pack_journal([(run, 8, {"identity_hash": "x"}) for run in runs])
    publish_resume(runs[0], 8, resume_record(runs[0], 8, {"identity_hash": "x"}))  # killed after the first publish
    assert [resume_step(run) for run in runs] == [8, 4, 4]
    remove_temporaries(runs[0])  # the journal's run, claimed first: the others still need the journal
    assert journal.exists()
    assert roll_forward(runs[2]) == ["completed the pack's resume state at step 8, committed before a kill"]
    remove_temporaries(runs[2])
    assert journal.exists()
    assert roll_forward(runs[1]) and [resume_step(run) for run in runs] == [8, 8, 8]
    for run in runs:
        state, record, notes = choose_resume(run)  # the record the journal kept verifies the files
        assert state == resume_state_dir(run, 8) and record["identity_hash"] == "x" and notes == []
        assert not (state / "pack.json").exists()
    remove_temporaries(runs[0])  # no run awaits it any more
    assert journals(runs) == []


def test_a_completed_save_leaves_no_journal_and_the_solo_format(runs):
    commit_pack([(run, 8, {}) for run in runs])
    assert [resume_step(run) for run in runs] == [8, 8, 8] and journals(runs) == []
    assert [sorted(p.name for p in resume_state_dir(run, 8).iterdir()) for run in runs] == \
        [["model.safetensors", RESUME_RECORD]] * 3


def test_a_damaged_journal_is_named_with_the_way_out(runs):
    journal = write_pack_journal([(run, 8, {}) for run in runs])
    journal.write_bytes(journal.read_bytes()[:20])
    with pytest.raises(FaultError, match=f"the pack journal {journal} is damaged.*delete it"):
        roll_forward(runs[1])


KILLED = [*(a for a in SWEEP[:-3] if not a.startswith("training_kwargs.save_steps.")), "task_kwargs.num_tasks=2,4,8", "training_kwargs.learning_rate=0.001",
          "training_kwargs.max_steps=80", "training_kwargs.save_steps.schedule=linear_schedule",
          "training_kwargs.save_steps.num_checkpoints=80", "training_kwargs.save_steps.first_step=1", "pack=3"]  # one pack of 3 runs, saving at every step


def test_a_pack_sigkilled_at_random_moments_never_leaves_its_runs_at_different_saves(tmp_path):
    """SIGKILL at random moments of the pack's saves; after each kill every run's resume state (once the pending
    commit is completed, as the next launch does first) is at the same step, and the pack, run again until it
    finishes, ends with the files of an uninterrupted one."""
    whole = run_module("normscale.train", *KILLED, env={"CACHE_DIR": str(tmp_path / "whole")})
    assert whole.returncode == 0, whole.stderr[-2000:]
    cache, rng = tmp_path / "killed", random.Random(0)
    runs_dir = cache / "experiments" / "balls_and_urns" / "packed" / "runs"
    inside_a_save, kills = 0, 0
    while inside_a_save < 2:
        assert kills < 12, f"only {inside_a_save} of {kills} kills landed inside a save"
        proc = subprocess.Popen([sys.executable, "-m", "normscale.train", *KILLED], cwd=ROOT,
                                env={**os.environ, "CACHE_DIR": str(cache)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        seen = {run: resume_step(run) for run in runs_dir.iterdir()} if runs_dir.exists() else {}
        deadline = time.time() + 300
        while not any(resume_step(run) != seen.get(run) for run in runs_dir.glob("*")):  # this launch has saved
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        runs = sorted(runs_dir.iterdir())
        unfinished = [s for run in runs for s in run.glob(".resume-*") if not (s / RESUME_RECORD).exists()]
        inside_a_save += bool(unfinished or journals(runs))
        for run in runs:
            roll_forward(run)
        assert len({resume_step(run) for run in runs}) == 1, [resume_step(run) for run in runs]
    again = run_module("normscale.train", *KILLED, env={"CACHE_DIR": str(cache)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert run_files(cache) == run_files(tmp_path / "whole")
