"""The NNX decoder on its own: padding invariance, KV-cache decoding, chunked log-probs, remat, axes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxent_jax.model.config import ModelConfig
from maxent_jax.model.decoder import LOGICAL_AXES, Decoder, swiglu, tied_head
from maxent_jax.model.logprobs import chunked_logprobs, token_logprobs
from maxent_jax.model.rope import inverse_frequencies, rope_cos_sin

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, attention_bias=True, qk_norm=True, family="qwen3",
                  tie_word_embeddings=False, rope_theta=500.0)
LENGTHS = (5, 8, 3)
WIDTH = 8


def _random_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """A decoder whose norms and biases are random too, so a swapped or ignored one shows up."""
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _padded(seqs: list[np.ndarray], width: int, left: bool,
            pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, positions, mask) `[batch, width]` with explicit positions counting real tokens only."""
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols], mask[row, cols] = seq, True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, positions, mask


def _sequences(lengths: tuple[int, ...], vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n).astype(np.int32) for n in lengths]


@jax.jit
def _forward_logprobs(state: nnx.State, ids: jax.Array, positions: jax.Array, mask: jax.Array):
    """Per-token log-probs of the next token `[batch, seq - 1]` (pure function of the param state)."""
    model = nnx.merge(GRAPHDEF, state)
    hidden, _ = model(ids, positions, mask)
    logp, entropy = token_logprobs(model, hidden[:, :-1], ids[:, 1:], chunk_size=3, return_entropy=True)
    whole = token_logprobs(model, hidden[:, :-1], ids[:, 1:], chunk_size=0)  # 0 = one block
    full = jax.nn.log_softmax(model.logits(hidden[:, :-1]), axis=-1)
    return logp, entropy, full, whole


MODEL = _random_model(CFG)
GRAPHDEF, STATE = nnx.split(MODEL)


def test_every_parameter_carries_its_logical_axes():
    flat = nnx.to_flat_state(nnx.state(MODEL, nnx.Param))
    seen = set()
    for path, var in flat:
        key = ".".join(str(p) for p in path if not isinstance(p, int))
        suffix = key.split("layers.")[-1]
        names = var.get_metadata()["out_sharding"]
        assert names == LOGICAL_AXES[suffix], key
        assert len(names) == np.ndim(var[...]), key
        seen.add(suffix)
    assert seen == set(LOGICAL_AXES)  # this config (untied, bias, qk-norm) uses every kind


def test_left_and_right_padding_give_identical_logprobs_and_chunking_is_exact():
    seqs = _sequences(LENGTHS, CFG.vocab_size)
    out = {}
    for left, pad_id in ((True, -1), (False, CFG.vocab_size + 7)):  # pad ids outside the vocabulary are harmless
        ids, pos, mask = _padded(seqs, WIDTH, left, pad_id)
        logp, entropy, full, whole = map(np.asarray, _forward_logprobs(STATE, ids, pos, mask))
        targets = np.clip(ids[:, 1:], 0, CFG.vocab_size - 1)  # token_logprobs clips out-of-range targets
        gathered = np.take_along_axis(full, targets[..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(logp, gathered, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(whole, gathered, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(entropy, -(np.exp(full) * full).sum(-1), rtol=1e-5, atol=1e-6)
        out[left] = [(logp[r], entropy[r], mask[r]) for r in range(len(seqs))]
    for row, n in enumerate(LENGTHS):
        left_lp, left_h, _ = out[True][row]
        right_lp, right_h, _ = out[False][row]
        # next-token log-probs of real tokens 1..n-1: left rows end at the last column, right rows start at 0
        np.testing.assert_allclose(left_lp[WIDTH - n:], right_lp[:n - 1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(left_h[WIDTH - n:], right_h[:n - 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [2, 1])  # one kv head: the cache drops that axis (model.cache)
def test_cached_prefill_and_decode_steps_equal_the_full_forward(kv_heads):
    cfg = dataclasses.replace(CFG, num_kv_heads=kv_heads)
    graphdef, state = nnx.split(_random_model(cfg))
    prompts = _sequences((3, 5), CFG.vocab_size, seed=1)
    continuation = np.random.default_rng(2).integers(1, CFG.vocab_size, size=(2, 4)).astype(np.int32)
    prompt_len, steps = 5, continuation.shape[1]
    ids, pos, mask = _padded(prompts, prompt_len, left=True)

    @jax.jit
    def decode(state, ids, pos, mask, continuation):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(ids.shape[0], prompt_len + steps)
        hidden, cache = model(ids, pos, mask, cache)
        last_pos = pos[:, -1]

        def step(i, carry):
            cache, out = carry
            token = jax.lax.dynamic_slice_in_dim(continuation, i, 1, axis=1)
            h, cache = model(token, (last_pos + 1 + i)[:, None], jnp.ones_like(token, bool), cache)
            return cache, jax.lax.dynamic_update_slice_in_dim(out, h, i, axis=1)

        out = jnp.zeros((ids.shape[0], steps, CFG.hidden_size), hidden.dtype)
        cache, out = jax.lax.fori_loop(0, steps, step, (cache, out))
        return jnp.concatenate([hidden, out], axis=1), cache

    cached_hidden, cache = decode(state, ids, pos, mask, continuation)
    assert int(cache.index) == prompt_len + steps
    assert cache.k[0].shape == ((2, kv_heads) if kv_heads > 1 else (2,)) + (CFG.head_dim, prompt_len + steps)
    np.testing.assert_array_equal(np.asarray(cache.valid), np.concatenate([mask, np.ones((2, steps), bool)], 1))

    full_ids = np.concatenate([ids, continuation], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, steps), bool)], axis=1)
    full_pos = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0).astype(np.int32)
    full_hidden, _ = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, full_ids, full_pos, full_mask)
    np.testing.assert_allclose(np.asarray(cached_hidden)[full_mask], np.asarray(full_hidden)[full_mask],
                               rtol=1e-5, atol=1e-5)


def test_chunked_logprob_gradients_and_remat_match_the_plain_forward():
    ids, pos, mask = _padded(_sequences(LENGTHS, CFG.vocab_size, seed=3), WIDTH, left=False)
    weights = jnp.asarray(mask[:, 1:], jnp.float32)

    def loss(state, graphdef, chunked):
        model = nnx.merge(graphdef, state)
        hidden, _ = model(ids, pos, mask)
        if chunked:
            logp = token_logprobs(model, hidden[:, :-1], ids[:, 1:], chunk_size=3)
        else:
            full = jax.nn.log_softmax(model.logits(hidden[:, :-1]), axis=-1)
            logp = jnp.take_along_axis(full, ids[:, 1:, None], axis=-1)[..., 0]
        return -(logp * weights).sum()

    # Chunked log-probs under per-layer remat against full logits without remat: one compile each.
    remat_graphdef = nnx.split(Decoder(CFG.replace(remat=True), rngs=nnx.Rngs(0)))[0]
    jaxpr = lambda g: str(jax.make_jaxpr(lambda s: nnx.merge(g, s)(ids, pos, mask)[0])(STATE))  # noqa: E731
    assert jaxpr(remat_graphdef).count("remat") == CFG.num_layers and "remat" not in jaxpr(GRAPHDEF)
    ref_loss, ref_grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))(STATE, GRAPHDEF, False)
    value, grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))(STATE, remat_graphdef, True)
    np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        # absolute slack scaled to the tensor: float32 sums in another order differ by ~1e-7 of its largest entry
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("chunk_size", [0, 3, 7])
def test_logprob_blocks_with_and_without_recompute_match_autodiff_of_log_softmax(chunk_size):
    """One block (0, or 7 >= seq: kept for the backward) and three blocks (recomputed) against autodiff of
    the full log-softmax: values and the gradients reaching the hidden states and the head kernel,
    with logits spread wide enough that some probabilities underflow."""
    keys = jax.random.split(jax.random.key(5), 3)
    hidden = jax.random.normal(keys[0], (2, 7, 6)) * 3.0
    kernel = jax.random.normal(keys[1], (6, 11)) * 3.0
    targets = jax.random.randint(keys[2], (2, 7), 0, 11)
    weights = jnp.linspace(-1.0, 2.0, 14).reshape(2, 7)

    def reference(h, k):
        logp = jnp.take_along_axis(jax.nn.log_softmax(h @ k, axis=-1), targets[..., None], axis=-1)[..., 0]
        return jnp.sum(weights * logp)

    def blocked(h, k):
        return jnp.sum(weights * chunked_logprobs(k, h, targets, chunk_size=chunk_size))

    want, want_grads = jax.value_and_grad(reference, argnums=(0, 1))(hidden, kernel)
    got, got_grads = jax.jit(jax.value_and_grad(blocked, argnums=(0, 1)))(hidden, kernel)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_bfloat16_params_and_compute_stay_close_to_float32():
    cfg16 = CFG.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    graphdef16, state16 = nnx.split(Decoder(cfg16, rngs=nnx.Rngs(0)))
    state16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), STATE)  # same weights, rounded
    ids, pos, mask = _padded(_sequences(LENGTHS, CFG.vocab_size, seed=4), WIDTH, left=True)

    @jax.jit
    def logp16(state):
        model = nnx.merge(graphdef16, state)
        hidden, _ = model(ids, pos, mask)
        assert hidden.dtype == jnp.bfloat16
        return token_logprobs(model, hidden[:, :-1], ids[:, 1:], chunk_size=4)

    lp16 = np.asarray(logp16(state16))
    assert lp16.dtype == np.float32
    lp32 = np.asarray(_forward_logprobs(STATE, ids, pos, mask)[0])
    valid = mask[:, 1:]
    np.testing.assert_allclose(lp16[valid], lp32[valid], atol=0.15)


@pytest.mark.parametrize("chunk_size", [-2, 1.5, True])
def test_bad_chunk_size_is_a_user_error(chunk_size):
    from maxent_jax.errors import UserError

    hidden = jnp.zeros((1, 2, CFG.hidden_size))
    with pytest.raises(UserError, match="chunk_size"):
        token_logprobs(MODEL, hidden, jnp.zeros((1, 2), jnp.int32), chunk_size=chunk_size)


def test_swiglu_gradient_matches_autodiff_of_its_definition():
    """The hand-written backward of silu(gate) * up equals autodiff of that expression (float32 rounding),
    including large |gate| where the sigmoid saturates."""
    keys = jax.random.split(jax.random.key(3), 3)
    gate = jax.random.normal(keys[0], (5, 7)) * 6.0
    up, weight = jax.random.normal(keys[1], (5, 7)), jax.random.normal(keys[2], (5, 7))

    def reference(g, u):
        return jnp.sum(weight * jax.nn.silu(g) * u)

    def custom(g, u):
        return jnp.sum(weight * swiglu(g, u))

    # One rounding apart at most: a GPU fuses the custom_vjp's forward but runs silu and * as two eager ops.
    np.testing.assert_allclose(swiglu(gate, up), jax.nn.silu(gate) * up, rtol=1e-6, atol=1e-7)
    for got, want in zip(jax.grad(custom, argnums=(0, 1))(gate, up), jax.grad(reference, argnums=(0, 1))(gate, up)):
        # Absolute slack scaled to the tensor: near silu's minimum (gate ~ -1.28) its derivative is a
        # difference of O(1) terms, and an H100's sigmoid rounds differently there (3e-6 on entries ~7).
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("seq", [1, 5])
def test_rope_tables_are_cos_and_sin_of_the_duplicated_angles(seq):
    """Both forms of `rope_cos_sin` (the materialising loop for seq > 1, the plain one for decode steps)
    give cos/sin of position * inv_freq on each head_dim half, inside and outside jit."""
    inv_freq = inverse_frequencies(8, 10000.0, None)
    positions = jnp.asarray([[0, 1, 2, 300, 4095], [7, 9, 100, 2000, 5]], jnp.int32)[:, :seq]
    angles = np.asarray(positions, np.float32)[..., None] * np.concatenate([inv_freq, inv_freq])  # float32, as the model
    angles = angles.astype(np.float64)
    for cos, sin in (rope_cos_sin(positions, inv_freq), jax.jit(lambda p: rope_cos_sin(p, inv_freq))(positions)):
        assert cos.shape == sin.shape == (2, seq, 8)
        np.testing.assert_allclose(cos, np.cos(angles), atol=2e-6)
        np.testing.assert_allclose(sin, np.sin(angles), atol=2e-6)


def _spans(spans: list[tuple[int, int]], width: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, positions, mask) with row b valid on [lo, hi): a left-padded prompt plus a right-padded completion."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, (len(spans), width)).astype(np.int32)
    mask = np.zeros((len(spans), width), bool)
    for row, (lo, hi) in enumerate(spans):
        mask[row, lo:hi] = True
    return ids, np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32), mask


def _span_loss(state: nnx.State, graphdef: nnx.GraphDef, ids: jax.Array, pos: jax.Array, mask: jax.Array) -> jax.Array:
    """Negative log-likelihood of every valid token whose predecessor is valid (what the attention tests compare)."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model(ids, pos, mask)
    weights = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
    return -(token_logprobs(model, hidden[:, :-1], ids[:, 1:], chunk_size=4) * weights).sum()


_span_value_and_grad = jax.jit(jax.value_and_grad(_span_loss), static_argnums=1)


def test_fused_attention_and_save_dots_remat_match_the_blocked_forward_and_gradients():
    """model.attention='dot_product' (the rows rotated so valid tokens lead, lengths instead of a mask)
    with remat_policy='save_dots' gives the blocked, remat-free model's log-probs and gradients."""
    ids, pos, mask = _spans([(2, 7), (0, WIDTH), (3, 6)], WIDTH, seed=5)
    fused = nnx.split(Decoder(CFG.replace(attention="dot_product", remat=True, remat_policy="save_dots"),
                              rngs=nnx.Rngs(0)))[0]
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(fused, s)(ids, pos, mask)[0])(STATE))
    assert "DotsSaveable(only_if_no_batch_dims=True)" in jaxpr
    ref_loss, ref_grad = _span_value_and_grad(STATE, GRAPHDEF, ids, pos, mask)
    value, grad = _span_value_and_grad(STATE, fused, ids, pos, mask)
    np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))


def test_fused_attention_makes_a_row_with_a_gap_nan_and_leaves_the_others_alone():
    """Lengths cannot express valid tokens in two spans: that row comes out NaN, never silently wrong."""
    ids, pos, mask = _spans([(2, 7), (0, WIDTH)], WIDTH, seed=6)
    mask[0, 4] = False
    graphdef = nnx.split(Decoder(CFG.replace(attention="dot_product"), rngs=nnx.Rngs(0)))[0]
    hidden, _ = nnx.merge(graphdef, STATE)(ids, pos, mask)
    want, _ = MODEL(ids, pos, mask)
    assert np.isnan(np.asarray(hidden[0])).all()
    np.testing.assert_allclose(np.asarray(hidden[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, value", [("attention", "flash"), ("remat_policy", "offload")])
def test_unknown_attention_or_remat_policy_is_a_user_error(field, value):
    from maxent_jax.errors import UserError

    with pytest.raises(UserError, match=f"model.{field}='{value}' is invalid"):
        CFG.replace(**{field: value})


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_attention_matches_the_blocked_attention_in_bfloat16():
    """On a GPU, model.attention='cudnn' gives the blocked attention's log-probs and gradients (bf16)."""
    ids, pos, mask = _spans([(2, 7), (0, WIDTH), (3, 6)], WIDTH, seed=7)
    cfg16 = CFG.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    state16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), STATE)
    graphdefs = [nnx.split(Decoder(cfg16.replace(attention=a), rngs=nnx.Rngs(0)))[0] for a in ("blocked", "cudnn")]
    (want, want_grad), (got, got_grad) = (_span_value_and_grad(state16, g, ids, pos, mask) for g in graphdefs)
    np.testing.assert_allclose(float(got), float(want), rtol=2e-2)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b) + 1e-6


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="off a GPU only")
def test_cudnn_attention_off_a_gpu_is_a_one_line_user_error():
    from maxent_jax.errors import UserError
    from maxent_jax.model.attention import check_attention_backend

    for implementation in ("blocked", "dot_product"):
        check_attention_backend(implementation)
    with pytest.raises(UserError, match="model.attention='cudnn' needs a GPU, and jax runs on cpu"):
        check_attention_backend("cudnn")


def _group_score_loss(state: nnx.State, graphdef: nnx.GraphDef, batch: dict, group: int):
    """Masked completion NLL and per-token log-probs of score rows, each group's prompt scored once if group > 1."""
    from maxent_jax.parallel.forward import completion_logprobs_and_hidden

    logp, hidden = completion_logprobs_and_hidden(nnx.merge(graphdef, state), batch, chunk_size=3, group=group)
    return -(logp * batch["completion_mask"]).sum(), (logp, hidden)


_group_value_and_grad = jax.jit(jax.value_and_grad(_group_score_loss, has_aux=True), static_argnums=(1, 3))


def test_scoring_each_prompt_once_gives_the_whole_rows_log_probs_hidden_states_and_gradients():
    """`Decoder.score_groups` (model.score_prompt_once), under per-layer remat: 2 prompts of 3 and 6
    tokens (left-padded to 7) x 3 completions of 1..6 tokens (right-padded to 6) give the log-probs, the
    hidden states of every real token and the parameter gradients of scoring the 6 rows whole."""
    from maxent_jax.scoring import build_score_batch

    prompts, completions = _sequences((3, 6), CFG.vocab_size, seed=8), _sequences((6, 1, 4, 5, 6, 2), CFG.vocab_size, 9)
    batch = build_score_batch([p for p in prompts for _ in range(3)], completions, prompt_len=7, completion_len=6,
                              pad_id=0)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    graphdef = nnx.split(Decoder(CFG.replace(remat=True), rngs=nnx.Rngs(0)))[0]
    (loss, (logp, hidden)), grad = _group_value_and_grad(STATE, graphdef, batch, 3)
    (want_loss, (want_logp, want_hidden)), want_grad = _group_value_and_grad(STATE, graphdef, batch, 1)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    real = np.asarray(batch["completion_mask"])
    np.testing.assert_allclose(np.asarray(logp)[real], np.asarray(want_logp)[real], rtol=1e-5, atol=1e-5)
    tokens = np.asarray(batch["attention_mask"])
    np.testing.assert_allclose(np.asarray(hidden)[tokens], np.asarray(want_hidden)[tokens], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))


def test_tied_head_is_the_transposed_embedding_with_its_gradient():
    embedding = jax.random.normal(jax.random.key(0), (97, 16))
    hidden = jax.random.normal(jax.random.key(1), (3, 7, 16))

    def loss(head_of):
        return lambda e: jnp.sum(jnp.sin(jnp.einsum("bte,ev->btv", hidden, head_of(e))))

    np.testing.assert_array_equal(np.asarray(tied_head(embedding)), np.asarray(embedding.T))
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss(tied_head)))(embedding)),
                               np.asarray(jax.jit(jax.grad(loss(lambda e: e.T)))(embedding)), rtol=1e-5, atol=1e-6)
