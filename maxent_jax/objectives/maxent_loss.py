"""The MaxEnt objective (spec 7.1), registered as `maxent`.

L = (1/B) sum_g sum_{i in g} -w_i S_i / max(n_i, 1)                   (weighted likelihood)
  + c * (1/B) sum_g sum_{i in g} -o_i(rho_i, w_i - b)                 (optional clip term)
  + beta * KL + InfoSeed terms                                        (total_loss.py)

with constant weights w (stop-gradient), B the non-empty groups, rho_i the sequence ratio
exp(clamp(S_i - S_old_i, +-60)) (or the GSPO token-mean ratio), b = `clip_adv_baseline` or
1/K_g, o the clipped surrogate (min, or the reference's max for A < 0).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from maxent_jax.errors import UserError
from maxent_jax.objectives.aggregation import mean_over_groups
from maxent_jax.objectives.groups import group_sizes, masked, token_counts
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


@register_objective("maxent")
def maxent_objective(
    token_logp: Array, batch: Mapping[str, Array], coefs: Mapping[str, Array], settings: ObjectiveSettings
) -> tuple[Array, dict[str, Array]]:
    """MaxEnt loss of one micro-batch; `batch["weights"][P, G]` from `prepare_maxent_batch`."""
    if settings.importance_sampling_level == "token":
        raise UserError(
            "objective.importance_sampling_level='token' is not valid with the MaxEnt objective; "
            "use sequence_sum (reference) or sequence"
        )
    valid, token_mask = batch_masks(batch)
    n1 = jnp.maximum(token_counts(token_mask, valid), 1.0)
    w = jax.lax.stop_gradient(batch["weights"]).astype(jnp.float32)
    correction = sampler_correction(token_logp, batch, token_mask, settings)
    corrected = jnp.sum(masked(token_logp.astype(jnp.float32) * correction, token_mask), axis=-1)
    policy = mean_over_groups(-w * corrected / n1, valid)
    clip = jnp.zeros((), jnp.float32)
    if settings.clip_enabled:
        old = old_token_logp(token_logp, batch, settings)
        ratio = jnp.exp(log_ratio(token_logp, old, token_mask, settings.importance_sampling_level)[..., 0])
        if settings.clip_adv_baseline is None:
            baseline = 1.0 / jnp.maximum(group_sizes(valid), 1.0)[:, None]
        else:
            baseline = settings.clip_adv_baseline
        o = clipped_surrogate(
            ratio, w - baseline, settings.epsilon_low, settings.epsilon_high, settings.negative_adv_rule
        )
        clip = mean_over_groups(-o * per_sequence(correction, token_mask), valid)
        policy = policy + settings.clip_objective_coef * clip
    return total_loss(policy, clip, token_logp, batch, coefs, settings, w, correction)
