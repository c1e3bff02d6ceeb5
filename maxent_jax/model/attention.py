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

`grouped_attention` serves the cached (sampler) steps; `causal_attention` is the same map for
training and scoring (no cache, causal mask), computed in causal query blocks with a hand-written
backward; `shared_prompt_attention` applies it to a group's prompt once and to each completion.
`prefix_causal_attention` is the fused alternative for training and scoring (`model.attention`
'dot_product' or 'cudnn'): `jax.nn.dot_product_attention` over rows whose valid tokens lead, which
on a GPU is cuDNN's flash attention: no score-sized tensor in memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from maxent_jax.errors import UserError

# Query rows per block of `causal_attention` (about; see there for why and what it measured), and
# the most blocks: the blocks are unrolled per layer, so their count bounds the program's size.
CAUSAL_BLOCK = 32
MAX_CAUSAL_BLOCKS = 4

Blocks = tuple[tuple[int, int], ...]
Saved = tuple[jax.Array, jax.Array, tuple[tuple[jax.Array, jax.Array], ...]]


def key_layout(k: jax.Array) -> jax.Array:
    """A projection's keys `[batch, seq, kv_heads, head_dim]` -> `[batch, kv_heads, head_dim, seq]`."""
    return k.transpose(0, 2, 3, 1)


def value_layout(v: jax.Array) -> jax.Array:
    """A projection's values `[batch, seq, kv_heads, head_dim]` -> `[batch, kv_heads, seq, head_dim]`."""
    return v.transpose(0, 2, 1, 3)


def _query_rows(q: jax.Array, kv_heads: int) -> jax.Array:
    """q `[batch, seq, heads, head_dim]` -> `[batch, kv_heads, group*seq, head_dim]` (row g*seq + t).

    With the queries of one kv head stacked as rows, both matmuls become plain batched GEMMs over
    (batch, kv_heads) that read the cache in place (other operand orders make XLA:CPU transpose the
    cache or fall back to a slow strided dot).
    """
    batch, seq, heads, head_dim = q.shape
    rows = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    return rows.reshape(batch, kv_heads, heads // kv_heads * seq, head_dim)


def _from_rows(rows: jax.Array, seq: int) -> jax.Array:
    """The inverse of `_query_rows`: `[batch, kv_heads, group*seq, head_dim]` -> `[batch, seq, heads, head_dim]`."""
    batch, kv_heads, group_rows, head_dim = rows.shape
    out = rows.reshape(batch, kv_heads, group_rows // seq, seq, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, seq, group_rows // seq * kv_heads, head_dim)


def _probs(rows: jax.Array, keys: jax.Array, mask: jax.Array, scale: float, dtype: jnp.dtype) -> jax.Array:
    """Softmax probabilities `[batch, kv_heads, group*seq, keys]` in `dtype`, scores in float32 (at least).

    Without the kv-head axis on rows and keys (one kv head, see `grouped_attention`): `[batch, group*seq, keys]`.
    """
    batch, seq, n_keys = mask.shape
    group = rows.shape[-2] // seq
    score_dtype = jnp.promote_types(rows.dtype, jnp.float32)
    scores = jnp.einsum("...qh,...hs->...qs", rows, keys, preferred_element_type=score_dtype)
    visible = jnp.broadcast_to(mask[:, None], (batch, group, seq, n_keys))
    visible = visible.reshape(batch, *(1,) * (rows.ndim - 3), group * seq, n_keys)
    scores = jnp.where(visible, scores * jnp.asarray(scale, score_dtype), -jnp.inf)
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)


def grouped_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q `[batch, seq, heads, head_dim]`, keys/values as above, mask `[batch, seq, keys]` bool.

    Keys `[batch, head_dim, keys]` and values `[batch, keys, head_dim]` (no kv-head axis) are the
    layout of a one-kv-head model's KV cache (`model.cache`), read in place the same way.
    Returns `[batch, seq, heads, head_dim]` in q's dtype. Every query row needs at least one true mask
    entry (the decoder always lets a slot see itself).
    """
    one_kv_head = keys.ndim == 3
    rows = _query_rows(q, 1 if one_kv_head else keys.shape[1])
    rows = rows[:, 0] if one_kv_head else rows
    out = jnp.einsum("...qs,...sh->...qh", _probs(rows, keys, mask, scale, values.dtype), values)
    return _from_rows(out[:, None] if one_kv_head else out, q.shape[1]).astype(q.dtype)


def causal_blocks(seq: int, block: int = CAUSAL_BLOCK, max_blocks: int = MAX_CAUSAL_BLOCKS) -> Blocks:
    """Query ranges [lo, hi) covering [0, seq): round(seq / block) of them, at least one and at most
    `max_blocks`, sizes within one.

    Why a cap: every block is its own matmuls (and, in the backward, its own padded key/value
    gradient) in each layer's program, so long sequences (a 1,024-token RL batch would make 32) would
    grow compile time and memory traffic with the length; four blocks already skip 3/8 of the work
    (the limit, with infinitely many, is 1/2).
    """
    count = min(max(1, round(seq / block)), max_blocks)
    edges = [seq * i // count for i in range(count + 1)]
    return tuple(zip(edges[:-1], edges[1:]))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Self-attention without a cache (training, scoring): `grouped_attention` in causal query blocks.

    q `[batch, seq, heads, head_dim]`, k and v `[batch, keys, kv_heads, head_dim]` (the projections' own
    order) with keys >= seq: the queries are the last `seq` of the `keys` slots (keys == seq for plain
    self-attention; more when a completion's queries also read its prompt's keys, see
    `Decoder.score_groups`). mask `[batch, seq, keys]` bool and causal: the query in slot t never sees
    a key s > t (the decoder's mask). Returns `[batch, seq, heads, head_dim]` in q's dtype, equal to
    `grouped_attention(q, key_layout(k), value_layout(v), mask, scale)` up to float32 rounding.

    Why: the score-sized matmuls (two forward, four backward) were the attention core's cost in the
    training step on XLA:CPU, and half of each multiplies masked entries. The queries are cut into
    blocks of about `CAUSAL_BLOCK` rows (`causal_blocks`) and block [lo, hi) only scores keys [0, hi):
    the skipped part is fully masked, so nothing changes but the work (three blocks at 104 tokens do 2/3
    of it). The backward is written by hand (`_causal_backward`): each block's key and value gradients
    come out `[batch, kv_heads, keys, head_dim]` and accumulate into one buffer per layer, relaid to k's
    order once (one layer's core at the bench's small shape, XLA:CPU: gradient 7.1 ms unblocked, 6.0 ms
    with autodiff of the blocked forward, 4.1 ms with this backward; see docs/models.md).
    """
    return _causal_attention(q, k, v, mask, scale, causal_blocks(q.shape[1]))


def _causal_forward(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                    blocks: Blocks) -> tuple[jax.Array, Saved]:
    """The blocked forward and what the backward reads: head-major keys and values, each block's
    query rows and probabilities."""
    keys, values = key_layout(k), value_layout(v)
    offset = k.shape[1] - q.shape[1]  # slot of the first query
    outs, saved = [], []
    for lo, hi in blocks:
        end = offset + hi
        rows = _query_rows(q[:, lo:hi], k.shape[2])
        probs = _probs(rows, keys[..., :end], mask[:, lo:hi, :end], scale, values.dtype)
        outs.append(_from_rows(jnp.einsum("bkqs,bksh->bkqh", probs, values[:, :, :end]), hi - lo))
        saved.append((rows, probs))
    return jnp.concatenate(outs, axis=1).astype(q.dtype), (keys, values, tuple(saved))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                      blocks: Blocks) -> jax.Array:
    return _causal_forward(q, k, v, mask, scale, blocks)[0]


def _causal_backward(scale: float, blocks: Blocks, saved: Saved,
                     d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    """Per block, with p the probabilities and do the output gradient as query rows:
        dp = do @ values^T,  ds = scale * p * (dp - sum_s(dp * p)),
        dq = ds @ keys^T,  dk^T += ds^T @ rows,  dv += p^T @ do   (keys [0, offset + hi) of the block).
    Accumulation in float32 (at least); the mask gets no gradient."""
    keys, values, per_block = saved
    batch, kv_heads, n_keys, head_dim = values.shape
    offset = n_keys - d_out.shape[1]
    acc = jnp.promote_types(values.dtype, jnp.float32)
    d_queries = []
    d_keys = jnp.zeros((batch, kv_heads, n_keys, head_dim), acc)  # keys' gradient, stored like values
    d_values = jnp.zeros((batch, kv_heads, n_keys, head_dim), acc)
    for (lo, hi), (rows, probs) in zip(blocks, per_block):
        end = offset + hi
        d_rows = _query_rows(d_out[:, lo:hi].astype(values.dtype), kv_heads)
        d_probs = jnp.einsum("bkqh,bksh->bkqs", d_rows, values[:, :, :end], preferred_element_type=acc)
        p = probs.astype(acc)
        d_scores = (p * (d_probs - jnp.sum(d_probs * p, axis=-1, keepdims=True)) * scale).astype(rows.dtype)
        d_queries.append(_from_rows(jnp.einsum("bkqs,bkhs->bkqh", d_scores, keys[..., :end]), hi - lo))
        pad = ((0, 0), (0, 0), (0, n_keys - end), (0, 0))
        d_keys += jnp.pad(jnp.einsum("bkqs,bkqh->bksh", d_scores, rows, preferred_element_type=acc), pad)
        d_values += jnp.pad(jnp.einsum("bkqs,bkqh->bksh", probs, d_rows, preferred_element_type=acc), pad)
    d_q = jnp.concatenate(d_queries, axis=1).astype(d_out.dtype)
    d_k = d_keys.transpose(0, 2, 1, 3).astype(keys.dtype)  # [batch, seq, kv_heads, head_dim], k's order
    return d_q, d_k, d_values.transpose(0, 2, 1, 3).astype(values.dtype), None


_causal_attention.defvjp(_causal_forward, _causal_backward)


def pack_groups(rows: jax.Array, group: int, prompt_len: int) -> jax.Array:
    """Score rows `[P*G, Tp + Tc, ...]` whose groups of G share their first Tp columns -> packed group rows
    `[P, Tp + G*Tc, ...]`: the group's prompt (from its first row), then its G completions."""
    prompts = rows.shape[0] // group
    grouped = rows.reshape(prompts, group, *rows.shape[1:])
    completions = grouped[:, :, prompt_len:].reshape(prompts, -1, *rows.shape[2:])
    return jnp.concatenate([grouped[:, 0, :prompt_len], completions], axis=1)


def unpack_groups(packed: jax.Array, group: int, prompt_len: int) -> jax.Array:
    """The inverse of `pack_groups`: each completion after a copy of its group's prompt, `[P*G, Tp + Tc, ...]`
    (a broadcast, so under autodiff the prompt's gradient is the sum over its G completions).

    Joined along the rows' sequence axis: the same join over `[P, G, ...]`'s axis 2 made the `small`
    bench's loss gradient about 10% slower on XLA:CPU (184-198 vs 166-180 ms, three pairs)."""
    prompts, rest = packed.shape[0], packed.shape[2:]
    prompt = jnp.broadcast_to(packed[:, None, :prompt_len], (prompts, group, prompt_len, *rest))
    completions = packed[:, prompt_len:].reshape(prompts * group, -1, *rest)
    return jnp.concatenate([prompt.reshape(prompts * group, prompt_len, *rest), completions], axis=1)


def shared_prompt_attention(q: jax.Array, k: jax.Array, v: jax.Array, prompt_mask: jax.Array,
                            completion_mask: jax.Array, scale: float) -> jax.Array:
    """`causal_attention` over packed group rows: one prompt's `Tp` slots, then its `G` completions of `Tc`.

    q `[P, Tp + G*Tc, heads, head_dim]`, k and v `[P, Tp + G*Tc, kv_heads, head_dim]`; prompt_mask
    `[P, Tp, Tp]` (the prompt's causal mask), completion_mask `[P*G, Tc, Tp + Tc]` (a completion's queries
    over its prompt's keys then its own). The prompt attends to itself once per group; each completion
    reads the group's prompt keys and values (broadcast, so their gradients sum over the G completions)
    followed by its own. Returns `[P, Tp + G*Tc, heads, head_dim]`, each completion's outputs equal to
    scoring the row `prompt + completion` alone.
    """
    prompts, prompt_len = prompt_mask.shape[:2]
    rows, completion_len = completion_mask.shape[:2]
    group = rows // prompts
    prompt_out = causal_attention(q[:, :prompt_len], k[:, :prompt_len], v[:, :prompt_len], prompt_mask, scale)
    completion_q = q[:, prompt_len:].reshape(rows, completion_len, *q.shape[2:])
    completion_out = causal_attention(completion_q, unpack_groups(k, group, prompt_len),
                                      unpack_groups(v, group, prompt_len), completion_mask, scale)
    return jnp.concatenate([prompt_out, completion_out.reshape(prompts, group * completion_len, *q.shape[2:])],
                           axis=1)


def prefix_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, scale: float,
                            implementation: str) -> jax.Array:
    """Causal self-attention over rows whose valid tokens are the prefix `[0, lengths[b])`.

    q `[batch, seq, heads, head_dim]`, k and v `[batch, seq, kv_heads, head_dim]`, lengths `[batch]`
    int32. Valid queries see exactly what `causal_attention` lets them see. Padding queries (past a
    length) see the valid keys before them, so their outputs stay finite (a NaN there would reach the
    weight gradients through 0 * NaN) and nothing valid reads them; a row with no valid token reads its
    first slot. The decoder moves each row's valid span to the front first (`Decoder._valid_first_forward`),
    because the fused kernels take padding as lengths, not as an arbitrary mask. `implementation`:
    'dot_product' (XLA, any device) or 'cudnn' (cuDNN flash attention: a GPU, bfloat16/float16,
    head_dim <= 128 and a multiple of 8).
    """
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, key_value_seq_lengths=jnp.maximum(lengths, 1),
        implementation="cudnn" if implementation == "cudnn" else "xla",
    )


def segment_visibility(segments: jax.Array, parents: jax.Array) -> jax.Array:
    """`[buffers, L, L]` bool: which key slot each query slot of a packed buffer sees (`maxent_jax.packing`).

    segments `[buffers, L]` int: the sequence a slot holds (>= 1; 0 = padding); parents `[buffers, L]`:
    the one other segment its queries also read (a completion's: its group's prompt; a prompt's:
    itself). Query t sees key s <= t when s holds its own segment or its parent, and always itself
    (so a padding slot's softmax is never empty). The packer lays a prompt before its completions
    and each segment in order, so this is causal in slot order, what `causal_attention` needs.
    """
    slot = jnp.arange(segments.shape[1])
    key_seg = segments[:, None, :]
    same = (key_seg == segments[:, :, None]) | (key_seg == parents[:, :, None])
    causal = slot[None, :] <= slot[:, None]
    return (same & (key_seg > 0) & causal[None]) | (slot[None, :] == slot[:, None])[None]


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                     implementation: str) -> jax.Array:
    """Self-attention under an arbitrary `[batch, seq, seq]` mask through `jax.nn.dot_product_attention`.

    The packed layout's path for `model.attention` 'dot_product' (XLA) and 'cudnn'. What jax 0.10.2's
    cuDNN implementation takes: padding as per-row lengths, a causal or sliding-window mask, and an
    arbitrary `mask`/`bias` (converted to an additive `[batch, 1, seq, seq]` bias, so it is read
    densely). Its segment-packed (`q_offsets`) layout is not reachable from
    `jax.nn.dot_product_attention` and could not express a completion reading its group's prompt
    anyway, so packed buffers pass the segment mask as `mask`. The mask is causal in slot order, so
    `is_causal` changes no value; it makes cuDNN's mask type CAUSAL, whose kernel skips the blocks
    above the diagonal (the bias is read for the blocks below it).
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, is_causal=True,
                                        implementation="cudnn" if implementation == "cudnn" else "xla")


def check_attention_backend(implementation: str) -> None:
    """A one-line UserError when `model.attention` needs a device jax does not have ('cudnn': a GPU)."""
    platform = jax.devices()[0].platform
    if implementation == "cudnn" and platform != "gpu":
        raise UserError(f"model.attention='cudnn' needs a GPU, and jax runs on {platform}; "
                        "use 'blocked' or 'dot_product' there")
