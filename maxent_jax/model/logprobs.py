"""Per-token log-probabilities of given targets without materialising full logits.

For a 151k-token vocabulary, logits of 16k tokens take ~10 GB in float32. `token_logprobs` walks
the sequence in chunks (`lax.map`), and for each chunk computes logits `[batch, chunk, vocab]`
in float32, their log-softmax and the gathered target entry:

    logp[b, t] = z[b, t, y[b, t]] - logsumexp_v z[b, t, v],   z = hidden @ W_head

With several chunks each is wrapped in `jax.checkpoint`, so under `jax.grad` the backward pass
recomputes the chunk's logits instead of storing every chunk's: at most one `[batch, chunk, vocab]`
block is live forward and backward. One block (chunk_size 0 or >= seq) is not recomputed: it is
the last thing the forward computes and the first the backward reads, so its residual adds nothing
to peak memory, and recomputing it cost the tiny preset's update 8-13% (a second vocabulary matmul).
The gradient of the picked log-prob is written by hand (`target_logprobs`). The optional entropy
H[b, t] = -sum_v p log p costs one extra reduction over the same block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxent_jax.errors import UserError
from maxent_jax.model.decoder import Decoder, dense


def token_logprobs(model: Decoder, hidden: jax.Array, targets: jax.Array, *, chunk_size: int,
                   return_entropy: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """log p(targets[b, t] | hidden[b, t]) as `[batch, seq]` float32 (and entropy `[batch, seq]` if asked).

    hidden `[batch, seq, embed]` (the decoder's output), targets `[batch, seq]` int32 (any value at
    positions the caller ignores; out-of-range ids are clipped). `chunk_size` is the number of
    sequence positions per logits block (0 = the whole sequence in one block, as the config's
    `model.logprob_chunk_size` means); seq is padded up to a multiple of it internally.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 0:
        raise UserError(f"chunk_size={chunk_size!r} is invalid; expected a non-negative integer (0 = whole sequence)")
    return chunked_logprobs(model.lm_head_kernel(), hidden, targets, chunk_size=chunk_size,
                            return_entropy=return_entropy)


def chunked_logprobs(kernel: jax.Array, hidden: jax.Array, targets: jax.Array, *, chunk_size: int,
                     return_entropy: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Same as `token_logprobs` for an explicit head kernel `[embed, vocab]` (pure function of arrays)."""
    batch, seq, embed = hidden.shape
    chunk = min(chunk_size, seq) if chunk_size > 0 else seq
    num_chunks = -(-seq // chunk)
    pad = num_chunks * chunk - seq
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)))
    vocab = kernel.shape[1]
    targets = jnp.clip(targets, 0, vocab - 1)
    # [chunks, batch, chunk, ...]: lax.map walks the leading axis.
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk, embed).swapaxes(0, 1)
    target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)
    kernel = kernel.astype(hidden.dtype)

    def one_chunk(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        h, y = args
        logits = dense(h, kernel, 1, jnp.float32)
        logp = target_logprobs(logits, y)
        if not return_entropy:
            return logp, jnp.zeros_like(logp)
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)

    if num_chunks > 1:
        one_chunk = jax.checkpoint(one_chunk)
    logp, entropy = jax.lax.map(one_chunk, (hidden_chunks, target_chunks))
    logp = logp.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :seq]
    if not return_entropy:
        return logp
    return logp, entropy.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :seq]


@jax.custom_vjp
def target_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[..., targets] `[...]` from float32 logits `[..., vocab]` and in-range int targets `[...]`.

    Why a custom VJP: autodiff of log_softmax + take_along_axis saved the log-softmax block and
    scattered the cotangent into a zeroed `[..., vocab]` array before combining it with the softmax
    term (three passes over the block). The backward here is one pass from the saved logits and
    log-normaliser: d_logits = d_logp * (onehot(targets) - exp(logits - logsumexp(logits))).
    """
    return _target_logprobs_forward(logits, targets)[0]


def _target_logprobs_forward(logits: jax.Array, targets: jax.Array
                             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - log_normaliser, (logits, targets, log_normaliser)


def _target_logprobs_backward(residuals: tuple[jax.Array, jax.Array, jax.Array], d_logp: jax.Array
                              ) -> tuple[jax.Array, None]:
    logits, targets, log_normaliser = residuals
    hit = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    probs = jnp.exp(logits - log_normaliser[..., None])
    return d_logp[..., None] * (hit.astype(logits.dtype) - probs), None


target_logprobs.defvjp(_target_logprobs_forward, _target_logprobs_backward)
