"""The total micro-batch loss (spec 7.4): policy (or GRPO) term + beta * KL + InfoSeed terms.

Shared by every registered objective so that KL, InfoSeed and the logged metric names are
identical whichever policy term is used.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from maxent_jax.objectives.groups import masked_mean
from maxent_jax.objectives.importance import log_ratio, old_token_logp
from maxent_jax.objectives.infoseed import infoseed_term
from maxent_jax.objectives.kl import kl_penalty
from maxent_jax.objectives.settings import ObjectiveSettings

Array = jax.Array


def batch_masks(batch: Mapping[str, Array]) -> tuple[Array, Array]:
    """(`valid[P, G]`, `token_mask[P, G, T]` restricted to valid members), both bool."""
    valid = batch["valid"].astype(bool)
    token_mask = batch["token_mask"].astype(bool) & valid[..., None]
    return valid, token_mask


def total_loss(
    policy: Array,
    clip: Array,
    token_logp: Array,
    batch: Mapping[str, Array],
    coefs: Mapping[str, Array],
    settings: ObjectiveSettings,
    loss_weights: Array,
    correction: Array,
) -> tuple[Array, dict[str, Array]]:
    """Add KL and InfoSeed terms to the policy term and collect the spec 12.4 metrics.

    Args:
      policy: the policy term including the scaled clip term (`loss/policy`).
      clip: the unscaled clip term (`loss/clip`).
      token_logp, batch, coefs, settings: as given to the objective.
      loss_weights: `[P, G]` MaxEnt weights or GRPO advantages (for the InfoSeed alpha term).
      correction: the sampler correction factor `[P, G, 1|T]` (logged when active).
    """
    valid, token_mask = batch_masks(batch)
    beta = jnp.asarray(coefs.get("beta", 0.0), jnp.float32)
    ratio = None
    if settings.kl_bias_correction:
        old = old_token_logp(token_logp, batch, settings)
        ratio = jnp.exp(log_ratio(token_logp, old, token_mask, settings.importance_sampling_level))
    kl, diagnostics = kl_penalty(
        token_logp, batch["ref_logp"], token_mask, valid, settings, batch.get("token_normalizer"), ratio
    )
    loss = policy + beta * kl
    metrics = {
        "loss/policy": policy,
        "loss/clip": clip,
        "loss/kl": kl,
        "loss/weighted_kl": beta * kl,
        **diagnostics,
    }
    if settings.info_seed.active:
        seed_loss, seed_metrics = infoseed_term(batch, loss_weights, valid, settings.info_seed)
        loss = loss + seed_loss
        metrics.update(seed_metrics)
    if "behaviour_logp" in batch:  # the sampler's and the trainer's log-probs of the same tokens
        gap = jnp.abs(jax.lax.stop_gradient(token_logp).astype(jnp.float32) - batch["behaviour_logp"].astype(jnp.float32))
        metrics["sampler_is/logp_abs_diff"] = masked_mean(jnp.where(jnp.isnan(gap), 0.0, gap), token_mask)
    if settings.sampler_correction != "none" and "behaviour_logp" in batch:
        mask = jnp.broadcast_to(token_mask if correction.shape[-1] > 1 else valid[..., None], correction.shape)
        metrics["sampler_is/mean"] = masked_mean(correction, mask)
        lo, hi = settings.sampler_correction_min, settings.sampler_correction_max  # where the weight hit a bound
        cut = correction == 0.0 if settings.sampler_correction.endswith("mask") else (correction <= lo) | (correction >= hi)
        metrics["sampler_is/frac_truncated"] = masked_mean(cut.astype(jnp.float32), mask)
    metrics["loss"] = loss  # the reference's train/loss/total is the same number
    return loss, {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
