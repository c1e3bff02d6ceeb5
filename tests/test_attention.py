"""The training/scoring attention path (`causal_attention`): forward equal to `grouped_attention`, gradients
equal to autodiff of it, for left- and right-padded rows, grouped heads and uneven causal blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxent_jax.model.attention import (_causal_attention, causal_attention, causal_blocks, grouped_attention,
                                        key_layout, value_layout)

BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 3, 11, 4, 2, 8
SCALE = HEAD_DIM ** -0.5


def _inputs(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (BATCH, SEQ, HEADS, HEAD_DIM)) * 2.0
    k = jax.random.normal(keys[1], (BATCH, SEQ, KV_HEADS, HEAD_DIM)) * 2.0
    v = jax.random.normal(keys[2], (BATCH, SEQ, KV_HEADS, HEAD_DIM))
    weight = jax.random.normal(keys[3], (BATCH, SEQ, HEADS, HEAD_DIM))
    # The decoder's mask: causal, padding keys hidden, a slot always sees itself. Row 1 is left-padded
    # (3 pads), row 2 right-padded (4 pads).
    slot = np.arange(SEQ)
    valid = np.stack([np.ones(SEQ, bool), slot >= 3, slot < SEQ - 4])
    mask = (valid[:, None, :] & (slot[None, :] <= slot[:, None])[None]) | np.eye(SEQ, dtype=bool)[None]
    return q, k, v, weight, jnp.asarray(mask)


def _reference(q, k, v, mask):
    return grouped_attention(q, key_layout(k), value_layout(v), mask, SCALE)


def test_causal_blocks_partition_the_queries():
    assert causal_blocks(104) == ((0, 34), (34, 69), (69, 104))
    assert causal_blocks(5) == ((0, 5),) and causal_blocks(1) == ((0, 1),)
    assert causal_blocks(1024) == ((0, 256), (256, 512), (512, 768), (768, 1024))  # capped at 4 blocks
    for seq in (1, 7, 33, 100, 257, 4099):
        blocks = causal_blocks(seq)
        assert blocks[0][0] == 0 and blocks[-1][1] == seq
        assert all(lo < hi for lo, hi in blocks) and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("blocks", [((0, SEQ),), ((0, 2), (2, 7), (7, SEQ))], ids=["one-block", "three-blocks"])
def test_forward_and_gradients_match_autodiff_of_grouped_attention(blocks):
    q, k, v, weight, mask = _inputs()

    def loss(fn):
        return lambda q, k, v: jnp.sum(weight * fn(q, k, v))

    reference = lambda q, k, v: _reference(q, k, v, mask)  # noqa: E731
    custom = lambda q, k, v: _causal_attention(q, k, v, mask, SCALE, blocks)  # noqa: E731
    np.testing.assert_allclose(custom(q, k, v), reference(q, k, v), rtol=1e-6, atol=1e-6)
    got = jax.jit(jax.grad(loss(custom), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6, err_msg=f"d{name}")


def test_public_entry_under_jit_and_in_bfloat16():
    """`causal_attention` picks its blocks from the sequence length; in bfloat16 it stays within bfloat16
    rounding of the float32 result, forward and backward (dtypes preserved)."""
    q, k, v, weight, mask = _inputs(1)
    f32 = jax.jit(lambda q, k, v: causal_attention(q, k, v, mask, SCALE))(q, k, v)
    np.testing.assert_allclose(f32, _reference(q, k, v, mask), rtol=1e-6, atol=1e-6)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = causal_attention(*low, mask, SCALE)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), f32, atol=5e-2)
    grads = jax.grad(lambda q, k, v: jnp.sum(weight * causal_attention(q, k, v, mask, SCALE).astype(jnp.float32)),
                     argnums=(0, 1, 2))(*low)
    want = jax.grad(lambda q, k, v: jnp.sum(weight * _reference(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), w, atol=0.1 * float(jnp.max(jnp.abs(w))))
