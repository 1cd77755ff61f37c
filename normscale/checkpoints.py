"""A run directory on disk: scheduled checkpoints, the rolling resume state, the saved config, metrics files.

    runs/<run_name>/             (the names: normscale.layout)
      config_resolved.yaml       the run's Config (loadable with Config.from_dict); overrides.json its overrides
      checkpoint-<step>/         model.safetensors (consolidated, loadable in one process), meta.json
      resume -> .resume-<step>   symlink to the one rolling resume state (Accelerate's save_state + state.json)
      .pack-<id>.json            while a pack publishes its runs' resume states together: the commit (commit_pack)
      train_metrics.jsonl        one line per logging step; eval_metrics.jsonl one line per evaluation

Every file and directory appears complete or not at all: files and checkpoint directories are written under a
temporary name and renamed; the resume symlink is replaced atomically, then the old state is removed.
No Accelerate here: the collective parts (gathering weights, save_state) live in normscale.dist.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from normscale.config import FaultError
from normscale.fileio import atomic_path, disk_full_guard, sha256_bytes, write_json
from normscale.layout import (EVAL_METRICS, PACK_JOURNAL_PREFIX, PACK_POINTER, RESUME_LINK, RESUME_PREFIX, RESUME_RECORD,
                              TRAIN_METRICS, checkpoint_dir, resume_state_dir, resume_states)

WEIGHTS = "model.safetensors"
def write_checkpoint(run_dir: Path, step: int, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write checkpoint-<step>/ (weights + meta.json with their size and sha256) under a temporary name, then rename
    it into place."""
    final = checkpoint_dir(run_dir, step)
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with disk_full_guard(final, "the checkpoints already written"):
        weights = save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
        (staging / WEIGHTS).write_bytes(weights)
        write_json(staging / "meta.json", {**meta, "files": {WEIGHTS: {"bytes": len(weights), "sha256": sha256_bytes(weights)}}})
    if final.exists():  # written again after a resume: the same weights; keep it with its metrics.pt
        if read_checkpoint_meta(final).get("files") == read_checkpoint_meta(staging)["files"]:
            shutil.rmtree(staging)
            return final
        shutil.rmtree(final)  # different weights (a damaged copy, or another code version): replaced
    os.replace(staging, final)
    return final


class CheckpointError(FaultError):
    """A checkpoint that is incomplete or whose files differ from the hashes recorded when it was written."""


def read_checkpoint_meta(path: Path) -> dict:
    meta_path = Path(path) / "meta.json"
    try:
        return json.loads(meta_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged: meta.json is missing or unreadable ({error}); "
                              "delete the directory (a resumed run writes it again at its step)") from None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of a checkpoint directory, in one process, on CPU; the weights are checked against the size
    and sha256 in meta.json (checkpoints written before normscale recorded them are loaded unchecked)."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    weights_path = path / WEIGHTS
    if not weights_path.exists():
        raise CheckpointError(f"checkpoint {path} is damaged: {WEIGHTS} is missing; delete the directory")
    weights = weights_path.read_bytes()
    recorded = meta.get("files", {}).get(WEIGHTS)
    if recorded and (len(weights) != recorded["bytes"] or sha256_bytes(weights) != recorded["sha256"]):
        raise CheckpointError(f"checkpoint {path} is damaged: {WEIGHTS} has {len(weights)} bytes and another sha256 "
                              f"than recorded ({recorded['bytes']} bytes); delete the directory")
    try:
        return load(weights), meta
    except SafetensorError as error:
        raise CheckpointError(f"checkpoint {path} is damaged: {WEIGHTS} does not load ({error}); "
                              "delete the directory") from None


def _file_hashes(directory: Path) -> dict[str, dict]:
    return {p.relative_to(directory).as_posix(): {"bytes": len(data := p.read_bytes()), "sha256": sha256_bytes(data)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in (RESUME_RECORD, PACK_POINTER)}


def resume_record(run_dir: Path, step: int, info: dict) -> dict:
    """The record of the staged state of `step` (written completely by every rank): `info`, the step, and the size
    and sha256 of each of its files."""
    return {**info, "step": step, "files": _file_hashes(resume_state_dir(run_dir, step))}


def publish_resume(run_dir: Path, step: int, record: dict) -> None:
    """Write the staged state's record (which makes it complete; a pack's pointer is then dropped), point `resume` at
    it, and drop every older state but the previous one (the fallback if this one is found damaged)."""
    run_dir = Path(run_dir)
    staging = resume_state_dir(run_dir, step)
    with disk_full_guard(staging, "the previous resume state and every checkpoint"):
        write_json(staging / RESUME_RECORD, record)
    (staging / PACK_POINTER).unlink(missing_ok=True)
    link = run_dir / RESUME_LINK
    previous = next((p.resolve() for p in resume_states(run_dir) if p != staging and (p / RESUME_RECORD).exists()), None)
    tmp_link = run_dir / f".{RESUME_LINK}.tmp-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(staging.name)
    os.replace(tmp_link, link)
    for state in resume_states(run_dir):
        if state.resolve() not in (staging.resolve(), previous):
            shutil.rmtree(state, ignore_errors=True)


def commit_pack(states: list[tuple[Path, int, dict]]) -> None:
    """Publish the staged resume states of a pack's runs, [(run directory, step, info)], as one transaction: each
    state points at the pack's journal, the journal (every state's record, in the first run's directory) is
    written, which commits them, then each is published and the journal removed. Killed before the journal is
    written, every run resumes from its previous state; after, `roll_forward` completes each run's state when its
    lock is next taken. The caller holds every run's lock."""
    finish_pack_save(write_pack_journal(states))


def write_pack_journal(states: list[tuple[Path, int, dict]]) -> Path:
    """The commit of a pack's save (see commit_pack)."""
    journal = Path(states[0][0]) / f"{PACK_JOURNAL_PREFIX}{uuid.uuid4().hex[:12]}.json"
    entries = []
    for run_dir, step, info in states:
        write_json(resume_state_dir(run_dir, step) / PACK_POINTER, {"journal": os.path.relpath(journal, run_dir)})
        entries.append({"run": os.path.relpath(run_dir, journal.parent), "step": step,
                        "record": resume_record(run_dir, step, info)})
    with disk_full_guard(journal, "the previous resume states and every checkpoint"):
        write_json(journal, {"states": entries})
    return journal


def finish_pack_save(journal: Path) -> None:
    """Publish every state of a committed pack save that is not yet published, then drop its journal."""
    for run_dir, entry in _awaiting(journal):
        publish_resume(run_dir, entry["step"], entry["record"])
    journal.unlink()


def _awaiting(journal: Path) -> list[tuple[Path, dict]]:
    """The states of a pack journal that are staged and not yet published: [(run directory, entry)]."""
    try:
        entries = json.loads(journal.read_text())["states"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError):
        raise FaultError(f"the pack journal {journal} is damaged, so whether its save was committed is unknown: delete "
                         "it, and the runs that still await it resume from their previous resume state") from None
    pending = [(Path(os.path.normpath(journal.parent / e["run"])), e) for e in entries]
    return [(run_dir, e) for run_dir, e in pending
            if resume_state_dir(run_dir, e["step"]).is_dir()
            and not (resume_state_dir(run_dir, e["step"]) / RESUME_RECORD).exists()]


def roll_forward(run_dir: Path) -> list[str]:
    """Publish this run's staged resume states that a pack committed (its journal names them) but did not finish
    publishing; lines saying so. Uncommitted ones are left to `remove_temporaries`. Only the lock holder calls it,
    before anything reads the run's resume states."""
    run_dir, notes = Path(run_dir), []
    for state in resume_states(run_dir):
        pointer = state / PACK_POINTER
        if (state / RESUME_RECORD).exists() or not pointer.exists():
            continue
        journal = Path(os.path.normpath(run_dir / json.loads(pointer.read_text())["journal"]))
        if not journal.exists():  # the pack was killed before committing this save
            continue
        step = int(state.name.removeprefix(RESUME_PREFIX))
        for pending, entry in _awaiting(journal):
            if pending.resolve() == run_dir.resolve() and entry["step"] == step:
                publish_resume(run_dir, step, entry["record"])
                notes.append(f"completed the pack's resume state at step {step}, committed before a kill")
    return notes
def damage(state: Path) -> str | None:
    """What is wrong with a resume state directory (None: intact): its record and every file it lists."""
    try:
        record = json.loads((state / RESUME_RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return f"{RESUME_RECORD} is missing or unreadable (a save that did not finish)"
    for name, entry in record.get("files", {}).items():
        path = state / name
        if not path.is_file():
            return f"{name} is missing"
        data = path.read_bytes()
        if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
            return f"{name} differs from its recorded size and sha256"
    return None


def choose_resume(run_dir: Path) -> tuple[Path | None, dict | None, list[str]]:
    """(the newest intact resume state, its record, lines about damaged newer ones, which are deleted). States are
    tried newest first; (None, None, lines) when none is intact."""
    notes = []
    for state in resume_states(run_dir):
        reason = damage(state)
        if reason is None:
            return state, json.loads((state / RESUME_RECORD).read_text()), notes
        notes.append(f"resume state {state.name} is damaged ({reason}); deleted")
        shutil.rmtree(state)
    return None, None, notes


def remove_temporaries(run_dir: Path) -> None:
    """Drop what writers killed mid-write left behind (staged checkpoints, temporary files, unfinished resume
    states, pack journals that no run still awaits); only the run's lock holder may call it, after `roll_forward`."""
    states = set(resume_states(run_dir))
    for path in Path(run_dir).iterdir():
        unfinished = path in states and not (path / RESUME_RECORD).exists()
        spent = path.name.startswith(PACK_JOURNAL_PREFIX) and path.is_file() and not _awaiting(path)
        if ".tmp-" in path.name or unfinished or spent:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def intact_records(path: Path) -> tuple[list[dict], int]:
    """(the records of a metrics file that parse, how many lines do not): a line cut short by a kill, or damaged."""
    records, damaged = [], 0
    for line in Path(path).read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            damaged += 1
    return records, damaged


def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics file; a last line cut short by a kill is ignored."""
    if not Path(path).exists():
        return []
    lines = Path(path).read_text().splitlines()
    records = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            records.append(json.loads(lines[-1]))
        except json.JSONDecodeError:  # a run killed mid-write; resuming rewrites the file without it
            pass
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records after `step` (written by a run that was killed later than its resume state)."""
    for name in (TRAIN_METRICS, EVAL_METRICS):
        path = Path(run_dir) / name
        if path.exists():
            records, damaged = intact_records(path)
            if damaged:
                print(f"normscale: {path} had {damaged} damaged line(s); dropped, the intact records are kept", flush=True)
            kept = [r for r in records if r["step"] <= step]
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
