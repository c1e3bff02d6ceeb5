"""A flash-attention stand-in for planning `model.attention='cudnn'` on a machine without cuDNN.

The planner compiles the trainer's programs on CPU host devices. cuDNN's fused attention cannot
be lowered there, and XLA's `dot_product_attention` would materialise `[batch, heads, seq, seq]`
scores, which the cuDNN kernel never does: planning with it would call a 7B recipe with 6k-token
rows a thousand times too big. This module computes the same attention in tiles, as the kernel
does, so the compiled program's temporaries have the kernel's shape:

    forward:  for each query tile, an online softmax over the key tiles (running max and sum);
              saves only the output and the log-sum-exp `[batch, heads, seq]` for the backward
    backward: per key tile, the probabilities recomputed from the saved log-sum-exp, the tile's
              dK and dV summed over query tiles, dQ accumulated across key tiles

Tiles are `TILE` rows and keys; the live score tile per step is `[batch, heads, TILE, TILE]`
float32. The numbers equal `jax.nn.dot_product_attention(..., is_causal=True,
key_value_seq_lengths=...)` (tests/test_plan.py), so a plan's outputs are real, but the loops
make XLA's cost analysis count one tile: plan FLOPs come from a loop-free program instead
(`maxent_jax.plan.programs`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

TILE = 512


def _tiles(seq: int) -> int:
    """Tile size for a sequence: TILE, or the whole sequence when shorter (no padding then)."""
    return min(TILE, seq)


def _scores(q: jax.Array, k: jax.Array, q0: jax.Array, k0: jax.Array, lengths: jax.Array, scale: float) -> jax.Array:
    """Masked float32 scores `[batch, kv, group, tq, tk]` of a query tile starting at q0 and a key tile at k0."""
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    qi = q0 + jnp.arange(q.shape[1])
    ki = k0 + jnp.arange(k.shape[1])
    visible = (ki[None, :] <= qi[:, None])[None] & (ki[None, None, :] < jnp.maximum(lengths, 1)[:, None, None])
    return jnp.where(visible[:, None, None], s, -jnp.inf)


def _split(x: jax.Array, tile: int) -> jax.Array:
    """`[batch, seq, ...]` -> `[seq / tile, batch, tile, ...]` (the loop axis first)."""
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // tile, tile, *x.shape[2:]), 1, 0)


def _merge(x: jax.Array) -> jax.Array:
    """The inverse of `_split`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, scale: float
             ) -> tuple[jax.Array, jax.Array]:
    """(out `[b, t, kv, g, d]` in q's dtype, log-sum-exp `[b, kv, g, t]` float32), tile by tile."""
    tq, tk = _tiles(q.shape[1]), _tiles(k.shape[1])
    k_tiles, v_tiles = _split(k, tk), _split(v, tk)

    def query_tile(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        q_tile, q0 = args
        b, t, kv, g, d = q_tile.shape

        def key_tile(carry, kv_tile):
            m, l, acc = carry
            k_tile, v_tile, k0 = kv_tile
            s = _scores(q_tile, k_tile, q0, k0, lengths, scale)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - safe[..., None])
            correction = jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgts,bskd->btkgd", p.astype(v_tile.dtype), v_tile, preferred_element_type=jnp.float32)
            acc = acc * jnp.moveaxis(correction, -1, 1)[..., None] + pv
            return (m_new, l, acc), None

        init = (jnp.full((b, kv, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, kv, g, t), jnp.float32),
                jnp.zeros((b, t, kv, g, d), jnp.float32))
        starts = jnp.arange(k_tiles.shape[0]) * tk
        (m, l, acc), _ = jax.lax.scan(key_tile, init, (k_tiles, v_tiles, starts))
        out = acc / jnp.moveaxis(jnp.maximum(l, 1e-30), -1, 1)[..., None]
        return out.astype(q.dtype), m + jnp.log(jnp.maximum(l, 1e-30))

    q_starts = jnp.arange(q.shape[1] // tq) * tq
    out, lse = jax.lax.map(query_tile, (_split(q, tq), q_starts))
    return _merge(out), jnp.moveaxis(lse, 0, -2).reshape(*lse.shape[1:-1], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, scale: float) -> jax.Array:
    return _forward(q, k, v, lengths, scale)[0]


def _attention_fwd(q, k, v, lengths, scale):
    out, lse = _forward(q, k, v, lengths, scale)
    return out, (q, k, v, lengths, out, lse)


def _attention_bwd(scale, saved, d_out):
    q, k, v, lengths, out, lse = saved
    tq, tk = _tiles(q.shape[1]), _tiles(k.shape[1])
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    q_tiles, do_tiles = _split(q, tq), _split(d_out, tq)
    lse_tiles = jnp.moveaxis(lse.reshape(*lse.shape[:-1], -1, tq), -2, 0)
    delta_tiles = jnp.moveaxis(delta.reshape(*delta.shape[:-1], -1, tq), -2, 0)
    q_starts = jnp.arange(q_tiles.shape[0]) * tq

    def key_tile(d_q, kv_tile):
        k_tile, v_tile, k0 = kv_tile

        def query_tile(carry, q_args):
            d_k, d_v = carry
            q_tile, do_tile, lse_tile, delta_tile, q0 = q_args
            p = jnp.exp(_scores(q_tile, k_tile, q0, k0, lengths, scale) - lse_tile[..., None])
            d_v = d_v + jnp.einsum("bkgts,btkgd->bskd", p.astype(do_tile.dtype), do_tile,
                                   preferred_element_type=jnp.float32)
            d_p = jnp.einsum("btkgd,bskd->bkgts", do_tile, v_tile, preferred_element_type=jnp.float32)
            d_s = (p * (d_p - delta_tile[..., None]) * scale).astype(q_tile.dtype)
            d_k = d_k + jnp.einsum("bkgts,btkgd->bskd", d_s, q_tile, preferred_element_type=jnp.float32)
            d_q_tile = jnp.einsum("bkgts,bskd->btkgd", d_s, k_tile, preferred_element_type=jnp.float32)
            return (d_k, d_v), d_q_tile

        zeros = jnp.zeros(k_tile.shape, jnp.float32)
        (d_k, d_v), d_q_tiles = jax.lax.scan(query_tile, (zeros, zeros),
                                             (q_tiles, do_tiles, lse_tiles, delta_tiles, q_starts))
        return d_q + _merge(d_q_tiles), (d_k, d_v)

    k_starts = jnp.arange(k.shape[1] // tk) * tk
    d_q, (d_k, d_v) = jax.lax.scan(key_tile, jnp.zeros(q.shape, jnp.float32), (_split(k, tk), _split(v, tk), k_starts))
    return d_q.astype(q.dtype), _merge(d_k).astype(k.dtype), _merge(d_v).astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def tiled_prefix_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, scale: float,
                                  implementation: str) -> jax.Array:
    """`maxent_jax.model.attention.prefix_causal_attention`'s signature and numbers, computed in tiles.

    q `[batch, seq, heads, head_dim]`, k and v `[batch, seq, kv_heads, head_dim]`, lengths `[batch]`.
    The sequence is padded up to a multiple of the tile (padding keys are masked by `lengths`,
    padding queries dropped).
    """
    del implementation
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    tile = _tiles(seq)
    padded = -(-seq // tile) * tile
    pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
    q5 = jnp.pad(q, pad).reshape(batch, padded, kv_heads, heads // kv_heads, head_dim)
    out = _attention(q5, jnp.pad(k, pad), jnp.pad(v, pad), lengths.astype(jnp.int32), scale)
    return out.reshape(batch, padded, heads, head_dim)[:, :seq]
