"""End-to-end training runs of the tiny default: GRPO, MaxEnt and InfoSeed, one and eight devices."""

import json
import os
import urllib.request
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.tiny import get_config
from maxent_jax.cli import REPO_ROOT
from maxent_jax.config import set_fields
from maxent_jax.trainer import Trainer

SHORT = {
    "train.sft_warmup_steps": 2,
    "train.max_steps": 2,
    "train.per_device_train_batch_size": 1,
    "train.gradient_chunks": 1,
    "rollout.num_generations": 4,
    "rollout.max_completion_length": 16,
    "data.synthetic.num_train": 64,
    "data.synthetic.num_eval": 8,
    "eval.eval_steps": 2,
    "eval.per_device_eval_batch_size": 8,
    "checkpoint.save_steps": 2,
    "logging.progress": False,
}


def tiny_config(**overrides):
    config = get_config()
    set_fields(config, {**SHORT, **overrides})
    return config


def run(config, workdir):
    trainer = Trainer(config, workdir)
    try:
        trainer.run()
    finally:
        trainer.close()
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _finite_train_metrics(records):
    record = [r for r in records if "train/loss" in r][-1]
    values = {k: v for k, v in record.items() if k.startswith("train/") and isinstance(v, float)}
    assert values and all(np.isfinite(v) for v in values.values()), values
    return values


def test_maxent_run_on_the_8_device_mesh_writes_everything(tmp_path):
    assert jax.device_count() == 8
    records = run(tiny_config(), tmp_path)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    last = _finite_train_metrics(records)
    for key in ("train/loss", "train/reward", "train/reward_std", "train/kl", "train/beta", "train/tau",
                "train/weight_entropy", "train/grad_norm", "train/learning_rate", "train/num_tokens",
                "train/completions/mean_length_sampled", "train/frac_reward_zero_std", "train/ref_logp_mean",
                "train/avg_completion_tokens", "train/entropy"):
        assert key in last, key
    # One key per quantity: none of the reference's copies (train/kl_coeff = beta, train/weighting/tau = tau, ...).
    copies = [k for k in last if k in ("train/kl_coeff", "train/loss/total", "train/clip_ratio")
              or k.startswith(("train/weighting/", "train/kl_controller/"))]
    assert not copies, copies
    assert last["train/ref_logp_mean"] < 0 and last["train/avg_completion_tokens"] == pytest.approx(
        last["train/completions/mean_length_sampled"])
    assert records[0]["run/git_sha"] and any("eval/mean_reward" in r for r in records)
    assert json.loads((tmp_path / "controller_state.json").read_text())["tau"] == pytest.approx(get_config().maxent.tau)
    assert (tmp_path / "final_hf" / "config.json").exists() and (tmp_path / "final_hf" / "controller_state.json").exists()
    assert (tmp_path / "checkpoints" / "2").is_dir()


def test_infoseed_runs_and_scoring_each_prompt_once_leaves_its_step_unchanged(tmp_path):
    """GRPO with InfoSeed (groups of G + seed completions, the InfoNCE term reading hidden states) on the
    8-device mesh reports its seed metrics; with model.score_prompt_once on and off the RL step's
    metrics agree."""
    overrides = {"objective.train_grpo_objective": True, "info_seed.enabled": True, "info_seed.num_seeds": 2,
                 "info_seed.lambda_": 0.01, "info_seed.alpha_entropy": 0.5, "train.max_steps": 1,
                 "train.sft_warmup_steps": 0, "eval.do_eval": False, "checkpoint.export_final": False,
                 "checkpoint.save_steps": 0}
    steps = [_finite_train_metrics(run(tiny_config(**overrides, **{"model.score_prompt_once": once}),
                                       tmp_path / str(once)))
             for once in (False, True)]
    assert steps[1]["train/loss/seed"] > 0 and steps[1]["train/seed/seed_aug_frac"] == pytest.approx(2 / 6)
    for key in ("train/loss", "train/loss/seed", "train/kl", "train/grad_norm", "train/reward"):
        assert steps[1][key] == pytest.approx(steps[0][key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_one_device_and_eight_devices_agree(tmp_path):
    """The same config and seed on a 1-device and an 8-device layout give the same metrics."""
    overrides = ["--config." + k + "=" + str(v) for k, v in SHORT.items()]
    overrides += ["--config.train.per_device_train_batch_size=8", "--config.eval.do_eval=False",
                  "--config.checkpoint.export_final=False", "--config.checkpoint.save_steps=0"]
    procs = {}
    for devices, mesh in ((1, "(1,1,1)"), (8, "(1,8,1)")):  # both runs at once
        per_device = 8 // devices
        args = [a for a in overrides if "per_device_train_batch_size" not in a]
        args += [f"--config.train.per_device_train_batch_size={per_device}", f"--config.mesh.shape={mesh}"]
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        command = [sys.executable, "-m", "maxent_jax.train", f"--workdir={tmp_path / f'd{devices}'}", *args]
        with open(tmp_path / f"d{devices}.log", "w") as log:  # a file, not a pipe: neither run can block on it
            procs[devices] = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    records = {}
    for devices, proc in procs.items():
        assert proc.wait(timeout=900) == 0, (tmp_path / f"d{devices}.log").read_text()[-2000:]
        metrics = (tmp_path / f"d{devices}" / "metrics.jsonl").read_text().splitlines()
        records[devices] = [json.loads(line) for line in metrics]
    for one, eight in zip(*(sorted((r for r in records[d] if "train/loss" in r), key=lambda r: r["step"]) for d in (1, 8))):
        for key in ("train/reward", "train/loss", "train/kl", "train/weight_entropy", "train/grad_norm"):
            assert one[key] == pytest.approx(eight[key], rel=1e-3, abs=1e-5), key


def test_bad_dataset_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "maxent_jax.train", f"--workdir={tmp_path}",
                           "--config.data.dataset_name=" + str(tmp_path / "missing.jsonl")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "missing.jsonl" in proc.stderr


def test_training_through_the_rollout_server(tmp_path):
    """rollout.backend='server': rollouts over HTTP from the jax backend, weights pushed every step,
    and the server's outputs follow the trainer (its weight version is the step)."""
    from rollout_fixtures import TOKEN, start_rollout_server, write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model", seed=0)
    (tmp_path / "token").write_text(TOKEN)
    with start_rollout_server("jax", model_dir) as (url, server):
        config = tiny_config(**{"model.name_or_path": str(model_dir), "rollout.backend": "server",
                                "vllm.url": url + "/generate", "vllm.token_file": str(tmp_path / "token"),
                                "eval.do_eval": False, "checkpoint.export_final": False,
                                "checkpoint.save_steps": 0})
        records = run(config, tmp_path / "run")
        info = json.loads(urllib.request.urlopen(url + "/info", timeout=30).read())
    last = _finite_train_metrics(records)
    assert last["train/rollout/push_gb_per_s"] > 0 and info["weight_version"] == 1
    assert last["train/rollout/push_native_layout"] == 1.0  # the jax server takes our layout: no transposes


@pytest.mark.slow
def test_default_config_learns(tmp_path):
    """`python -m maxent_jax.train` as shipped: from chance to >= 0.85 mean reward, and RL adds to the warm-up."""
    proc = subprocess.run([sys.executable, "-m", "maxent_jax.train", f"--workdir={tmp_path}"], cwd=REPO_ROOT,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    initial = [r["train/initial_reward"] for r in records if "train/initial_reward" in r]
    rewards = [r["train/reward"] for r in sorted(records, key=lambda r: r["step"]) if "train/reward" in r]
    first, last = np.mean(rewards[:10]), np.mean(rewards[-10:])
    assert initial == [pytest.approx(0.0, abs=0.05)]
    assert last >= 0.85 and last >= first + 0.05, (first, last)
    # README's demo figures (written by python -m maxent_jax.demo_report) are this run's.
    from maxent_jax import demo_report

    published = demo_report.read_table(demo_report.README.read_text())
    measured = demo_report.figures(records)
    assert set(published) == set(measured)
    for label, value in published.items():
        assert measured[label] == pytest.approx(value, abs=0.05), (label, "rerun python -m maxent_jax.demo_report")


def test_read_scalars_returns_every_metric_as_a_float_in_one_transfer():
    import jax.numpy as jnp

    from maxent_jax.parallel.distributed import read_scalars

    metrics = {"loss": jnp.float32(0.25), "skipped": jnp.bool_(True), "tokens": jnp.int32(96), "b/kl": jnp.float32(-1e-3)}
    got = read_scalars(metrics)
    assert got == {"loss": 0.25, "skipped": 1.0, "tokens": 96.0, "b/kl": pytest.approx(-1e-3)}
    assert all(type(v) is float for v in got.values()) and read_scalars({}) == {}
