"""Config validation: every bad value fails before compute with one line naming the field."""

import subprocess
import sys

import pytest

from maxent_jax import config as config_lib
from maxent_jax import config_check
from maxent_jax.cli import REPO_ROOT
from maxent_jax.errors import UserError
from configs.tiny import get_config as tiny_config

BAD_VALUES = [
    ("maxent.tau", -0.1),
    ("maxent.q_temperature", 0.0),
    ("maxent.q_temperature", -1.0),
    ("maxent.q_epsilon", 0.0),
    ("maxent.tau_min", -1.0),
    ("maxent.tau_lr", -0.01),
    ("maxent.tau_warmup_steps", -2),
    ("maxent.reference_logprobs_source", "nope"),
    ("maxent.clip_objective_coef", -1.0),
    ("objective.beta", -0.5),
    ("objective.beta", float("nan")),
    ("objective.clip_range", 1.5),
    ("objective.loss_type", "ppo"),
    ("objective.importance_sampling_level", "word"),
    ("objective.scale_rewards", "sometimes"),
    ("objective.negative_adv_rule", "min"),
    ("objective.sampler_correction", "clip"),
    ("info_seed.entropy_mode", "signed"),
    ("objective.kl_estimator", "k4"),
    ("rollout.num_generations", 1),
    ("rollout.temperature", 0.0),
    ("rollout.top_p", 0.0),
    ("rollout.backend", "ray"),
    ("rollout.max_completion_length", 0),
    ("controllers.kl_target", -0.1),
    ("controllers.kl_horizon", -1),
    ("controller_meta.update_interval", 0),
    ("controller_meta.truncation_steps", 0),
    ("controller_meta.method", "second_order"),
    ("controller_meta.optimizer", "rmsprop"),
    ("controller_meta.beta_grad_clip", -1.0),
    ("info_seed.temperature", 0.0),
    ("info_seed.prompt_template", "no placeholder"),
    ("optim.learning_rate", -1e-3),
    ("optim.adam_beta2", 1.0),
    ("optim.lr_scheduler_type", "exp"),
    ("optim.warmup_ratio", 2.0),
    ("train.max_steps", 0),
    ("train.gradient_accumulation_steps", 0),
    ("mesh.shape", (1, -1, -1)),
    ("mesh.shape", (1, 2)),
    ("vllm.url", "localhost:8000"),
    ("logging.wandb", "maybe"),
    ("eval.per_device_eval_batch_size", 0),
]


def _set(config, path, value):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value


@pytest.mark.parametrize("path,value", BAD_VALUES, ids=[f"{p}={v}" for p, v in BAD_VALUES])
def test_bad_value_names_the_field(path, value):
    config = tiny_config()
    _set(config, path, value)
    with pytest.raises(UserError) as err:
        config_check.validate(config)
    message = str(err.value)
    assert path in message and "\n" not in message


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"maxent.tau": 0.0, "objective.beta": 0.0}, "maxent.tau"),
        ({"maxent.target_weight_entropy": 1.0, "maxent.tau_lr": 0.01, "maxent.tau_max": 0.0}, "maxent.tau_max"),
        ({"maxent.tau_min": 0.5, "maxent.tau_max": 0.1}, "maxent.tau_max"),
        ({"controller_meta.use_hessian": True}, "controller_meta.use_hessian"),
        ({"controller_meta.enabled": True}, "controller_meta.lr"),
        ({"info_seed.enabled": True}, "info_seed.num_seeds"),
        ({"rewards.reward_weights": (1.0, 2.0)}, "rewards.reward_weights"),
        ({"data.dataset_mixture": "[not json"}, "data.dataset_mixture"),
        ({"objective.train_grpo_objective": True, "maxent.target_weight_entropy": 1.0}, "maxent.target_weight_entropy"),
        ({"model.attention": "dot_product"}, "model.score_prompt_once"),
        ({"model.attention": "cudnn", "model.compute_dtype": "bfloat16"}, "model.score_prompt_once"),
    ],
)
def test_cross_field_rules(overrides, field):
    config = tiny_config()
    for path, value in overrides.items():
        _set(config, path, value)
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        config_check.validate(config)


def test_mesh_must_fit_the_devices():
    config = tiny_config()
    config.mesh.shape = (1, 3, 1)
    config_check.validate(config)
    with pytest.raises(UserError, match="mesh.shape"):
        config_check.validate(config, device_count=8)
    assert config_check.validate_mesh_shape((2, -1, 2), 8) == (2, 2, 2)


def test_decode_streams_need_a_one_device_mesh():
    import os

    import jax

    from maxent_jax.parallel.mesh import make_mesh
    from maxent_jax.run_setup import decode_streams

    config = tiny_config()
    config.rollout.decode_streams = 2
    config.mesh.shape = (1, 1, 1)
    config_check.validate(config, device_count=1)
    config.mesh.shape = (1, -1, 1)
    with pytest.raises(UserError, match=r"rollout\.decode_streams=2 is invalid: 0 or 1 on a mesh of 8 devices"):
        config_check.validate(config, device_count=8)
    assert decode_streams(3, None) == 3  # as configured
    assert decode_streams(0, make_mesh((1, 1, 1), jax.devices()[:1])) == min(2, os.cpu_count())  # auto, one CPU device
    assert decode_streams(0, make_mesh((1, -1, 1))) == 1  # auto, the 8-device mesh


def test_defaults_and_recipes_validate():
    config_check.validate(config_lib.get_base_config(), device_count=8)
    config_check.validate(tiny_config(), device_count=1)


def _run_train(*args):
    return subprocess.run(
        [sys.executable, "-m", "maxent_jax.train", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "arg,needle",
    [
        ("--config.objective.beta=-1", "objective.beta"),
        ("--config.maxent.bogus=1", "maxent.bogus"),
        ("--config.maxent.tau=abc", "maxent.tau"),
        ("--config=does_not_exist.py", "does_not_exist.py"),
        ("--no_such_flag", "no_such_flag"),
    ],
)
def test_cli_reports_one_line_and_exit_2(arg, needle):
    proc = _run_train(arg)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_cli_help():
    proc = _run_train("--help")
    assert proc.returncode == 0 and "--config" in proc.stdout and "--workdir" in proc.stdout


def test_configuration_page_is_generated_from_config():
    from maxent_jax import config_docs

    assert config_docs.PAGE.read_text() == config_docs.render(), "run: python -m maxent_jax.config_docs"
