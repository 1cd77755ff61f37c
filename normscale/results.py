"""A metrics file (`metrics.pt`, `metrics-single_task.pt`): written by normscale.eval, read by eval (is it done?)
and by normscale.collate. torch is imported only to read or write one, so a notebook reading an up-to-date
metrics.h5 never imports it.
"""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

from normscale.config import EvalConfig, FaultError
from normscale.fileio import atomic_path


def save_metrics(path: Path, results: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(results, tmp)


class MetricsError(FaultError):
    """A metrics file that does not load: truncated, changed since it was written, or not a metrics file."""


def load_metrics(path: Path) -> dict:
    """A metrics file's contents, verified first: every member of its zip archive against the CRC-32 that torch.save
    recorded (torch.load alone does not check them, so a flipped byte in a tensor would load silently). Raises
    MetricsError, one line naming the file, for a file that is missing, truncated, altered or not a metrics dict."""
    import torch

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            altered = archive.testzip()
        metrics = None if altered else torch.load(path, weights_only=True)
    except Exception as error:  # BadZipFile (truncated), UnpicklingError, RuntimeError, OSError: all "does not load"
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise MetricsError(f"{path} does not load ({type(error).__name__}: {reason})") from None
    if altered:
        raise MetricsError(f"{path} does not load: its member {altered} differs from the CRC-32 recorded when it "
                           "was written")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("splits"), dict):
        raise MetricsError(f"{path} does not load: it holds no normscale metrics (no splits)")
    return metrics


def eval_settings(eval_kwargs: dict, model: str | None = None) -> dict:
    """The eval settings that decide a metrics file's content, as compared between files and commands: eval_kwargs
    read through the schema (a key missing from an older file counts as its default), without `run` (it only
    selects runs) and without the keys the mode and model do not read (sequences_per_task outside single_task
    mode, num_eval_batches in it, strategy_loss_sequences except for model=bayes)."""
    settings = {**dataclasses.asdict(EvalConfig()), **eval_kwargs}
    settings.pop("run", None)
    settings.pop("num_eval_batches" if settings["mode"] == "single_task" else "sequences_per_task", None)
    if model != "bayes":
        settings.pop("strategy_loss_sequences", None)
    return settings


def settings_diff(saved: dict, wanted: dict) -> list[str]:
    """`key saved -> wanted` for every eval setting that differs."""
    return [f"eval_kwargs.{k} {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(saved.keys() | wanted.keys())
            if saved.get(k) != wanted.get(k)]


def existing_result(path: Path, wanted: dict, model: str, identity: str | None = None) -> tuple[str, str]:
    """What an existing metrics file is worth to a command that wants `wanted` eval settings (`eval_settings`):
    ("missing", ""), ("redo", why: it does not load, or it was made for another run identity than `identity`),
    ("other", the settings that differ) or ("done", "")."""
    if not Path(path).exists():
        return "missing", ""
    try:
        metrics = load_metrics(path)
    except MetricsError as error:
        return "redo", str(error)
    made_for = metrics.get("identity_hash")
    if identity is not None and made_for is not None and made_for != identity:
        return "redo", f"{path} was evaluated for another run identity ({made_for}) than its run's ({identity})"
    diff = settings_diff(eval_settings(metrics.get("eval_kwargs") or {}, model), wanted)
    return ("other", ", ".join(diff)) if diff else ("done", "")
