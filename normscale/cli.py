"""What every `python -m normscale.<entry>` shares: .env, override checks, Hydra composition, the typed Config.

Hydra's DictConfig stops here: entry functions receive a validated `normscale.config.Config`.
Bad overrides are rejected before Hydra composes anything, with one line naming the key and what is allowed.
`python -m normscale.cli check [normscale.<entry>] [-m] <overrides>` validates a command's config without running it
(no torch import; for normscale.eval with model=llm also the model path): slurm/submit and the sbatch scripts call it
(or `sweep plan` / `sweep progress`, which validate alike) once before any worker starts, and launch/cpu.sh runs
`python -m normscale.cli launch-cpu`, which validates the same way and then launches. Errors are printed by rank 0
only (`fail`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import re
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from normscale import settings
from normscale.config import (Config, ConfigError, NormscaleError, RunFailedError, RunHeldError, RunRefusedError,
                              resolve_cache_dir, schema_keys)
from normscale.layout import find_experiments

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SITE_ENV = CONF_DIR.parent / "slurm" / "site.env"
GROUPS = ("setting", "model", "training", "eval", "experiment")


# Errors every process of a multi-process job meets alike (bad input, a diverged run: the loss check is collective,
# a held run: rank 0 holds the lock, an interrupt): only rank 0 says so. A fault met while running (1) can be one
# rank's own: the other ranks report it too, as `normscale: rank N: ...` (not a second error line).
SAME_ON_EVERY_RANK = (2, 3, 75, 130)


def fail(message: str, code: int = 2):
    """Print `normscale: error: <message>` (rank 0 only, see SAME_ON_EVERY_RANK) and exit with `code`."""
    from normscale.dist import process_info

    info = process_info()
    if info.is_main:
        print(f"normscale: error: {message}", file=sys.stderr, flush=True)
    elif code not in SAME_ON_EVERY_RANK:
        print(f"normscale: rank {info.rank}: {message}", file=sys.stderr, flush=True)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sys.stdout.flush()
        os._exit(code)  # gloo's threads can abort a normal interpreter exit (INFRA.md), and the launcher would then
        # kill the other ranks before they report their own code
    sys.exit(code)


def group_choices(group: str) -> list[str]:
    """The config files of a group; for `setting`, also the settings registered from outside normscale (their
    config files come through hydra.searchpath)."""
    files = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    return sorted(files | set(settings.names()) if group == "setting" else files)


def check_overrides(args: list[str]) -> None:
    """Reject unknown keys and unknown group choices among command-line overrides (raises ConfigError)."""
    keys = schema_keys()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        raw_key, value = arg.split("=", 1)
        key = raw_key.lstrip("+~")
        if key == "experiment" and raw_key.startswith("+"):
            raise ConfigError(f"choose presets with experiment={value} (no '+'): experiment is in the defaults list")
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if key in GROUPS:
            allowed = group_choices(key) + (["null"] if key == "experiment" else [])
            explicit = [] if any(c in value for c in "()$[") else value.split(",")
            for choice in explicit:
                trained = trained_experiment(choice, args) if key == "experiment" and choice not in allowed else None
                if trained is not None:
                    setting = "" if trained.parent.name == "balls_and_urns" else f" setting={trained.parent.name}"
                    raise ConfigError(f"experiment={choice} selects a preset, and there is none named {choice}; "
                                      f"{trained} is a trained experiment: select it with name={choice}{setting}")
                if choice not in allowed:
                    raise ConfigError(f"{key}={choice!r} is not a known {key}; choose one of: {', '.join(allowed)} "
                                      f"(files in {CONF_DIR / key})")
        elif key not in keys and not any(k.startswith(key + ".") for k in keys):
            section = key.rpartition(".")[0]
            section = section if allowed_keys(section) else ""
            raise ConfigError(f"unknown key {key}; allowed keys{' in ' + section if section else ''}: "
                              f"{', '.join(allowed_keys(section))}")


def allowed_keys(section: str) -> list[str]:
    """The keys one level below `section` ("" for the top level) in the schema."""
    prefix = f"{section}." if section else ""
    return sorted({k[len(prefix):].split(".")[0] for k in schema_keys() if k.startswith(prefix)})


def command_line_cache_dir(args: list[str]) -> Path:
    """The cache directory a command line names (cache_dir=), else CACHE_DIR, else ./cache."""
    cache = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("cache_dir=")]
    return resolve_cache_dir(cache[-1] if cache else None)


def trained_experiment(name: str, args: list[str]) -> Path | None:
    """The directory of a trained experiment called `name` in any setting (normscale.layout.find_experiments) under
    the command line's cache directory; None when there is none."""
    if not re.fullmatch(r"[\w.+-]+", name):
        return None
    return next(iter(find_experiments(command_line_cache_dir(args), name)), None)


def to_config(cfg) -> Config:
    """A composed Hydra config -> the validated Config (CACHE_DIR resolved to an absolute path, and usable)."""
    from omegaconf import OmegaConf

    with hydra_errors():
        raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    raw["cache_dir"] = str(resolve_cache_dir(raw.get("cache_dir")))
    config = Config.from_dict(raw)
    check_cache_dir(Path(config.cache_dir))
    return config


@contextlib.contextmanager
def hydra_errors():
    """Hydra's and OmegaConf's errors (override grammar, composition, interpolation) as one-line ConfigErrors."""
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (HydraException, OmegaConfBaseException) as error:
        text = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, OverrideParseException):
            text = f"cannot parse the override {error.override!r}: {text}"
        raise ConfigError(text) from None


_USABLE_CACHE_DIRS: set[Path] = set()


def check_cache_dir(path: Path) -> None:
    """CACHE_DIR must be a directory in which this process can make directories, or one it can create: probed by
    making and removing a temporary directory in it (or in its nearest existing parent), so nothing is left behind
    and nothing is created before the command's own work. ConfigError (exit 2) otherwise."""
    if path in _USABLE_CACHE_DIRS:
        return
    hint = "set CACHE_DIR to a writable directory"
    existing = path
    while not existing.is_dir():
        if existing.exists() or existing.is_symlink():  # a file (or a dangling link) where a directory must be
            raise ConfigError(f"cannot create CACHE_DIR={path}: {existing} is not a directory; {hint}")
        existing = existing.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".normscale-probe-", dir=existing))
    except OSError as error:
        what = f"write in CACHE_DIR={path}" if existing == path else f"create CACHE_DIR={path}"
        where = "" if existing == path else f" (in {existing})"
        raise ConfigError(f"cannot {what}: {error.strerror or error}{where}; {hint}") from None
    _USABLE_CACHE_DIRS.add(path)


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_TIMEOUT_S = 3.0


def check_llm_path(config: Config) -> None:
    """model=llm: the setting is balls_and_urns, and `model_kwargs.model_path` is a local model directory, a hub id
    already in the hub cache, or a hub id with the hub reachable (one connection attempt of HUB_TIMEOUT_S, no
    retries); ConfigError (exit 2) otherwise, at once, instead of transformers' minute of retries and a traceback."""
    if config.model != "llm":
        return
    if config.setting != "balls_and_urns":
        raise ConfigError(f"model=llm evaluates balls_and_urns sequences (SPEC F), not setting={config.setting}")
    path = config.model_kwargs.model_path
    if not path:
        raise ConfigError("model=llm needs model_kwargs.model_path=<local directory or hub id>")
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model_kwargs.model_path={path} is a directory without config.json: pass a directory "
                              "written by save_pretrained (or a hub id)")
        return
    if local.exists() or path.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(path):
        raise ConfigError(f"model_kwargs.model_path={path} is not a local directory (nor a hub id such as org/name)")
    if hub_cached(path):
        return
    offline = [v for v in OFFLINE_VARIABLES if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    if offline:
        raise ConfigError(f"model_kwargs.model_path={path} is not a local directory nor in the hub cache, and "
                          f"{offline[0]}={os.environ[offline[0]]} forbids downloading: pass a local directory, or "
                          "download the model first where the hub is reachable (HF_HOME: the cache it is read from)")
    unreachable = hub_unreachable()
    if unreachable:
        raise ConfigError(f"model_kwargs.model_path={path} is not a local directory nor in the hub cache, and the hub "
                          f"cannot be reached ({unreachable}): pass a local directory, or download the model first "
                          "where the hub is reachable (HF_HOME: the cache it is read from)")


def hub_cached(repo_id: str) -> bool:
    """Whether the hub cache (HF_HOME / HF_HUB_CACHE) holds `repo_id`'s config.json."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except HFValidationError:  # an id the hub does not accept cannot be cached
        return False


def hub_unreachable(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the hub (HF_ENDPOINT, else huggingface.co; through the https/http proxy of the environment where one is
    set) does not accept a TCP connection within `timeout` seconds, name lookup included; None when it does."""
    import urllib.request

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(endpoint.scheme)
    if proxy:
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parts.hostname or "", parts.port or 80
    outcome: dict[str, str] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = ""
        except OSError as error:
            outcome["error"] = error.strerror or str(error) or type(error).__name__

    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(timeout + 0.5)
    if "ok" in outcome:
        return None
    return f"{'proxy ' if proxy else ''}{host}:{port}: {outcome.get('error', f'no answer within {timeout:g} s')}"


def compose(overrides: list[str], hydra_config: bool = False):
    """Hydra's composition of `overrides` (its errors as one-line ConfigErrors)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with hydra_errors(), initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=hydra_config)


def grid(overrides: list[str]) -> list[list[str]]:
    """Every point of the sweep: the fixed overrides plus one value of each swept key (Hydra's grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    check_overrides(overrides)
    parser = OverridesParser.create()
    with hydra_errors():
        command_line = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in command_line if not o.is_sweep_override()]
    preset = compose(fixed, hydra_config=True)

    def values(override) -> list[str]:  # a single value (no sweep) is a one-point axis, as for Hydra's sweeper
        key = override.get_key_element()
        if not override.is_sweep_override():
            return [override.input_line]
        return [f"{key}={v}" for v in override.sweep_string_iterator()]

    with hydra_errors():
        swept = {key: values(parser.parse_override(f"{key}={value}"))
                 for key, value in (preset.hydra.sweeper.params or {}).items()}
    for override in command_line:
        key = override.get_key_element()
        swept.pop(key, None)  # the command line wins, and its keys come last
        if override.is_sweep_override():
            swept[key] = values(override)
    return [fixed + list(choice) for choice in itertools.product(*swept.values())]


def validate(args: list[str]) -> list[Config]:
    """The Configs a command would run (`[normscale.<entry>] [-m] <overrides>`; every point of a `-m` sweep), validated
    as the entry point does it, without running anything: ConfigError naming the first problem. Commands that pick
    another config file (--config-name, --config-path, --config-dir) are not checked here (empty list)."""
    entry = args[0] if args and args[0].startswith("normscale.") and "=" not in args[0] else None
    rest = args[1:] if entry else args
    if any(a.split("=")[0] in ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd") for a in rest):
        return []
    overrides = [a for a in rest if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    check_overrides(overrides)
    points = grid(overrides) if any(a in ("-m", "--multirun") for a in rest) else [overrides]
    configs = [to_config(compose(point)) for point in points]
    if entry == "normscale.eval":
        for config in {c.model_kwargs.model_path: c for c in configs if c.model == "llm"}.values():
            check_llm_path(config)
    return configs


def load_env() -> None:
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True))  # values already in the environment win
    load_dotenv(SITE_ENV)  # SLURM site settings (partition, account, ...) for the sweep planner and hydra/launcher=slurm


# In a `-m` sweep these end one point, not the sweep: the point is skipped with its line, the others go on, and
# the command ends with the most telling code among them (a failed run, then a refused one, then a held one).
SKIPPABLE = (RunFailedError, RunRefusedError, RunHeldError)
# For the packing launchers (normscale.launcher), set by hydra_main: the command's pack entry (train.train_pack; None
# for a command that trains nothing, whose points then run a job each), and (exit code, the point's overrides) of each
# run that a pack job left out or that failed.
PACKED_ENTRY: Callable[[list[tuple[Config, list[str]]]], list] | None = None
LAUNCHER_SKIPPED: list[tuple[int, str]] = []
LAUNCHER_JOB = False  # set in a submitit job of those launchers: a point's error is sent back, not exited with


def in_launcher_job() -> bool:
    """LAUNCHER_JOB, read through a module function: the task function reaches a submitit job pickled by value, with
    a copy of the module globals it names, but this function by reference."""
    return LAUNCHER_JOB


@dataclasses.dataclass
class JobOutcome:
    """What a submitit job of the packing launchers sends back: (exit code, line, overrides) of each point it skipped
    (left out of a pack, refused, failed), and the (exit code, line) of the error that ended it, if one did."""
    skipped: list[tuple[int, str, list[str]]]
    error: tuple[int, str] | None = None


def hydra_main(entry: Callable[..., Any], with_overrides: bool = False,
               packed: Callable[[list[tuple[Config, list[str]]]], list] | None = None) -> None:
    """Run `entry(config)` under Hydra (single run or `-m` sweep), or `entry(config, overrides)` with the job's
    command-line overrides (they name run directories). A NormscaleError exits with its code and one line; in a
    `-m` sweep a point that is held elsewhere, refused or failed is skipped with its line, and the sweep ends with
    that code (3, 2, then 75) and the list of skipped points. With `packed` and pack=N > 1, a `-m` sweep's points are
    collected and then trained N at a time by `packed(jobs)` (normscale.pack.forming groups them by shape), which
    returns the errors of the runs it left out or that failed; hydra/launcher=slurm and local submit a job per pack
    instead (normscale.launcher) and hand back those errors alike."""
    import hydra

    global PACKED_ENTRY
    PACKED_ENTRY = packed
    load_env()
    try:
        check_overrides(sys.argv[1:])
        check_cache_dir(command_line_cache_dir(sys.argv[1:]))  # before Hydra makes a -m sweep's directory in it
    except ConfigError as error:
        fail(str(error))
    skipped: list[tuple[int, str]] = []
    pending: list[tuple[Config, list[str]]] = []  # a packed sweep's points, trained once Hydra has listed them all

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _main(cfg) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_config = HydraConfig.get()
        try:
            config = to_config(cfg)
            print(f"normscale: CACHE_DIR={config.cache_dir}", flush=True)
            if packed is not None and config.packed and hydra_config.mode == RunMode.MULTIRUN:
                if "BasicLauncher" not in hydra_config.launcher._target_:
                    raise ConfigError(f"pack={config.pack} with hydra/launcher={hydra_config.runtime.choices.get('hydra/launcher')}"
                                      ": packs are formed by the default launcher and by hydra/launcher=slurm or "
                                      "local; use one of those, or drop pack=")
                pending.append((config, list(hydra_config.overrides.task)))
                return None
            if with_overrides:
                return entry(config, list(hydra_config.overrides.task))
            return entry(config)
        except SKIPPABLE as error:
            if hydra_config.mode != RunMode.MULTIRUN:
                fail(str(error), error.exit_code)
            if in_launcher_job():
                return JobOutcome([(error.exit_code, str(error), list(hydra_config.overrides.task))])
            print(f"normscale: skipped: {error}", file=sys.stderr, flush=True)
            skipped.append((error.exit_code, " ".join(hydra_config.overrides.task)))
        except BaseException as error:
            if in_launcher_job() and isinstance(error, NormscaleError):  # the submitting process ends the sweep with it
                return JobOutcome([], (error.exit_code, str(error)))
            fail_on(error)

    _main()
    if pending:
        from normscale.pack.forming import form_packs

        size = pending[0][0].pack
        if size == "auto":
            from normscale.dist.accel import make_accelerator
            from normscale.pack.memory import auto_size

            device = make_accelerator(pending[0][0]).device
            size = auto_size(pending[0][0], len(pending), device)
            print(f"normscale: pack=auto on {device.type}: packs of {size} run(s)"
                  + ("" if device.type == "cuda" else " (on a CPU runs train alone: bench/bench_pack.py)"), flush=True)
        for members in form_packs([config for config, _ in pending], size):
            try:
                problems = packed([pending[m] for m in members])
            except BaseException as error:
                fail_on(error)
            skipped += [(error.exit_code, " ".join(overrides)) for error, overrides in problems]
    skipped += LAUNCHER_SKIPPED  # hydra/launcher=slurm or local with pack=N: what the pack jobs left out or failed
    if skipped:
        fail_skipped(skipped)


def most_telling(codes: list[int]) -> int:
    """The exit code a sweep or pack ends with, of its points' non-zero ones: a failed run (3), then a refused one (2),
    then a held one (75), else the first."""
    return next((c for c in (RunFailedError.exit_code, RunRefusedError.exit_code, RunHeldError.exit_code)
                 if c in codes), codes[0])


def fail_skipped(skipped: list[tuple[int, str]]):
    """End a sweep (or a pack) that skipped points, given as (exit code, overrides): one line listing them, and the
    most telling code among them: a failed run (3), then a refused one (2), then a held one (75)."""
    why = {RunFailedError.exit_code: "failed", RunRefusedError.exit_code: "refused", RunHeldError.exit_code: "held"}
    code = most_telling([c for c, _ in skipped])
    fail(f"{len(skipped)} sweep point(s) skipped, each named above: "
         + "; ".join(f"{points} ({why[c]})" for c, points in skipped), code)


def fail_on(error: BaseException):
    """An error that ends the command: its one line and exit code (a full disk: 1; Ctrl-C: 130); anything else is a
    bug, raised with its traceback."""
    if isinstance(error, NormscaleError):
        fail(str(error), error.exit_code)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        fail(f"no space left on the device ({error.filename or 'while writing'}): files are written atomically, "
             "so finished ones are kept and nothing is half-written; free space and run the same command again", 1)
    if isinstance(error, KeyboardInterrupt):
        fail("interrupted (Ctrl-C): finished files are kept and nothing is half-written; the same command goes "
             "on from there", 130)
    raise error


def launch_cpu(num_processes: str, args: list[str]) -> None:
    """launch/cpu.sh: `accelerate launch` of `args` (`-m normscale.<entry> <overrides>`) as `num_processes` CPU
    processes over gloo, in this process (so signals reach the launcher as before), after validating the config once
    (skipped with NORMSCALE_CHECKED=1: the caller did). A failed worker ends the command with rank 0's exit code (the
    launcher would say 1, with its traceback); a line is added only where rank 0 said nothing of its own."""
    entry = args[1] if args[:1] == ["-m"] and len(args) > 1 else ""
    if entry.startswith("normscale.") and not os.environ.get("NORMSCALE_CHECKED"):
        try:
            validate(args[1:])
        except NormscaleError as error:
            fail(str(error), error.exit_code)
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ["ACCELERATE_USE_CPU"] = "1"  # else every process believes it is rank 0 of 1 (INFRA.md)
    parsed = launch_command_parser().parse_args(
        ["--multi_gpu", "--num_processes", num_processes, "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "0", *args])
    try:
        launch_command(parsed)
    except ChildFailedError as error:
        rank, failure = (0, error.failures[0]) if 0 in error.failures else error.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        if rank != 0 or failure.exitcode < 0:
            how = f"exited with code {failure.exitcode}" if failure.exitcode > 0 else \
                f"was killed by signal {failure.signal_name()}"
            print(f"normscale: error: worker rank {rank} (pid {failure.pid}) {how}; its output is above",
                  file=sys.stderr, flush=True)
        sys.exit(code)


def main() -> None:
    """`python -m normscale.cli check [normscale.<entry>] [-m] <overrides>`: exit 0 when the config is valid, else 2
    with one line. `python -m normscale.cli launch-cpu N <accelerate launch arguments>`: see launch_cpu."""
    args = sys.argv[1:]
    if args[:1] == ["launch-cpu"] and len(args) > 1:
        load_env()
        return launch_cpu(args[1], args[2:])
    if args[:1] != ["check"]:
        fail("usage: python -m normscale.cli check [normscale.<entry>] [-m] <overrides>")
    load_env()
    try:
        validate(args[1:])
    except NormscaleError as error:
        fail(str(error), error.exit_code)


if __name__ == "__main__":
    main()
