"""MaxEnt sequence weights (spec 6.2-6.4): listwise target q, weights w, entropy statistics.

All functions take the dense group layout of `groups.py` (`[P, G]` with `valid[P, G]`) and
run in float32. They are differentiable in (tau, beta), which the meta-controller uses; the
policy loss treats the resulting weights as constants (stop-gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxent_jax.objectives.groups import (
    group_sizes,
    masked,
    masked_max,
    masked_mean,
    masked_min,
    masked_softmax,
    masked_std,
    nonempty_groups,
)

Array = jax.Array

_Q_TEMPERATURE_FLOOR = 1e-8
_LOG_FLOOR = 1e-12
_DENOM_FLOOR = 1e-8
_DEAD_REFERENCE = -1e30


def listwise_target(u: Array, valid: Array, q_temperature: float | Array, q_epsilon: float | Array) -> Array:
    """Listwise target q `[P, G]` from utilities `u[P, G]` (spec 6.2).

    p = softmax(u / max(T_q, 1e-8)) over the valid members; q = (p (1 - K eps) + eps),
    renormalised, with K the group's valid-member count. Invalid members and empty groups
    get 0. A zero-variance group gives exactly 1/K.
    """
    u = u.astype(jnp.float32)
    t = jnp.maximum(jnp.asarray(q_temperature, jnp.float32), _Q_TEMPERATURE_FLOOR)
    p = masked_softmax(u / t, valid)
    k = group_sizes(valid)[:, None]
    eps = jnp.asarray(q_epsilon, jnp.float32)
    raw = masked(p * (1.0 - k * eps) + eps, valid)
    total = jnp.sum(raw, axis=-1, keepdims=True)
    return jnp.where(total != 0, raw / jnp.where(total != 0, total, 1.0), 0.0)


def reference_term(ref_logp_sum: Array, lengths: Array, length_normalize_ref: bool) -> Array:
    """r `[P, G]` of spec 6.3: S_ref / max(n, 1) when length-normalised, else the raw S_ref."""
    ref = ref_logp_sum.astype(jnp.float32)
    if length_normalize_ref:
        return ref / jnp.maximum(lengths.astype(jnp.float32), 1.0)
    return ref


def maxent_weights(
    q: Array,
    ref_logp_sum: Array,
    valid: Array,
    tau: float | Array,
    beta: float | Array,
    lengths: Array,
    length_normalize_ref: bool = True,
) -> Array:
    """MaxEnt weights `[P, G]` (spec 6.3), w proportional to q^(1/d) * pi_ref^(beta/d).

    Args:
      q: listwise target `[P, G]` (`listwise_target`).
      ref_logp_sum: summed reference log-probs S_ref `[P, G]` (raw sums; the per-token mean
        is taken here when `length_normalize_ref`).
      valid: `[P, G]` bool.
      tau, beta: scalars (traced or Python); d = max(tau + beta, 1e-8).
      lengths: reference token counts n `[P, G]`.
      length_normalize_ref: r = S_ref / max(n,1) (True) or raw S_ref with the length
        re-weighting w_i = w~_i max(n_i,1) / sum_j w~_j max(n_j,1) (False).

    Returns weights summing to 1 over the valid members of each non-empty group, 0 elsewhere.
    A member whose reference log-prob is -inf gets weight 0 when beta > 0; if every member
    of a group has one, the group gets uniform weights (the reference's exception fallback).
    """
    tau = jnp.asarray(tau, jnp.float32)
    beta = jnp.asarray(beta, jnp.float32)
    d = jnp.maximum(tau + beta, _DENOM_FLOOR)
    r = reference_term(ref_logp_sum, lengths, length_normalize_ref)
    # a -inf (or NaN) reference log-prob becomes a huge finite penalty: weight 0 when beta > 0,
    # and no effect at beta = 0 (where 0 * -inf would otherwise be NaN)
    r = jnp.where(jnp.isfinite(r), r, _DEAD_REFERENCE)
    logits = jnp.log(jnp.maximum(q.astype(jnp.float32), _LOG_FLOOR)) / d + (beta / d) * r
    w = masked_softmax(logits, valid)
    if length_normalize_ref:
        return w
    scaled = w * jnp.maximum(lengths.astype(jnp.float32), 1.0)
    total = jnp.sum(scaled, axis=-1, keepdims=True)
    return jnp.where(total > 0, scaled / jnp.where(total > 0, total, 1.0), 0.0)


def group_entropy(w: Array, valid: Array) -> Array:
    """Per-group entropy `[P]`: H_g = -sum_i w_i log max(w_i, 1e-12) over valid members."""
    w = w.astype(jnp.float32)
    return -jnp.sum(masked(w * jnp.log(jnp.maximum(w, _LOG_FLOOR)), valid), axis=-1)


def weight_entropy_stats(w: Array, valid: Array) -> dict[str, Array]:
    """Spec 6.4 statistics of the weights, under the spec 12.4 metric names.

    `weight_entropy{,_min,_max}`: mean/min/max of H_g over non-empty groups (0 if none);
    `advantage_entropy_{mean,std}`: mean and population std of the samples w_i - 1/K_g over
    valid members.
    """
    h = group_entropy(w, valid)
    keep = nonempty_groups(valid)
    k = group_sizes(valid)[:, None]
    samples = w - 1.0 / jnp.maximum(k, 1.0)
    return {
        "weight_entropy": masked_mean(h, keep),
        "weight_entropy_min": masked_min(h, keep),
        "weight_entropy_max": masked_max(h, keep),
        "advantage_entropy_mean": masked_mean(samples, valid),
        "advantage_entropy_std": masked_std(samples, valid),
    }


def q_entropy_stats(q: Array, valid: Array) -> dict[str, Array]:
    """`q_entropy_{mean,std,min,max}` (spec 12.4): entropy of q per non-empty group."""
    h = group_entropy(q, valid)
    keep = nonempty_groups(valid)
    return {
        "q_entropy_mean": masked_mean(h, keep),
        "q_entropy_std": masked_std(h, keep),
        "q_entropy_min": masked_min(h, keep),
        "q_entropy_max": masked_max(h, keep),
    }


def prepare_maxent_batch(
    utilities: Array,
    valid: Array,
    ref_logp_sum: Array,
    lengths: Array,
    tau: float | Array,
    beta: float | Array,
    *,
    q_temperature: float,
    q_epsilon: float,
    length_normalize_ref: bool = True,
) -> tuple[Array, dict[str, Array]]:
    """Pre-step helper: weights `[P, G]` and their statistics from rewards + reference stats.

    Run once per batch before the train step (jit it with `length_normalize_ref` static);
    the weights go into the step's batch as `weights`. Statistics: weight and q entropies
    (spec 6.4, 12.4) and `weight_norm_denom` (tau + beta, or 1.0 if that is <= 0, spec 6.1).
    """
    q = listwise_target(utilities, valid, q_temperature, q_epsilon)
    w = maxent_weights(q, ref_logp_sum, valid, tau, beta, lengths, length_normalize_ref)
    denom = jnp.asarray(tau, jnp.float32) + jnp.asarray(beta, jnp.float32)
    stats = {
        **weight_entropy_stats(w, valid),
        **q_entropy_stats(q, valid),
        "weight_norm_denom": jnp.where((denom > 0) & jnp.isfinite(denom), denom, 1.0),
    }
    return w, stats
