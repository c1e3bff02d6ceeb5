"""The training/scoring attention path (`causal_attention`): forward equal to `grouped_attention`, gradients
equal to autodiff of it, for left- and right-padded rows, grouped heads, uneven causal blocks and queries
that are the last slots of longer keys; `shared_prompt_attention` equal to attending per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxent_jax.model.attention import (_causal_attention, causal_attention, causal_blocks, grouped_attention,
                                        key_layout, shared_prompt_attention, value_layout)

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


def _loss_grads(fn, weight, *args):
    return jax.jit(jax.grad(lambda *a: jnp.sum(weight * fn(*a)), argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("blocks", [((0, 7),), ((0, 3), (3, 7))], ids=["one-block", "two-blocks"])
def test_queries_after_earlier_keys_match_autodiff_of_grouped_attention(blocks):
    """Queries in the last 7 of 11 key slots (a completion after its 4-slot prompt)."""
    q, k, v, weight, mask = _inputs(2)
    q, weight, mask = q[:, 4:], weight[:, 4:], mask[:, 4:]
    custom = lambda q, k, v: _causal_attention(q, k, v, mask, SCALE, blocks)  # noqa: E731
    reference = lambda q, k, v: _reference(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(custom(q, k, v), reference(q, k, v), rtol=1e-6, atol=1e-6)
    for name, g, w in zip("qkv", _loss_grads(custom, weight, q, k, v), _loss_grads(reference, weight, q, k, v)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6, err_msg=f"d{name}")


def test_shared_prompt_attention_equals_attending_row_by_row():
    """2 prompts (4 slots, the second left-padded) x 3 completions (5 slots, right-padded by 0..2):
    packed, each completion's outputs and every input's gradient (summed over a group's copies of its
    prompt) are those of the unpacked rows."""
    prompts, group, tp, tc = 2, 3, 4, 5
    keys = jax.random.split(jax.random.key(3), 4)
    packed = lambda key, heads: jax.random.normal(key, (prompts, tp + group * tc, heads, HEAD_DIM))  # noqa: E731
    q, k, v = packed(keys[0], HEADS), packed(keys[1], KV_HEADS), packed(keys[2], KV_HEADS)
    weight = packed(keys[3], HEADS)
    prompt_valid = np.array([[True] * 4, [False, True, True, True]])
    completion_valid = np.arange(tc)[None] < np.array([5, 4, 3, 5, 4, 3])[:, None]

    def mask(valid, first_query):
        slot = np.arange(valid.shape[1])
        query = first_query + np.arange(valid.shape[1] - first_query)
        causal = (valid[:, None] & (slot[None] <= query[:, None])[None]) | (slot[None] == query[:, None])[None]
        return jnp.asarray(causal)

    row_valid = np.concatenate([np.repeat(prompt_valid, group, axis=0), completion_valid], axis=1)
    prompt_mask, completion_mask = mask(prompt_valid, 0), mask(row_valid, tp)

    def unpack(x):  # packed [P, Tp + G*Tc, ...] -> whole rows [P*G, Tp + Tc, ...]
        prompt = jnp.repeat(x[:, None, :tp], group, axis=1)
        completions = x[:, tp:].reshape(prompts, group, tc, *x.shape[2:])
        return jnp.concatenate([prompt, completions], axis=2).reshape(prompts * group, tp + tc, *x.shape[2:])

    def per_row(q, k, v):  # completions' outputs of the whole rows, packed back
        out = _reference(unpack(q), unpack(k), unpack(v), mask(row_valid, 0))[:, tp:]
        return out.reshape(prompts, group * tc, *out.shape[2:])

    shared = lambda q, k, v: shared_prompt_attention(q, k, v, prompt_mask, completion_mask, SCALE)  # noqa: E731
    got = shared(q, k, v)
    np.testing.assert_allclose(got[:, tp:], per_row(q, k, v), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[:, :tp], _reference(q[:, :tp], k[:, :tp], v[:, :tp], prompt_mask), rtol=1e-6,
                               atol=1e-6)

    # The completions' outputs only: prompt outputs feed no completion directly in this check.
    completion_weight = weight.at[:, :tp].set(0.0)
    for name, g, w in zip("qkv", _loss_grads(shared, completion_weight, q, k, v),
                          _loss_grads(per_row, weight[:, tp:], q, k, v)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6, err_msg=f"d{name}")
