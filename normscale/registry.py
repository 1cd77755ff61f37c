"""The registry of settings (task families): which exist, where their modules are, and their torch-free facts.
Standard library only: config validation and the analysis read it without importing torch (normscale.settings
re-exports it as the package's face).

A setting is one module (normscale/settings/<name>.py for the three of SPEC A) whose `Setting` subclass implements
the protocol of normscale.settings.base: batch layout, task drawing and sequence sampling, eval splits, what a
trained network reads and predicts, the training objective, losses and pointwise metrics, the M / G / Const
predictors. Its registration names that module and states the torch-free `Facts` the analysis needs. Settings
defined outside normscale register through the environment: NORMSCALE_SETTINGS="<module>[,<module>...]" names
modules that call `settings.register(...)` when imported (tests/toy_setting.py is one).

    get("balls_and_urns", task)   the setting object for a TaskConfig (imports its module, and torch)
    facts("balls_and_urns")       its torch-free facts
    names()                       every registered name
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

PLUGINS_VARIABLE = "NORMSCALE_SETTINGS"


@dataclass(frozen=True)
class Facts:
    """What the analysis knows of a setting without torch (SPEC D).

    output         how predictions are compared: "categorical" (log-probabilities, KL) or "regression" (squared error)
    report_metric  the metric the report and figures show per D (a name of the setting's pointwise metrics)
    fit_start      (beta, alpha, gamma) the normative fit starts from
    prior_numbers  numbers the generalizing strategy stores: its task prior's hyperparameters
    task_numbers   numbers the memorizing strategy stores for D tasks of num_dims dimensions
    task_bits      bits it stores besides those numbers (classification's one-bit labels)
    min_dims       the smallest num_dims the setting allows
    """

    output: str
    report_metric: str
    fit_start: tuple[float, float, float]
    prior_numbers: int
    task_numbers: Callable[[int, int], int]
    task_bits: Callable[[int], int] = lambda num_tasks: 0
    min_dims: int = 1


@dataclass(frozen=True)
class Registration:
    module: str  # imported by `get`; defines SETTING, the Setting subclass
    facts: Facts


_REGISTRY: dict[str, Registration] = {
    "balls_and_urns": Registration("normscale.settings.balls_and_urns", Facts(
        output="categorical", report_metric="kl", fit_start=(0.2, 0.6, 0.85), prior_numbers=1,
        task_numbers=lambda D, d: D * (d - 1), min_dims=2)),
    "linear_regression": Registration("normscale.settings.linear_regression", Facts(
        output="regression", report_metric="loss", fit_start=(0.3, 0.65, 0.01), prior_numbers=2,
        task_numbers=lambda D, d: D * d)),
    "classification": Registration("normscale.settings.classification", Facts(
        output="categorical", report_metric="loss", fit_start=(0.12, 0.8, 1.5), prior_numbers=1,
        task_numbers=lambda D, d: D * d, task_bits=lambda D: D)),
}
_plugins_loaded = False


def register(name: str, module: str, facts: Facts) -> None:
    """Add a setting: `module` defines SETTING (a normscale.settings.base.Setting subclass)."""
    if name in _REGISTRY and _REGISTRY[name].module != module:
        raise ValueError(f"setting {name!r} is registered already, by {_REGISTRY[name].module}")
    _REGISTRY[name] = Registration(module, facts)


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for module in filter(None, os.environ.get(PLUGINS_VARIABLE, "").split(",")):
            importlib.import_module(module.strip())


def names() -> tuple[str, ...]:
    _load_plugins()
    return tuple(_REGISTRY)


def _registration(name: str) -> Registration:
    if name not in names():
        raise ValueError(f"unknown setting {name!r}; choose one of: {', '.join(names())} (settings defined elsewhere "
                         f"register through {PLUGINS_VARIABLE}=<module>)")
    return _REGISTRY[name]


def facts(name: str) -> Facts:
    return _registration(name).facts


def setting_class(name: str) -> type:
    return importlib.import_module(_registration(name).module).SETTING


def get(name: str, task):
    """The setting `name` for a TaskConfig."""
    return setting_class(name)(task)
