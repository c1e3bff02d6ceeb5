"""Loss aggregation: how per-token or per-sequence loss values become one scalar.

* `reference`: per-sequence values, summed over a group's valid members and averaged over
  the non-empty groups of the micro-batch (spec 7.1/7.2: (1/B) sum_g sum_{i in g} x_i).
* TRL's names (per-token values `[P, G, T]`, sequence-level values broadcast over tokens):
  `grpo`: mean over sequences of each sequence's token mean; `bnpo`: mean over all tokens;
  `dr_grpo`: token sum / (number of valid sequences * max_completion_length);
  `dapo`: token sum / `token_normalizer`, the number of tokens per micro-batch of the
  accumulation window (the loop passes it, so that the mean of the micro-batch losses is a
  global token mean as in TRL; a scalar or that value repeated per row); without it, the
  micro-batch's own token count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxent_jax.objectives.groups import masked, nonempty_groups

Array = jax.Array


def mean_over_groups(per_sequence: Array, valid: Array) -> Array:
    """(1/B) sum_g sum_{i in g} x_i over valid members; B = non-empty groups (0 if none)."""
    b = jnp.sum(nonempty_groups(valid)).astype(jnp.float32)
    return jnp.sum(masked(per_sequence, valid)) / jnp.maximum(b, 1.0)


def aggregate_tokens(
    per_token: Array,
    token_mask: Array,
    valid: Array,
    loss_type: str,
    max_completion_length: int,
    token_normalizer: Array | None = None,
) -> Array:
    """Aggregate `[P, G, T]` (or `[P, G, 1]`, broadcast) per-token losses by TRL `loss_type`.

    `token_mask` must already include `valid`. `reference` is treated as `bnpo` here (a
    token-weighted mean), which is how token-level KL estimators enter the reference loss.
    """
    per_token = jnp.broadcast_to(per_token, token_mask.shape)
    x = masked(per_token, token_mask)
    tokens = jnp.sum(token_mask).astype(jnp.float32)
    if loss_type == "grpo":
        n = jnp.maximum(jnp.sum(token_mask, axis=-1), 1).astype(jnp.float32)
        seq = jnp.sum(x, axis=-1) / n
        return jnp.sum(masked(seq, valid)) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    if loss_type in ("bnpo", "reference"):
        return jnp.sum(x) / jnp.maximum(tokens, 1.0)
    if loss_type == "dr_grpo":
        rows = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
        return jnp.sum(x) / (rows * float(max_completion_length))
    if loss_type == "dapo":
        # a scalar, or the same value repeated per row (to fit a row-sharded batch)
        norm = tokens if token_normalizer is None else jnp.mean(jnp.asarray(token_normalizer, jnp.float32))
        return jnp.sum(x) / jnp.maximum(norm, 1.0)
    raise ValueError(f"aggregate_tokens: unknown loss_type {loss_type!r}")
