"""GRPO: group-centred advantages (pre-step) and the GRPO objective, registered as `grpo`.

Advantages (spec 7.2, TRL `scale_rewards`): A_i = u_i - mean_g(u) over the valid members;
`none` (the reference) stops there, `group` divides by the group's std + 1e-4, `batch` by
the std over every valid completion + 1e-4 (Bessel-corrected, as TRL).

Objective, with A' = A - b (b = `clip_adv_baseline` or 0), ratio rho at the configured
importance-sampling level and o the clipped surrogate:
* `loss_type='reference'`: c * (1/B) sum_g sum_{i in g} -o_i (clip on), else
  (1/B) sum_g sum_{i in g} -rho_i A'_i (spec 7.2);
* TRL loss types: per-token loss -o (sequence ratios broadcast over tokens), aggregated by
  `aggregation.aggregate_tokens`.
Both are followed by beta * KL and the InfoSeed terms (`total_loss.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from maxent_jax.errors import UserError
from maxent_jax.objectives.aggregation import aggregate_tokens, mean_over_groups
from maxent_jax.objectives.groups import group_mean, group_std, masked, masked_mean, masked_std, nonempty_groups
from maxent_jax.objectives.importance import (
    clipped_surrogate,
    log_ratio,
    old_token_logp,
    per_sequence,
    sampler_correction,
)
from maxent_jax.objectives.registry import register_objective
from maxent_jax.objectives.settings import ObjectiveSettings
from maxent_jax.objectives.total_loss import batch_masks, total_loss

Array = jax.Array

SCALE_REWARDS = ("none", "group", "batch")


def grpo_advantages(u: Array, valid: Array, scale_rewards: str = "none") -> Array:
    """Group-centred advantages `[P, G]` (0 on invalid members)."""
    if scale_rewards not in SCALE_REWARDS:
        raise UserError(f"objective.scale_rewards={scale_rewards!r} is not valid; choose one of none, group, batch")
    u = u.astype(jnp.float32)
    centred = masked(u - group_mean(u, valid)[:, None], valid)
    if scale_rewards == "group":
        centred = centred / (group_std(u, valid)[:, None] + 1e-4)
    elif scale_rewards == "batch":
        n = jnp.sum(valid).astype(jnp.float32)
        mu = masked_mean(u, valid)
        var = jnp.sum(masked((u - mu) ** 2, valid)) / jnp.maximum(n - 1.0, 1.0)
        centred = centred / (jnp.where(n > 1, jnp.sqrt(var), 0.0) + 1e-4)
    return masked(centred, valid)


def reward_stats(u: Array, valid: Array) -> dict[str, Array]:
    """`reward`, `reward_std` (population std over completions) and `frac_reward_zero_std`
    (fraction of non-empty groups whose centred utilities are all |a| < 1e-8), spec 12.4.
    """
    u = u.astype(jnp.float32)
    centred = masked(u - group_mean(u, valid)[:, None], valid)
    keep = nonempty_groups(valid)
    flat = jnp.all(jnp.abs(centred) < 1e-8, axis=-1)
    return {
        "reward": masked_mean(u, valid),
        "reward_std": masked_std(u, valid),
        "frac_reward_zero_std": masked_mean(flat.astype(jnp.float32), keep),
    }


def prepare_grpo_batch(u: Array, valid: Array, scale_rewards: str = "none") -> tuple[Array, dict[str, Array]]:
    """Pre-step helper: advantages `[P, G]` (the step's `batch["advantages"]`) and reward stats."""
    return grpo_advantages(u, valid, scale_rewards), reward_stats(u, valid)


@register_objective("grpo")
def grpo_objective(
    token_logp: Array, batch: Mapping[str, Array], coefs: Mapping[str, Array], settings: ObjectiveSettings
) -> tuple[Array, dict[str, Array]]:
    """GRPO loss of one micro-batch; `batch["advantages"][P, G]` from `prepare_grpo_batch`."""
    valid, token_mask = batch_masks(batch)
    baseline = 0.0 if settings.clip_adv_baseline is None else settings.clip_adv_baseline
    adv = jax.lax.stop_gradient(batch["advantages"]).astype(jnp.float32) - baseline
    old = old_token_logp(token_logp, batch, settings)
    ratio = jnp.exp(log_ratio(token_logp, old, token_mask, settings.importance_sampling_level))
    correction = sampler_correction(token_logp, batch, token_mask, settings)
    eps_lo, eps_hi, rule = settings.epsilon_low, settings.epsilon_high, settings.negative_adv_rule
    if settings.loss_type == "reference":
        rho = ratio[..., 0]
        seq_correction = per_sequence(correction, token_mask)
        if settings.clip_enabled:
            clip = mean_over_groups(-clipped_surrogate(rho, adv, eps_lo, eps_hi, rule) * seq_correction, valid)
            policy = settings.clip_objective_coef * clip
        else:
            clip = jnp.zeros((), jnp.float32)
            policy = mean_over_groups(-rho * adv * seq_correction, valid)
    else:
        adv_t = adv[..., None]
        surrogate = clipped_surrogate(ratio, adv_t, eps_lo, eps_hi, rule) if settings.clip_enabled else ratio * adv_t
        policy = aggregate_tokens(
            -surrogate * correction,
            token_mask,
            valid,
            settings.loss_type,
            settings.max_completion_length,
            batch.get("token_normalizer"),
        )
        clip = policy if settings.clip_enabled else jnp.zeros((), jnp.float32)
    return total_loss(policy, clip, token_logp, batch, coefs, settings, adv, correction)
