"""Dense group layout and the masked reductions every objective is built from.

Layout (the one convention of `maxent_jax.objectives`):

* per-sequence arrays are `[P, G]`: P prompts (groups) x G completion slots;
* per-token arrays are `[P, G, T]`: T completion tokens, right-padded;
* `valid[P, G]` (bool) marks the slots that hold a real, kept completion; a dropped or
  padding member is `False` and contributes nothing to any sum, mean, softmax or count;
* `token_mask[P, G, T]` (bool) marks the scored completion tokens of each slot.

A rollout that returns a flat `[P*G, ...]` batch (prompt-major: the G completions of prompt
p are rows p*G .. p*G+G-1) is turned into this layout by `to_groups` and back by
`flatten_groups`. Everything is mask-based and shape-static so it can run inside one jitted,
sharded train step; no function here loops over groups in Python.

Masked-out entries may hold anything (including -inf or NaN log-probs): values are selected
with `jnp.where` before arithmetic, so they neither poison a sum nor a gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array


def to_groups(x: Array, group_size: int) -> Array:
    """Reshape a prompt-major flat batch `[P*G, ...]` into groups `[P, G, ...]`."""
    if x.shape[0] % group_size:
        raise ValueError(
            f"to_groups: leading dimension {x.shape[0]} is not a multiple of group_size={group_size}"
        )
    return x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])


def group_batch(batch: Mapping[str, Array], group_size: int) -> dict[str, Array]:
    """`to_groups` on every array of a flat, row-major batch (`[N, ...]` -> `[N/G, G, ...]`).

    Scalars (0-d arrays) pass through unchanged. This is how a loss function receiving the
    train step's flat micro-batch (rows = completions, each group's rows contiguous) gets the
    objectives' layout.
    """
    return {k: v if jnp.ndim(v) == 0 else to_groups(v, group_size) for k, v in batch.items()}


def flatten_groups(x: Array) -> Array:
    """Inverse of `to_groups`: `[P, G, ...]` -> `[P*G, ...]`."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def masked(x: Array, mask: Array, fill: float = 0.0) -> Array:
    """`x` where `mask`, else `fill` (NaN/inf-safe, gradient-safe replacement for `x * mask`)."""
    return jnp.where(mask, x, jnp.asarray(fill, dtype=x.dtype))


def token_counts(token_mask: Array, valid: Array) -> Array:
    """Scored tokens per sequence `[P, G]` (float32); 0 for invalid members."""
    return jnp.where(valid, jnp.sum(token_mask, axis=-1), 0).astype(jnp.float32)


def sequence_logp(token_logp: Array, token_mask: Array, valid: Array) -> Array:
    """Sum of the scored token log-probs `[P, G, T] -> [P, G]`; 0 for invalid members."""
    mask = token_mask & valid[..., None]
    return jnp.sum(masked(token_logp.astype(jnp.float32), mask), axis=-1)


def group_sizes(valid: Array) -> Array:
    """Number of valid members per group `[P, G] -> [P]` (float32)."""
    return jnp.sum(valid, axis=-1).astype(jnp.float32)


def nonempty_groups(valid: Array) -> Array:
    """`[P]` bool: the group has at least one valid member (empty groups are skipped, spec 7.1)."""
    return jnp.any(valid, axis=-1)


def masked_softmax(logits: Array, valid: Array) -> Array:
    """Softmax over the last axis restricted to `valid`; 0 on invalid entries and on empty rows.

    Non-finite logits of valid entries (-inf, NaN) get zero probability; a row whose valid
    logits are all non-finite falls back to the uniform distribution over its valid members
    (the reference's "numeric exception -> uniform" rule, spec 6.3).
    """
    finite = valid & jnp.isfinite(logits)
    any_finite = jnp.any(finite, axis=-1, keepdims=True)
    use = jnp.where(any_finite, finite, valid)
    z = jnp.where(finite, logits, 0.0)
    z_max = jnp.max(jnp.where(use, z, -jnp.inf), axis=-1, keepdims=True)
    z_max = jnp.where(jnp.isfinite(z_max), z_max, 0.0)
    e = jnp.where(use, jnp.exp(z - jax.lax.stop_gradient(z_max)), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return jnp.where(total > 0, e / jnp.where(total > 0, total, 1.0), 0.0)


def group_mean(x: Array, valid: Array) -> Array:
    """Mean over the valid members of each group `[P, G] -> [P]` (0 for an empty group)."""
    n = group_sizes(valid)
    return jnp.sum(masked(x, valid), axis=-1) / jnp.maximum(n, 1.0)


def group_std(x: Array, valid: Array) -> Array:
    """Bessel-corrected std over the valid members of each group `[P, G] -> [P]`.

    A group with fewer than two valid members has std 0 (as TRL for `num_generations=1`).
    """
    n = group_sizes(valid)
    mu = group_mean(x, valid)[:, None]
    ss = jnp.sum(masked((x - mu) ** 2, valid), axis=-1)
    return jnp.where(n > 1, jnp.sqrt(ss / jnp.maximum(n - 1.0, 1.0)), 0.0)


def masked_mean(x: Array, mask: Array) -> Array:
    """Scalar mean of `x` over `mask` (0 when the mask is empty)."""
    return jnp.sum(masked(x, mask)) / jnp.maximum(jnp.sum(mask), 1).astype(x.dtype)


def masked_std(x: Array, mask: Array) -> Array:
    """Scalar population std of `x` over `mask` (0 when the mask is empty)."""
    mu = masked_mean(x, mask)
    return jnp.sqrt(masked_mean((x - mu) ** 2, mask))


def masked_min(x: Array, mask: Array) -> Array:
    """Scalar min of `x` over `mask` (0 when the mask is empty)."""
    return jnp.where(jnp.any(mask), jnp.min(jnp.where(mask, x, jnp.inf)), 0.0)


def masked_max(x: Array, mask: Array) -> Array:
    """Scalar max of `x` over `mask` (0 when the mask is empty)."""
    return jnp.where(jnp.any(mask), jnp.max(jnp.where(mask, x, -jnp.inf)), 0.0)
