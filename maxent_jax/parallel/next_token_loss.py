"""Plain next-token (supervised) loss on completion tokens, in the train step's `loss_fn` form.

    loss = -sum_ij m_ij * logp_ij / max(1, sum_ij m_ij)
    logp = completion_logprobs(model, batch)  [N, Tc],  m = completion_mask  [N, Tc]

Used for supervised warm-up, for the parallel tests (sharded vs single-device equality) and
for the train-step benchmark; the RL objectives plug into the same `loss_fn(model, batch)` slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxent_jax.parallel.forward import completion_logprobs


def next_token_loss(
    model: nnx.Module, batch: dict[str, jax.Array], *, chunk_size: int = 256, group: int = 1
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean negative log-likelihood of masked completion tokens; metrics: token count.

    `group` > 1: rows come in groups sharing a prompt, scored once per group (`completion_logprobs`).
    """
    logp = completion_logprobs(model, batch, chunk_size=chunk_size, group=group)
    mask = batch["completion_mask"].astype(jnp.float32)
    tokens = mask.sum()
    loss = -(logp * mask).sum() / jnp.maximum(tokens, 1.0)
    return loss, {"tokens": tokens}
