"""The diversity experiment: its metrics, its summary and table, its command line, and a toy run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from maxent_jax.cli import REPO_ROOT
from maxent_jax.experiments import report
from maxent_jax.experiments.__main__ import parse_args
from maxent_jax.experiments.arms import ARMS, arm_config
from maxent_jax.experiments import diversity
from maxent_jax.experiments.diversity import diversity_metrics, score_samples
from maxent_jax.config_check import validate
from maxent_jax.errors import UserError


def done(pair: str) -> str:
    return f"<think>x</think><answer>{pair}</answer>"


def test_score_samples_counts_right_and_distinct_right_answers():
    samples = [[done("3 + 4"), done("3 + 4"), done("4 + 3"), done("9 + 9")], [done("0 + 1")] * 4]
    correct, distinct = score_samples(samples, ["sum=7,max=9", "sum=1,max=9"])
    assert correct.tolist() == [3, 4] and distinct.tolist() == [2, 1]


def test_diversity_metrics():
    metrics = diversity_metrics(np.array([0, 8, 16]), np.array([0, 1, 5]), np.array([3, 10, 20]), 16,
                                token_nll=30.0, num_tokens=60)
    assert [k for k in metrics if k.startswith("eval/pass@")] == [f"eval/pass@{k}" for k in range(1, 17)]
    assert metrics["eval/pass@1"] == pytest.approx((0 + 0.5 + 1) / 3)
    # pass@16 of 16 samples: any right one; pass@k rises with k
    assert metrics["eval/pass@16"] == pytest.approx(2 / 3)
    assert all(metrics[f"eval/pass@{k}"] <= metrics[f"eval/pass@{k + 1}"] for k in range(1, 16))
    assert metrics["eval/distinct_correct"] == pytest.approx(2.0)
    assert metrics["eval/distinct_correct_frac"] == pytest.approx((0 / 3 + 1 / 10 + 5 / 16) / 3)
    assert metrics["eval/token_entropy"] == pytest.approx(0.5)


def _run(arm, seed, final_pass1, tau=None):
    train = [{"step": s, "train/reward": 0.5, **({"train/tau": tau, "train/weight_entropy": 1.0} if tau else {})}
             for s in range(1, 11)]
    evals = [{"step": 0, "eval/pass@1": 0.2, "eval/distinct_correct": 3.0},
             {"step": 10, "eval/pass@1": final_pass1, "eval/distinct_correct": 2.0}]
    return {"arm": arm, "seed": seed, "eval": evals, "train": train}


def test_summary_is_mean_and_sample_std_over_seeds_with_the_warm_start_first():
    runs = [_run("grpo", 0, 0.6), _run("grpo", 1, 0.8), _run("maxent_fixed_tau", 0, 0.5, tau=0.05),
            _run("maxent_fixed_tau", 1, 0.7, tau=0.05)]
    summary = report.summarize(runs)
    assert list(summary) == [report.WARM_START, "grpo", "maxent_fixed_tau"]
    assert summary["grpo"]["eval/pass@1"] == pytest.approx({"mean": 0.7, "std": np.std([0.6, 0.8], ddof=1), "n": 2})
    assert summary[report.WARM_START]["eval/pass@1"]["mean"] == pytest.approx(0.2)
    assert "train/tau" not in summary["grpo"] and summary["maxent_fixed_tau"]["train/tau"]["mean"] == pytest.approx(0.05)
    table = report.markdown_table(summary).splitlines()
    assert len(table) == 5 and table[2].startswith("| warm start (2 seeds) | 0.200 ± 0.000")
    assert table[3].startswith("| grpo (2 seeds) | 0.700 ± 0.141") and table[3].endswith("| - | - |")


@pytest.mark.parametrize("argv, message", [
    (["diversity", "--seeds", "0"], "--seeds=0 is invalid"),
    (["diversity", "--arms", "grpo,ppo"], "--arms='grpo,ppo' is invalid: choose from grpo, dr_grpo"),
])
def test_command_line_mistakes_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(argv)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_config_is_valid_and_differs_only_in_the_objective(arm):
    config = arm_config(arm, seed=1, steps=10, eval_every=5, warm_start="/warm")
    validate(config)
    base = arm_config("maxent_fixed_tau", seed=1, steps=10, eval_every=5, warm_start="/warm")
    for section in ("model", "data", "rollout", "train", "optim", "rewards", "eval"):
        assert config[section].to_dict() == base[section].to_dict(), section


def test_warm_start_is_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    trained = []

    class FakeTrainer:  # records what a real warm start would do, without compiling anything
        def __init__(self, config, workdir):
            trained.append(config.train.sft_warmup_steps)
            self.workdir = workdir

        def supervised_warmup(self):
            pass

        def export_final(self):
            (self.workdir / "final_hf").mkdir(parents=True, exist_ok=True)

        def close(self):
            pass

    monkeypatch.setattr(diversity, "Trainer", FakeTrainer)
    exported = tmp_path / "warm_start" / "final_hf"
    assert diversity.warm_start(tmp_path, 7, 5, print) == exported and trained == [7]
    said = []
    assert diversity.warm_start(tmp_path, 7, 5, said.append) == exported and trained == [7]
    assert said == [f"warm start: reusing {exported}"]
    diversity.warm_start(tmp_path, 8, 5, print)  # other settings: trained again
    diversity.warm_start(tmp_path, 8, 6, print)
    assert trained == [7, 8, 8]


@pytest.mark.slow
def test_toy_experiment_runs_end_to_end(tmp_path):
    """The command at toy size (2 steps, one seed, two arms, numbers up to 3: 5 eval prompts of 16
    samples each): it writes the JSON, the plots and the table; no claim about which arm wins."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    env["PYTHONPATH"] = str(REPO_ROOT)
    cmd = [sys.executable, "-m", "maxent_jax.experiments", "diversity", "--seeds", "1", "--steps", "2",
           "--eval-every", "1", "--warmup-steps", "2", "--max-operand", "3", "--arms", "grpo,maxent_tau_controller",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[run 2/2] maxent_tau_controller seed 0" in proc.stdout and "| grpo (1 seed) |" in proc.stdout
    result = json.loads((tmp_path / "diversity.json").read_text())
    assert [(r["arm"], [e["step"] for e in r["eval"]]) for r in result["runs"]] == [
        ("grpo", [0, 1, 2]), ("maxent_tau_controller", [0, 1, 2])]
    assert set(result["summary"]) == {report.WARM_START, "grpo", "maxent_tau_controller"}
    assert all((tmp_path / name).stat().st_size > 1000 for name in report.PLOTS)
