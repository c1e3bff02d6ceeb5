"""The diversity experiment's configs: one shared base and one function per arm.

Every arm is the embedded default (`configs/tiny.py`: the tiny decoder, 16 prompts x 8
completions per step, AdamW 3e-4, beta 0.02) on the many-answer task `synthetic:pair_sum`,
started from the same warm-start checkpoint, for the same number of steps. The arms differ
only in the objective, so any difference in diversity is the objective's doing.

Sampling is at temperature 1.0 in training and evaluation: the samples then come from the
policy itself, and the mean negative log-probability of the sampled tokens is an unbiased
estimate of its token entropy.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from maxent_jax.bench.presets import default_config

NUM_SAMPLES = 16  # completions per eval prompt: pass@1..16 and distinct answers among 16
MAX_OPERAND = 9  # "two numbers from 0 to 9": 17 prompts with 2..10 right answers each
WARMUP_STEPS = 300  # supervised steps of the shared warm start (diverse worked solutions)
TARGET_WEIGHT_ENTROPY = 2.05  # nats, of at most ln 8 = 2.08: above the ~1.8-1.98 that tau = 0.05 gives here


def base_config(max_operand: int = MAX_OPERAND) -> ml_collections.ConfigDict:
    """What every arm shares (and the warm start is trained with)."""
    c = default_config()  # configs/tiny.py
    c.data.dataset_name = "synthetic:pair_sum"
    c.data.synthetic.max_operand = max_operand
    c.rewards.reward_funcs = ("pair_sum",)
    c.rollout.temperature = 1.0
    c.train.sft_warmup_steps = 0  # the arms start from the shared warm start instead
    c.checkpoint.save_steps = 0
    c.checkpoint.resume = "none"
    c.checkpoint.export_final = False
    c.checkpoint.async_save = False
    c.logging.wandb = "disabled"
    return c


def grpo(c: ml_collections.ConfigDict) -> None:
    """GRPO as `objective.train_grpo_objective=True` gives it: group-centred advantages, clipped ratio."""
    c.objective.train_grpo_objective = True


def dr_grpo(c: ml_collections.ConfigDict) -> None:
    """GRPO with Dr. GRPO's length-unbiased aggregation (token sum / max completion length)."""
    grpo(c)
    c.objective.loss_type = "dr_grpo"


def dapo(c: ml_collections.ConfigDict) -> None:
    """GRPO with DAPO's token-level aggregation and clip-higher (epsilon_high 0.28); without
    DAPO's dynamic sampling, which this trainer does not have."""
    grpo(c)
    c.objective.loss_type = "dapo"
    c.objective.epsilon_high = 0.28


def maxent_fixed_tau(c: ml_collections.ConfigDict) -> None:
    """MaxEnt-GRPO at the tiny default's fixed tau = 0.05."""
    c.objective.train_grpo_objective = False
    c.maxent.tau = 0.05


def maxent_tau_controller(c: ml_collections.ConfigDict) -> None:
    """MaxEnt-GRPO starting at tau = 0.05, the tau controller steering the weight entropy to
    `TARGET_WEIGHT_ENTROPY` (tau within [0.005, 1])."""
    maxent_fixed_tau(c)
    c.maxent.target_weight_entropy = TARGET_WEIGHT_ENTROPY
    c.maxent.tau_lr = 0.1
    c.maxent.tau_min = 0.005
    c.maxent.tau_max = 1.0
    c.maxent.tau_warmup_steps = 0


ARMS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "dapo": dapo,
    "maxent_fixed_tau": maxent_fixed_tau,
    "maxent_tau_controller": maxent_tau_controller,
}


def arm_config(arm: str, *, seed: int, steps: int, eval_every: int, warm_start: str,
               max_operand: int = MAX_OPERAND) -> ml_collections.ConfigDict:
    """The full config of one run: the base, the arm's changes, the seed, the step budget and
    the warm-start checkpoint (an HF directory) as the initial policy and the reference."""
    c = base_config(max_operand)
    ARMS[arm](c)
    c.seed = seed
    c.model.name_or_path = warm_start
    c.train.max_steps = steps
    c.eval.eval_steps = eval_every
    return c
