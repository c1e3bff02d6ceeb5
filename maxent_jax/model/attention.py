"""Grouped-query attention over a head-major key/value layout that both matmuls read in place.

    keys   `[batch, kv_heads, head_dim, keys]`  (transposed: scores = rows @ keys is a plain GEMM)
    values `[batch, kv_heads, keys, head_dim]`  (out = probs @ values is a plain GEMM)

Why its own function rather than `jax.nn.dot_product_attention`: that function takes keys in
`[batch, keys, kv_heads, head_dim]` order, and XLA then re-lays every layer's keys and values out
head-major before its two batched matmuls. Inside the sampler's decode loop those copies cover the
whole KV cache on every step of every layer, so a step's cost grew with the cache length (about a
fifth of a decode step on XLA:CPU for a 128-slot cache). Keeping the cache head-major makes both
matmuls read it in place.

    scores[b, k, g, t, s] = scale * q[b, t, k*G + g, :] . keys[b, k, :, s]   (float32)
    probs = softmax over s of scores, -inf where mask[b, t, s] is false
    out[b, t, k*G + g, :] = sum_s probs[b, k, g, t, s] * value[b, k, s, :]

Query head i reads kv head i // G (G = heads // kv_heads), the grouping of Qwen2/Llama/HF.
Numerics follow `jax.nn.dot_product_attention`: scores and softmax in float32 (at least),
probabilities cast back to the values' dtype before the second matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def key_layout(k: jax.Array) -> jax.Array:
    """A projection's keys `[batch, seq, kv_heads, head_dim]` -> `[batch, kv_heads, head_dim, seq]`."""
    return k.transpose(0, 2, 3, 1)


def value_layout(v: jax.Array) -> jax.Array:
    """A projection's values `[batch, seq, kv_heads, head_dim]` -> `[batch, kv_heads, seq, head_dim]`."""
    return v.transpose(0, 2, 1, 3)


def grouped_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q `[batch, seq, heads, head_dim]`, keys/values as above, mask `[batch, seq, keys]` bool.

    Returns `[batch, seq, heads, head_dim]` in q's dtype. Every query row needs at least one true mask
    entry (the decoder always lets a slot see itself).
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    # [batch, kv_heads, group*seq, head_dim]: both matmuls become plain batched GEMMs over (batch, kv_heads)
    # that read the cache in place (other operand orders make XLA:CPU transpose the cache or fall back
    # to a slow strided dot).
    rows = q.reshape(batch, seq, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    rows = rows.reshape(batch, kv_heads, group * seq, head_dim)
    score_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("bkqh,bkhs->bkqs", rows, keys, preferred_element_type=score_dtype)
    visible = jnp.broadcast_to(mask[:, None, None], (batch, 1, group, seq, mask.shape[-1]))
    visible = visible.reshape(batch, 1, group * seq, mask.shape[-1])
    scores = jnp.where(visible, scores * jnp.asarray(scale, score_dtype), -jnp.inf)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(values.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, values)
    out = out.reshape(batch, kv_heads, group, seq, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, seq, heads, head_dim).astype(q.dtype)
