"""The weight entropy as a differentiable function of (tau, beta) on a fixed batch.

With the batch's listwise target q and reference statistics fixed, the MaxEnt weights of
spec 6.3 are a closed form (`objectives.maxent.maxent_weights`), so the batch's mean weight
entropy H(tau, beta) - and the entropy potential 0.5 (H - H*)^2 - can be differentiated
exactly with `jax.grad` (first and second derivatives).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxent_jax.objectives.groups import masked_mean, nonempty_groups
from maxent_jax.objectives.maxent import group_entropy, maxent_weights


def mean_weight_entropy(
    tau: jax.Array,
    beta: jax.Array,
    q: jax.Array,
    ref_logp_sum: jax.Array,
    valid: jax.Array,
    lengths: jax.Array,
    length_normalize_ref: bool,
) -> jax.Array:
    """Mean over non-empty groups of H_g = -sum_i w_i log max(w_i, 1e-12) (spec 6.4); a scalar.

    q: listwise target; ref_logp_sum: summed reference log-probs S_ref; valid: bool mask;
    lengths: completion token counts n - all `[prompts, group]`, as the step's weights used.
    """
    # Padding may hold anything (NaN included): neutral values keep the gradient finite, since
    # a masked entry still receives a zero cotangent that 0 * NaN would poison.
    q = jnp.where(valid, jnp.asarray(q, jnp.float32), 1.0)
    ref_logp_sum = jnp.where(valid, jnp.asarray(ref_logp_sum, jnp.float32), 0.0)
    w = maxent_weights(q, ref_logp_sum, valid, tau, beta, lengths, length_normalize_ref)
    return masked_mean(group_entropy(w, valid), nonempty_groups(valid))
