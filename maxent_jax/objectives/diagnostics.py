"""Completion-length statistics (spec 5.5) under the spec 12.4 metric names.

KL and clip-region diagnostics live with the estimators in `kl.py`; reward statistics with
the advantages in `grpo.py`; weight and q entropies with the weights in `maxent.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxent_jax.objectives.groups import masked_max, masked_mean, masked_min

Array = jax.Array


def length_stats(lengths: Array, valid: Array, max_completion_length: int) -> dict[str, Array]:
    """Min/mean/max completion length, the clipped fraction (n >= max_completion_length), and
    min/mean/max over the non-clipped ("terminated") completions (0 where a set is empty).

    Args:
      lengths: token counts `[P, G]` (or any shape matching `valid`); valid: bool mask.
    """
    n = lengths.astype(jnp.float32)
    clipped = n >= max_completion_length
    terminated = valid & ~clipped
    return {
        "completions/mean_length_sampled": masked_mean(n, valid),
        "completions/min_length_sampled": masked_min(n, valid),
        "completions/max_length_sampled": masked_max(n, valid),
        "completions/clipped_frac": masked_mean(clipped.astype(jnp.float32), valid),
        "completions/mean_length_terminated": masked_mean(n, terminated),
        "completions/min_length_terminated": masked_min(n, terminated),
        "completions/max_length_terminated": masked_max(n, terminated),
    }
