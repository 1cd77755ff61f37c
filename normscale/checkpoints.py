"""A run directory on disk: scheduled checkpoints, the rolling resume state, the saved config, metrics files.

    runs/<run_name>/             (the names: normscale.layout)
      config_resolved.yaml       the run's Config (loadable with Config.from_dict); overrides.json its overrides
      checkpoint-<step>/         model.safetensors (consolidated, loadable in one process), meta.json
      resume -> .resume-<step>   symlink to the one rolling resume state (Accelerate's save_state + state.json)
      train_metrics.jsonl        one line per logging step; eval_metrics.jsonl one line per evaluation

Every file and directory appears complete or not at all: files and checkpoint directories are written under a
temporary name and renamed; the resume symlink is replaced atomically, then the old state is removed.
No Accelerate here: the collective parts (gathering weights, save_state) live in normscale.dist.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from normscale.config import FaultError
from normscale.fileio import atomic_path, disk_full_guard, sha256_bytes, write_json
from normscale.layout import (EVAL_METRICS, RESUME_LINK, RESUME_RECORD, TRAIN_METRICS, checkpoint_dir, resume_state_dir,
                              resume_states)

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
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != RESUME_RECORD}


def publish_resume(run_dir: Path, step: int, info: dict) -> None:
    """Record the staged state of `step` (written completely by every rank) with the size and sha256 of each of its
    files, point `resume` at it, and drop every older state but the previous one (the fallback if this one is
    found damaged)."""
    run_dir = Path(run_dir)
    staging = resume_state_dir(run_dir, step)
    with disk_full_guard(staging, "the previous resume state and every checkpoint"):
        write_json(staging / RESUME_RECORD, {**info, "step": step, "files": _file_hashes(staging)})
    link = run_dir / RESUME_LINK
    previous = next((p.resolve() for p in resume_states(run_dir) if p != staging and (p / RESUME_RECORD).exists()), None)
    tmp_link = run_dir / f".{RESUME_LINK}.tmp-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(staging.name)
    os.replace(tmp_link, link)
    for state in resume_states(run_dir):
        if state.resolve() not in (staging.resolve(), previous):
            shutil.rmtree(state, ignore_errors=True)


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
    states); only the run's lock holder may call it."""
    states = set(resume_states(run_dir))
    for path in Path(run_dir).iterdir():
        unfinished = path in states and not (path / RESUME_RECORD).exists()
        if ".tmp-" in path.name or unfinished:
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
