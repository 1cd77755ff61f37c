"""What every `python -m normscale.<entry>` shares: .env, override checks, Hydra composition, the typed Config.

Hydra's DictConfig stops here: entry functions receive a validated `normscale.config.Config`.
Bad overrides are rejected before Hydra composes anything, with one line naming the key and what is allowed.
"""
from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any, Callable

from normscale.config import (Config, ConfigError, NormscaleError, RunHeldError, resolve_cache_dir,
                              schema_keys)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SITE_ENV = CONF_DIR.parent / "slurm" / "site.env"
GROUPS = ("setting", "model", "training", "eval", "experiment")


def fail(message: str, code: int = 2):
    print(f"normscale: error: {message}", file=sys.stderr)
    sys.exit(code)


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


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


def to_config(cfg) -> Config:
    """A composed Hydra config -> the validated Config (CACHE_DIR resolved to an absolute path)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    raw["cache_dir"] = str(resolve_cache_dir(raw.get("cache_dir")))
    return Config.from_dict(raw)


def load_env() -> None:
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True))  # values already in the environment win
    load_dotenv(SITE_ENV)  # SLURM site settings (partition, account, ...) for the sweep planner and hydra/launcher=slurm


def hydra_main(entry: Callable[..., Any], with_overrides: bool = False) -> None:
    """Run `entry(config)` under Hydra (single run or `-m` sweep), or `entry(config, overrides)` with the job's
    command-line overrides (they name run directories). A NormscaleError exits with its code and one line; in a
    `-m` sweep a run held by another process is skipped with its line, and the sweep ends with 75 and the list."""
    import hydra

    load_env()
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as error:
        fail(str(error))
    held: list[str] = []

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _main(cfg) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_config = HydraConfig.get()
        try:
            config = to_config(cfg)
            print(f"normscale: CACHE_DIR={config.cache_dir}", flush=True)
            if with_overrides:
                return entry(config, list(hydra_config.overrides.task))
            return entry(config)
        except RunHeldError as error:
            if hydra_config.mode != RunMode.MULTIRUN:
                fail(str(error), error.exit_code)
            print(f"normscale: skipped: {error}", file=sys.stderr, flush=True)
            held.append(" ".join(hydra_config.overrides.task))
        except NormscaleError as error:
            fail(str(error), error.exit_code)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            fail(f"no space left on the device ({error.filename or 'while writing'}): files are written atomically, "
                 "so finished ones are kept and nothing is half-written; free space and run the same command again", 1)
        except KeyboardInterrupt:
            fail("interrupted (Ctrl-C) before training started; nothing of this command was kept half-written", 130)

    _main()
    if held:
        fail(f"{len(held)} sweep point(s) skipped because another process holds them: " + "; ".join(held),
             RunHeldError.exit_code)
