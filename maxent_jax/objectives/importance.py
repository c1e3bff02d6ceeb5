"""Importance ratios, the clipped surrogate, and the sampler/trainer mismatch correction.

Shapes follow `groups.py`: token arrays `[P, G, T]`, sequence arrays `[P, G]`. A ratio at a
sequence level is returned as `[P, G, 1]` so it broadcasts against token arrays.

The denominator of the ratio ("old" log-probs, spec 5.4):
* no correction: the sampler's per-token log-probs when the batch carries them
  (`behaviour_logp`), else the trainer's `old_logp`, else stop_gradient(current) (ratio 1);
* with a correction (`token_*`/`sequence_*` modes): the trainer's `old_logp` (else
  stop_gradient(current)), and the loss is multiplied by the truncated (or masked) ratio
  exp(old - sampler), which is TRL's `vllm_importance_sampling_correction`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from maxent_jax.objectives.groups import masked
from maxent_jax.objectives.settings import ObjectiveSettings

Array = jax.Array

LOG_RATIO_CLAMP = 60.0


def old_token_logp(token_logp: Array, batch: Mapping[str, Array], settings: ObjectiveSettings) -> Array:
    """The ratio denominator `[P, G, T]` (constant), chosen as described in the module doc."""
    current = jax.lax.stop_gradient(token_logp)
    if settings.sampler_correction == "none" and "behaviour_logp" in batch:
        return jax.lax.stop_gradient(batch["behaviour_logp"])
    if "old_logp" in batch:
        return jax.lax.stop_gradient(batch["old_logp"])
    return current


def log_ratio(token_logp: Array, old_logp: Array, token_mask: Array, level: str) -> Array:
    """Log importance ratio, clamped to +-60 (spec 7.1), at the requested level.

    `sequence_sum` (reference): S_theta - S_old, `[P, G, 1]`; `sequence` (GSPO): the
    token-mean of the log-ratio, `[P, G, 1]`; `token` (TRL): per token, `[P, G, T]`.
    `token_mask` must already include the `valid` mask.
    """
    diff = masked(token_logp.astype(jnp.float32) - old_logp.astype(jnp.float32), token_mask)
    diff = jnp.where(jnp.isnan(diff), 0.0, diff)
    if level == "token":
        out = diff
    else:
        out = jnp.sum(diff, axis=-1, keepdims=True)
        if level == "sequence":
            out = out / jnp.maximum(jnp.sum(token_mask, axis=-1, keepdims=True), 1).astype(jnp.float32)
    return jnp.clip(out, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def clipped_surrogate(ratio: Array, advantage: Array, eps_low: float, eps_high: float, rule: str) -> Array:
    """PPO surrogate o = min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) (to be maximised).

    `rule='reference_max'` uses max instead of min for negative advantages (spec 7.1, Q12).
    """
    unclipped = ratio * advantage
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantage
    lower = jnp.minimum(unclipped, clipped)
    if rule == "reference_max":
        return jnp.where(advantage >= 0, lower, jnp.maximum(unclipped, clipped))
    return lower


def sampler_correction(
    token_logp: Array, batch: Mapping[str, Array], token_mask: Array, settings: ObjectiveSettings
) -> Array:
    """Multiplicative correction `[P, G, T]` or `[P, G, 1]` (constant); ones when disabled.

    r = exp(old - sampler) per token (`token_*`) or of the masked sum (`sequence_*`);
    `*_truncate` clamps r to [min, max]; `*_mask` zeroes r outside [min, max]. Tokens
    whose sampler log-prob is NaN get r = 1 (no information, no correction).
    """
    mode = settings.sampler_correction
    if mode == "none" or "behaviour_logp" not in batch:
        return jnp.ones(token_logp.shape[:2] + (1,), jnp.float32)
    old = old_token_logp(token_logp, batch, settings).astype(jnp.float32)
    diff = masked(old - jax.lax.stop_gradient(batch["behaviour_logp"]).astype(jnp.float32), token_mask)
    diff = jnp.where(jnp.isnan(diff), 0.0, diff)
    if mode.startswith("sequence"):
        diff = jnp.sum(diff, axis=-1, keepdims=True)
    r = jnp.exp(jnp.clip(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lo, hi = settings.sampler_correction_min, settings.sampler_correction_max
    if mode.endswith("truncate"):
        return jnp.clip(r, lo, hi)
    return jnp.where((r < lo) | (r > hi), 0.0, r)


def per_sequence(factor: Array, token_mask: Array) -> Array:
    """`[P, G, 1|T]` factor -> `[P, G]`: the masked token mean (a sequence-level factor as is).

    A per-sequence loss term multiplied by this equals TRL's `grpo` aggregation of that
    term times a per-token factor.
    """
    if factor.shape[-1] == 1:
        return factor[..., 0]
    n = jnp.maximum(jnp.sum(token_mask, axis=-1), 1).astype(jnp.float32)
    return jnp.sum(masked(factor, token_mask), axis=-1) / n
