"""The weight entropy as a differentiable function of (tau, beta) on a fixed batch.

With the batch's listwise target q and reference statistics fixed, the MaxEnt weights of
spec 6.3 are a closed form, w = softmax((log max(q, 1e-12) + beta r) / max(tau + beta, 1e-8))
per group, with r = S_ref / max(n, 1) (or the raw S_ref followed by the length re-weighting
w_i n_i / sum_j w_j n_j), so the batch's mean weight entropy H(tau, beta) - and the entropy
potential 0.5 (H - H*)^2 - can be differentiated exactly with `jax.grad`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED_LOGIT = -1e30


def closed_form_weights(
    tau: jax.Array,
    beta: jax.Array,
    q: jax.Array,
    ref_logp_sum: jax.Array,
    valid: jax.Array,
    lengths: jax.Array,
    length_normalize_ref: bool,
) -> jax.Array:
    """MaxEnt weights `[prompts, group]` (spec 6.3); invalid completions get weight 0.

    q: listwise target; ref_logp_sum: summed reference log-probs S_ref; valid: bool mask;
    lengths: completion token counts n - all `[prompts, group]`.
    """
    # Padding may hold anything: neutral values keep the gradient of the masked branch finite.
    n = jnp.maximum(jnp.asarray(lengths, jnp.float32), 1.0)
    q = jnp.where(valid, jnp.asarray(q, jnp.float32), 1.0)
    s_ref = jnp.where(valid, jnp.asarray(ref_logp_sum, jnp.float32), 0.0)
    r = s_ref / n if length_normalize_ref else s_ref
    denom = jnp.maximum(tau + beta, 1e-8)
    logits = (jnp.log(jnp.maximum(q, 1e-12)) + beta * r) / denom
    w = jax.nn.softmax(jnp.where(valid, logits, _MASKED_LOGIT), axis=-1)
    w = jnp.where(valid, w, 0.0)
    if not length_normalize_ref:
        scaled = w * n
        w = scaled / jnp.maximum(jnp.sum(scaled, axis=-1, keepdims=True), 1e-30)
    return w


def mean_weight_entropy(
    tau: jax.Array,
    beta: jax.Array,
    q: jax.Array,
    ref_logp_sum: jax.Array,
    valid: jax.Array,
    lengths: jax.Array,
    length_normalize_ref: bool,
) -> jax.Array:
    """Mean over non-empty groups of H_g = -sum_i w_i log max(w_i, 1e-12) (spec 6.4); a scalar."""
    w = closed_form_weights(tau, beta, q, ref_logp_sum, valid, lengths, length_normalize_ref)
    per_group = -jnp.sum(w * jnp.log(jnp.maximum(w, 1e-12)), axis=-1)
    nonempty = jnp.any(valid, axis=-1)
    return jnp.sum(jnp.where(nonempty, per_group, 0.0)) / jnp.maximum(jnp.sum(nonempty), 1)
