import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import compose_config, run_module
from normscale.cli import CONF_DIR, check_overrides, group_choices
from normscale.config import Config, ConfigError, checkpoint_schedule, schema_keys


# --- checkpoint schedules (SPEC E) -------------------------------------------------------------------------------

def test_sqrt_schedule_is_the_spec_example():
    steps = checkpoint_schedule("sqrt_schedule", 100_000, 100, 20)
    assert steps[:4] == [20, 58, 115, 193]
    assert steps[-1] == 100_000 and steps[-2] < 100_000
    assert steps == sorted(set(steps)) and len(steps) == 100  # the floor of the last point (99999) plus T appended
    lo, hi = math.sqrt(20), math.sqrt(100_000)
    assert steps[50] == math.floor((lo + 50 * (hi - lo) / 99) ** 2)


def test_sqrt_schedule_deduplicates_and_appends_the_end():
    steps = checkpoint_schedule("sqrt_schedule", 30, 50, 1)
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 30 and len(steps) < 50


def test_linear_and_end_only_schedules():
    assert checkpoint_schedule("linear_schedule", 1000, 5, 100) == [100, 325, 550, 775, 1000]
    assert checkpoint_schedule("linear_schedule", 10, 4, 1) == [1, 4, 7, 10]
    assert checkpoint_schedule("end_only", 1234) == [1234]


def test_config_turns_save_steps_into_a_schedule():
    config = compose_config("training_kwargs.max_steps=1000", "training_kwargs.save_steps.schedule=linear_schedule",
                            "training_kwargs.save_steps.num_checkpoints=3", "training_kwargs.save_steps.first_step=10")
    assert config.checkpoint_steps == [10, 505, 1000]
    assert compose_config("training_kwargs.save_steps.schedule=end_only").checkpoint_steps == [100_000]
    assert compose_config().checkpoint_steps == checkpoint_schedule("sqrt_schedule", 100_000, 100, 20)


# --- composition: the keys users type ----------------------------------------------------------------------------

def test_override_keys_users_type_reach_the_typed_config():
    c = compose_config("name=my_experiment", "setting=linear_regression", "model_kwargs.hidden_size=256",
                       "training_kwargs.learning_rate=0.001", "eval_kwargs.num_eval_batches=4", "overwrite=true",
                       "seed=3", "task_kwargs.num_tasks=1024", "task_kwargs.num_dims=16",
                       "task_kwargs.context_length=64", "task_kwargs.prior=power_law", "task_kwargs.prior_exponent=1.5")
    assert (c.name, c.setting, c.seed, c.overwrite) == ("my_experiment", "linear_regression", 3, True)
    assert c.model_kwargs.hidden_size == 256 and c.training_kwargs.learning_rate == 0.001
    assert c.eval_kwargs.num_eval_batches == 4
    t = c.task_kwargs
    assert (t.num_tasks, t.num_dims, t.context_length, t.prior, t.prior_exponent) == (1024, 16, 64, "power_law", 1.5)
    assert t.sigma2 == 16 / 256


def test_settings_carry_the_spec_defaults():
    urns, reg, cls = (compose_config(f"setting={s}") for s in ("balls_and_urns", "linear_regression", "classification"))
    assert (urns.task_kwargs.num_dims, urns.task_kwargs.context_length, urns.training_kwargs.batch_size) == (8, 128, 64)
    assert (urns.model_kwargs.num_layers, urns.model_kwargs.hidden_size) == (1, 64)
    assert reg.training_kwargs.batch_size == 128 and reg.model_kwargs.num_layers == 8
    assert cls.training_kwargs.batch_size == 64 and cls.task_kwargs.exemplar_noise == 0.5
    t = urns.training_kwargs
    assert (t.learning_rate, t.warmup_steps, t.max_steps, t.max_grad_norm, t.weight_decay) == (5e-4, 5000, 100_000, 1.0, 0.0)
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.precision) == (0.9, 0.999, 1e-8, "fp32")


def test_experiment_preset_sets_name_and_command_line_wins():
    assert compose_config("experiment=demo").name == "demo"
    c = compose_config("experiment=demo", "training_kwargs.max_steps=77")
    assert c.training_kwargs.max_steps == 77 and c.task_kwargs.num_tasks == 16


def test_sweep_presets_declare_their_grid():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=urns_task_diversity"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["task_kwargs.num_tasks"].split(",")[0] == "4" and params["seed"] == "0,1,2"


@pytest.mark.parametrize("setting", group_choices("setting"))
@pytest.mark.parametrize("model", group_choices("model"))
def test_every_shipped_setting_and_model_composes(setting, model):
    assert compose_config(f"setting={setting}", f"model={model}").setting == setting


@pytest.mark.parametrize("experiment", group_choices("experiment"))
def test_every_shipped_experiment_composes(experiment):
    assert compose_config(f"experiment={experiment}").name == experiment


# --- validation ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, key, allowed", [
    ({"setting": "urns"}, "setting", "balls_and_urns, linear_regression, classification"),
    ({"task_kwargs": {"num_tasks": 0}}, "task_kwargs.num_tasks", ">= 1"),
    ({"task_kwargs": {"context_length": 0}}, "task_kwargs.context_length", ">= 1"),
    ({"training_kwargs": {"max_steps": -5}}, "training_kwargs.max_steps", ">= 1"),
    ({"task_kwargs": {"prior": "zipf"}}, "task_kwargs.prior", "uniform, power_law, constant_freq"),
    ({"training_kwargs": {"save_steps": {"schedule": "log"}}}, "training_kwargs.save_steps.schedule",
     "sqrt_schedule, linear_schedule, end_only"),
    ({"task_kwargs": {"bogus": 1}}, "task_kwargs.bogus", "num_tasks"),
    ({"training_kwargs": {"save_steps": {"every": 3}}}, "save_steps.every", "schedule, num_checkpoints, first_step"),
    ({"task_kwargs": {"num_tasks": "many"}}, "task_kwargs.num_tasks", "int"),
    ({"overwrite": "yes"}, "overwrite", "bool"),
])
def test_bad_values_name_the_key_and_what_is_allowed(raw, key, allowed):
    with pytest.raises(ConfigError) as error:
        Config.from_dict(raw)
    assert key in str(error.value) and allowed in str(error.value)


def test_yaml_numbers_are_coerced_exactly():
    c = Config.from_dict({"training_kwargs": {"max_steps": 1e5, "learning_rate": 1}})
    assert c.training_kwargs.max_steps == 100_000 and isinstance(c.training_kwargs.learning_rate, float)
    with pytest.raises(ConfigError):
        Config.from_dict({"training_kwargs": {"max_steps": 10.5}})


def test_override_checks_happen_before_hydra():
    check_overrides(["setting=linear_regression,classification", "hydra.verbose=true", "task_kwargs.num_tasks=4,8"])
    for bad, words in [(["+experiment=demo"], "experiment=demo (no '+')"), (["model=gpt5"], "transformer"),
                       (["setting=a,balls_and_urns"], "'a'"), (["training_kwargs.lr=1"], "learning_rate"),
                       (["bogus.key=1"], "task_kwargs")]:
        with pytest.raises(ConfigError, match=None) as error:
            check_overrides(bad)
        assert words in str(error.value)
    assert "task_kwargs.prior_exponent" in schema_keys() and "training_kwargs.save_steps.first_step" in schema_keys()


BAD_OVERRIDES = [
    ("setting=urns", "setting='urns' is not a known setting; choose one of: balls_and_urns"),
    ("task_kwargs.num_tasks=0", "task_kwargs.num_tasks=0 must be >= 1"),
    ("task_kwargs.context_length=0", "task_kwargs.context_length=0 must be >= 1"),
    ("task_kwargs.prior=zipf", "choose one of: uniform, power_law, constant_freq"),
    ("training_kwargs.save_steps.schedule=log", "choose one of: sqrt_schedule, linear_schedule, end_only"),
    ("task_kwargs.bogus=1", "unknown key task_kwargs.bogus; allowed keys in task_kwargs:"),
    ("+experiment=demo", "choose presets with experiment=demo"),
]


@pytest.mark.parametrize("override, message", BAD_OVERRIDES)
def test_bad_overrides_exit_nonzero_with_one_clear_line_before_any_work(tmp_path, override, message):
    result = run_module("normscale.data", "experiment=demo", override, env={"CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()  # nothing generated


def test_cache_dir_from_environment_dotenv_and_default(tmp_path):
    env_cache, dotenv_cache = tmp_path / "from_env", tmp_path / "from_dotenv"
    (tmp_path / ".env").write_text(f"CACHE_DIR={dotenv_cache}\n")
    quick = ["experiment=demo", "task_kwargs.num_tasks=2", "training_kwargs.max_steps=30", "data_kwargs.eval_size=64",
             "eval_kwargs.num_eval_batches=1", "eval_kwargs.batch_size=64", "data_kwargs.shard_mb=0.1", "task_kwargs.num_ood_tasks=2"]
    env = {"CACHE_DIR": None}
    assert f"CACHE_DIR={dotenv_cache}" in run_module("normscale.data", *quick, cwd=tmp_path, env=env).stdout
    assert f"CACHE_DIR={env_cache}" in run_module("normscale.data", *quick, cwd=tmp_path,
                                                  env={"CACHE_DIR": str(env_cache)}).stdout
    (tmp_path / ".env").unlink()
    out = run_module("normscale.data", *quick, cwd=tmp_path, env=env).stdout
    assert f"CACHE_DIR={tmp_path / 'cache'}" in out
    for root in (env_cache, dotenv_cache, tmp_path / "cache"):
        assert list(Path(root).glob("experiments/balls_and_urns/demo/data/*/manifest.json"))
