"""Rewards: a registry of per-completion reward functions and guarded batch scoring.

Importing the package registers the built-ins: `pure_accuracy_math` (spec 4.2),
`pure_accuracy_math_relaxed`, `format`, `math_verify` and `pair_sum` (the many-answer task's checker).
"""

from maxent_jax.rewards import format_reward, math_accuracy, math_equivalence, pair_sum  # noqa: F401  (registers)
from maxent_jax.rewards.registry import available_rewards, get_reward, register_reward
from maxent_jax.rewards.scoring import RewardScorer, compute_rewards

__all__ = ["RewardScorer", "available_rewards", "compute_rewards", "get_reward", "register_reward"]
