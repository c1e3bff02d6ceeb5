"""Flax NNX decoder-only transformer for the Qwen2/Qwen2.5, Llama 3 and Qwen3 families.

    hidden = final_norm(blocks(embed[input_ids]))
    block(x) = x' + mlp(norm2(x')),  x' = x + attention(norm1(x))
    attention: grouped-query, RoPE on q/k (optionally after a per-head RMSNorm, Qwen3), optional
               q/k/v bias (Qwen2), softmax in float32 (`model.attention`).
    mlp:       down(silu(gate(x)) * up(x))   (SwiGLU)

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds logical axis names (see
`LOGICAL_AXES` below); the parallel package maps them to mesh axes with one rules table.

Masking uses explicit positions and cache slots, never column arithmetic on positions, so a
left-padded and a right-padded batch of the same sequences give the same per-token outputs:
query slot t may attend key slot s when s <= t and s holds a real token (s == t is always allowed,
so padding rows never see an empty softmax).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from maxent_jax.model.attention import (
    causal_attention,
    grouped_attention,
    key_layout,
    masked_attention,
    pack_groups,
    prefix_causal_attention,
    segment_visibility,
    shared_prompt_attention,
    unpack_groups,
    value_layout,
)
from maxent_jax.model.cache import KVCache
from maxent_jax.model.config import ModelConfig
from maxent_jax.model.rope import apply_rope, inverse_frequencies, rope_cos_sin
from maxent_jax.parallel.rules import constrain_activation

# Logical axis names of every parameter, by module path suffix (documented in docs/models.md).
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embedding": ("vocab", "embed"),
    "attn.q_proj.kernel": ("embed", "heads", "head_dim"),
    "attn.q_proj.bias": ("heads", "head_dim"),
    "attn.k_proj.kernel": ("embed", "kv_heads", "head_dim"),
    "attn.k_proj.bias": ("kv_heads", "head_dim"),
    "attn.v_proj.kernel": ("embed", "kv_heads", "head_dim"),
    "attn.v_proj.bias": ("kv_heads", "head_dim"),
    "attn.o_proj.kernel": ("heads", "head_dim", "embed"),
    "attn.q_norm.scale": ("head_dim",),
    "attn.k_norm.scale": ("head_dim",),
    "mlp.gate_proj.kernel": ("embed", "mlp"),
    "mlp.up_proj.kernel": ("embed", "mlp"),
    "mlp.down_proj.kernel": ("mlp", "embed"),
    "input_norm.scale": ("embed",),
    "post_attn_norm.scale": ("embed",),
    "final_norm.scale": ("embed",),
    "lm_head": ("embed", "vocab"),
}

_INIT_STD = 0.02

# The residual stream stays batch-sharded under FSDP (weights are gathered, activations are not).
RESIDUAL_AXES = ("batch", "seq", "act_embed")


class SharedPromptMasks(NamedTuple):
    """The masks of `Decoder.score_groups`' packed rows (static sizes come from their shapes)."""

    prompt: jax.Array  # [P, Tp, Tp]: each group's prompt, causal
    completion: jax.Array  # [P*G, Tc, Tp + Tc]: a completion over its prompt's keys, then its own


class SegmentMask(NamedTuple):
    """A packed buffer's mask `[buffers, L, L]` (`segment_visibility`) for the fused attentions
    (`Decoder.score_packed`); the 'blocked' path takes the plain array."""

    visible: jax.Array


def visibility_mask(key_valid: jax.Array, query_slot: jax.Array) -> jax.Array:
    """`[batch, queries, keys]`: the query in slot t sees key slots s <= t holding a real token, and itself.

    key_valid `[batch, keys]` bool, query_slot `[queries]` int (the queries' slots among the keys).
    """
    key_slot = jnp.arange(key_valid.shape[1])
    causal = key_slot[None, :] <= query_slot[:, None]
    return (key_valid[:, None, :] & causal[None]) | (key_slot[None, :] == query_slot[:, None])[None]


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
    """A parameter annotated with logical axis names; placement is left to the caller's mesh rules."""
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), statistics in float32."""

    def __init__(self, dim: int, eps: float, axis_name: str, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = _param(jnp.ones((dim,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def dense(x: jax.Array, kernel: jax.Array, in_dims: int, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x `[..., *in]` times kernel `[*in, *out]` -> `[..., *out]`, as one 2-D matmul `[rows, in] @ [in, out]`.

    Why not `einsum`: the weight gradient of a multi-axis einsum contracts the batch and sequence
    axes together, and XLA:CPU lowers that by materialising transposed copies of the activations
    (and, inside the sampler's decode loop, of the kernel at every step). Flattened rows make every
    forward and backward product a plain matmul. `out_dtype` sets the accumulation/result dtype.
    """
    in_shape, out_shape = kernel.shape[:in_dims], kernel.shape[in_dims:]
    if x.shape[x.ndim - in_dims:] != in_shape:
        raise ValueError(f"dense: input trailing shape {x.shape[x.ndim - in_dims:]} does not match kernel {kernel.shape}")
    size = math.prod(in_shape)
    y = jnp.dot(x.reshape(-1, size), kernel.reshape(size, -1), preferred_element_type=out_dtype)
    return y.reshape(*x.shape[:x.ndim - in_dims], *out_shape)


class Projection(nnx.Module):
    """A dense map stored with its natural multi-axis kernel `[*in, *out]` (e.g. [embed, heads, head_dim])."""

    def __init__(self, kernel_shape: tuple[int, ...], names: tuple[str, ...], in_dims: int, *,
                 bias_shape: tuple[int, ...] | None, bias_names: tuple[str, ...] | None,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.in_dims = in_dims  # leading kernel axes contracted with the input's trailing axes
        init = jax.random.normal(rngs.params(), kernel_shape, jnp.float32) * _INIT_STD
        self.kernel = _param(init.astype(param_dtype), names)
        self.bias = None if bias_shape is None else _param(jnp.zeros(bias_shape, param_dtype), bias_names)

    def weight(self) -> jax.Array:
        """The effective kernel `[*in, *out]` (a LoRA projection adds its adapter: `model.lora`)."""
        return self.kernel[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dense(x, self.kernel[...].astype(x.dtype), self.in_dims)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; reads and writes the KV cache when given one."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pdt = _dtype(cfg.param_dtype)
        bias = cfg.attention_bias
        self.q_proj = Projection((d, n, h), ("embed", "heads", "head_dim"), 1,
                                 bias_shape=(n, h) if bias else None, bias_names=("heads", "head_dim"),
                                 param_dtype=pdt, rngs=rngs)
        self.k_proj = Projection((d, k, h), ("embed", "kv_heads", "head_dim"), 1,
                                 bias_shape=(k, h) if bias else None, bias_names=("kv_heads", "head_dim"),
                                 param_dtype=pdt, rngs=rngs)
        self.v_proj = Projection((d, k, h), ("embed", "kv_heads", "head_dim"), 1,
                                 bias_shape=(k, h) if bias else None, bias_names=("kv_heads", "head_dim"),
                                 param_dtype=pdt, rngs=rngs)
        self.o_proj = Projection((n, h, d), ("heads", "head_dim", "embed"), 2,
                                 bias_shape=None, bias_names=None, param_dtype=pdt, rngs=rngs)
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, "head_dim", pdt) if cfg.qk_norm else None
        self.k_norm = RMSNorm(h, cfg.rms_norm_eps, "head_dim", pdt) if cfg.qk_norm else None
        self.scale = h ** -0.5
        self.implementation = cfg.attention

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv: tuple[jax.Array, jax.Array, jax.Array] | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x `[batch, seq, embed]`, mask `[batch, seq, keys]` -> `[batch, seq, embed]`.

        Without a cache and with a fused `model.attention`, `mask` is instead each row's valid-prefix
        length `[batch]` (see `Decoder._valid_first_forward`); for packed group rows it is the
        `SharedPromptMasks` of `Decoder.score_groups`.

        `kv` = (k, v, index): this layer's cache (layouts in `model.cache`) and the slot of the first new
        token; the updated (k, v) is returned.
        """
        # One GEMM over stacked k/v kernels only in cached (decode) steps; see MLP.__call__ for why not
        # in training.
        q, (k, v) = self.q_proj(x), (self._keys_values(x) if kv is not None else (self.k_proj(x), self.v_proj(x)))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(mask, SharedPromptMasks):  # packed group rows (`Decoder.score_groups`)
            return self.o_proj(shared_prompt_attention(q, k, v, mask.prompt, mask.completion, self.scale)), None
        if isinstance(mask, SegmentMask):  # packed buffers (`Decoder.score_packed`), fused attention
            return self.o_proj(masked_attention(q, k, v, mask.visible, self.scale, self.implementation)), None
        if kv is None and self.implementation != "blocked":  # training / scoring, valid prefixes
            return self.o_proj(prefix_causal_attention(q, k, v, mask, self.scale, self.implementation)), None
        if kv is None:  # training / scoring: the mask is causal over the seq new tokens
            return self.o_proj(causal_attention(q, k, v, mask, self.scale)), None
        k_cache, v_cache, index = kv
        k, v = key_layout(k), value_layout(v)
        if k_cache.ndim == 3:  # one kv head: the cache has no kv-head axis (see `model.cache`)
            k, v = k[:, 0], v[:, 0]
        lead = (0,) * (k_cache.ndim - 2)
        k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (*lead, 0, index))
        v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (*lead, index, 0))
        out = grouped_attention(q, k.astype(x.dtype), v.astype(x.dtype), mask, self.scale)
        return self.o_proj(out), (k, v)

    def _keys_values(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """k and v `[batch, seq, kv_heads, head_dim]` from one matmul over the two kernels stacked on a new
        last axis (one GEMM instead of two per decode step; kv_heads stays the major, sharded part)."""
        k_proj, v_proj = self.k_proj, self.v_proj
        kernel = jnp.stack([k_proj.weight(), v_proj.weight()], axis=-1).astype(x.dtype)
        both = dense(x, kernel, 1)  # [batch, seq, kv_heads, head_dim, 2]
        if k_proj.bias is not None:
            both = both + jnp.stack([k_proj.bias[...], v_proj.bias[...]], axis=-1).astype(x.dtype)
        return both[..., 0], both[..., 1]


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, elementwise, with a hand-written backward that saves only (gate, up).

    Why a custom VJP: autodiff of `silu(gate) * up` kept sigmoid(gate) and silu(gate) as residuals,
    five elementwise passes over `[rows, mlp]` (the model's largest activations) per layer in
    training. Here it is four: the product, one sigmoid table, and the two gradients
        d_gate = d_out * up * s * (1 + gate * (1 - s)),  d_up = d_out * gate * s,  s = sigmoid(gate),
    each computed from (gate, up, d_out) in one pass (measured on the small preset: see docs/models.md).
    """
    return jax.nn.silu(gate) * up


def _swiglu_forward(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return swiglu(gate, up), (gate, up)


def _swiglu_backward(residuals: tuple[jax.Array, jax.Array], d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate, up = residuals
    # sigmoid via tanh (equal up to rounding): spelled like the forward's sigmoid, XLA merged the two
    # and kept sigmoid(gate) and silu(gate) as extra [rows, mlp] buffers of the forward (two more passes).
    sig = 0.5 + 0.5 * jnp.tanh(0.5 * gate)
    d_up = d_out * (gate * sig)
    d_gate = d_out * up * sig * (1 + gate * (1 - sig))
    return d_gate, d_up


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, i, pdt = cfg.hidden_size, cfg.intermediate_size, _dtype(cfg.param_dtype)
        self.gate_proj = Projection((d, i), ("embed", "mlp"), 1, bias_shape=None, bias_names=None,
                                    param_dtype=pdt, rngs=rngs)
        self.up_proj = Projection((d, i), ("embed", "mlp"), 1, bias_shape=None, bias_names=None,
                                  param_dtype=pdt, rngs=rngs)
        self.down_proj = Projection((i, d), ("mlp", "embed"), 1, bias_shape=None, bias_names=None,
                                    param_dtype=pdt, rngs=rngs)

    def __call__(self, x: jax.Array, stacked: bool = False) -> jax.Array:
        """`stacked` (the sampler's cached steps): gate and up as one matmul over their stacked kernels.

        The stacked matmul is hoisted out of the decode loop by XLA, and at decode batch sizes on XLA:CPU
        one [embed, 2*mlp] GEMM costs about 60% of two [embed, mlp] ones. The pair axis goes last so that
        flattening [embed, mlp, 2] keeps `mlp` the major (sharded) part (a [embed, 2, mlp] stack made
        GSPMD all-gather the kernels on a tensor-parallel mesh). Without a cache (training, scoring) the
        two products stay separate: at thousands of rows they cost the same as one, while the stack's
        stride-2 halves made every SwiGLU op of forward and backward about 3x slower and its gradient
        had to be de-interleaved back into the two kernels.
        """
        if stacked:
            kernel = jnp.stack([self.gate_proj.weight(), self.up_proj.weight()], axis=-1).astype(x.dtype)
            both = dense(x, kernel, 1)  # [batch, seq, mlp, 2]
            gate, up = both[..., 0], both[..., 1]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu(gate, up))


class Block(nnx.Module):
    """One pre-norm transformer layer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = _dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pdt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv: tuple[jax.Array, jax.Array, jax.Array] | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        attn_out, new_kv = self.attn(self.input_norm(x), cos, sin, mask, kv)
        x = x + attn_out
        return x + self.mlp(self.post_attn_norm(x), stacked=kv is not None), new_kv


def _block_forward(block: Block, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    return block(x, cos, sin, mask, None)[0]


def _remat_block_forward(block: Block, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: Any,
                         policy: Callable[..., bool] | None) -> jax.Array:
    """`_block_forward` under `jax.checkpoint`, on the block's state as a plain pytree.

    Why not `nnx.remat`: it merges its inputs back into the caller's Variables, and a LoRA run's
    frozen base arrives from outside the gradient's trace (the train step passes it through, not
    differentiated), so that merge failed with flax's TraceContextError ('Cannot mutate Param from a
    different trace level') on every LoRA run with `model.remat`. A pure function of the state
    rebuilds the block inside the checkpoint instead; the saved values and the recomputation are
    the same.
    """
    graphdef, state = nnx.split(block)

    def pure(state: nnx.State, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: Any) -> jax.Array:
        return _block_forward(nnx.merge(graphdef, state), x, cos, sin, mask)

    return jax.checkpoint(pure, policy=policy)(state, x, cos, sin, mask)


@jax.custom_vjp
def tied_head(embedding: jax.Array) -> jax.Array:
    """The tied output projection `[embed, vocab]`: the embedding `[vocab, embed]` transposed.

    Why a custom VJP: with a plain transpose XLA folds it into the head's weight-gradient matmul,
    which then writes `[vocab, embed]` (tokens contracted on both operands, the vocabulary as
    rows): on XLA:CPU about half as fast as the `[embed, vocab]` product (1.6 vs 0.8 ms for the
    tiny preset's 1,536 tokens). The backward keeps that gradient `[embed, vocab]` behind an
    optimization barrier and transposes it on its own (a copy of the embedding's size).
    """
    return embedding.T


def _tied_head_forward(embedding: jax.Array) -> tuple[jax.Array, None]:
    return embedding.T, None


def _tied_head_backward(_: None, d_kernel: jax.Array) -> tuple[jax.Array]:
    return (jax.lax.optimization_barrier(d_kernel).T,)


tied_head.defvjp(_tied_head_forward, _tied_head_backward)


class Decoder(nnx.Module):
    """The language model: `model(input_ids, positions, attention_mask, cache) -> (hidden, cache)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = _dtype(cfg.param_dtype)
        embedding = jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32) * _INIT_STD
        self.embedding = _param(embedding.astype(pdt), ("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pdt)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            head = jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), jnp.float32) * _INIT_STD
            self.lm_head = _param(head.astype(pdt), ("embed", "vocab"))

    def __call__(self, input_ids: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Hidden states after the final norm.

        input_ids, positions `[batch, seq]` int32; attention_mask `[batch, seq]` (bool or 0/1), false on
        padding (ids outside the vocabulary are clipped, so any pad id works). With `cache`, the seq new tokens occupy cache slots `[cache.index, cache.index + seq)`
        (the caller keeps `cache.index + seq <= cache.max_len`) and attend to every valid earlier slot.
        Returns (hidden `[batch, seq, embed]` in compute dtype, updated cache or None).
        """
        cfg = self.cfg
        seq = input_ids.shape[1]
        new_valid = attention_mask.astype(jnp.bool_)
        if cache is None and cfg.attention != "blocked":
            return self._valid_first_forward(input_ids, positions, new_valid), None
        x, cos, sin = self._embed(input_ids, positions)
        if cache is None:
            key_valid, query_slot = new_valid, jnp.arange(seq)
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index))
            query_slot = cache.index + jnp.arange(seq)
        mask = visibility_mask(key_valid, query_slot)
        if cache is None:
            return self._layers(x, cos, sin, mask), None

        keys, values = [], []
        for block, k, v in zip(self.layers, cache.k, cache.v):
            x, (k, v) = block(x, cos, sin, mask, (k, v, cache.index))
            keys.append(k)
            values.append(v)
        new_cache = KVCache(k=tuple(keys), v=tuple(values), valid=key_valid, index=cache.index + seq)
        return self.final_norm(x), new_cache

    def score_groups(self, input_ids: jax.Array, positions: jax.Array, attention_mask: jax.Array, *,
                     group: int, prompt_len: int) -> jax.Array:
        """The cache-free forward of score rows whose groups share a prompt, each prompt computed once.

        Rows `[P*G, Tp + Tc]` in the score layout (`maxent_jax.scoring`: Tp = `prompt_len` prompt
        columns, then the completion), every run of `group` consecutive rows with the same prompt
        columns (the G completions of one prompt; the first row's are used). Returns the hidden states
        `[P*G, Tp + Tc, embed]` that `__call__` gives for these rows, up to float rounding.

        Why: a GRPO batch repeats each prompt G times, so scoring rows whole spends Tp / (Tp + Tc) of
        every projection and MLP product, forward and backward, on identical copies. Here each group
        is one packed row (its prompt, then its G completions: `[P, Tp + G*Tc]`) through the dense
        layers, and attention lets each completion read the group's prompt keys
        (`shared_prompt_attention`); gradients through the prompt sum over its completions as they
        would over the copies. Needs `model.attention` 'blocked'.
        """
        valid = pack_groups(attention_mask.astype(jnp.bool_), group, prompt_len)
        key_valid = unpack_groups(valid, group, prompt_len)  # each row's own, as whole rows
        masks = SharedPromptMasks(visibility_mask(valid[:, :prompt_len], jnp.arange(prompt_len)),
                                  visibility_mask(key_valid, prompt_len + jnp.arange(input_ids.shape[1] - prompt_len)))
        x, cos, sin = self._embed(pack_groups(input_ids, group, prompt_len), pack_groups(positions, group, prompt_len))
        return unpack_groups(self._layers(x, cos, sin, masks), group, prompt_len)

    def score_packed(self, input_ids: jax.Array, positions: jax.Array, segments: jax.Array,
                     parents: jax.Array) -> jax.Array:
        """The cache-free forward of packed token buffers `[buffers, L]` (`maxent_jax.packing`): hidden
        states `[buffers, L, embed]`, each slot's equal to scoring its own sequence (its prompt, then
        itself) alone, up to float rounding. Attention follows `segment_visibility`; positions are
        per segment, so RoPE sees what it sees in the padded layout."""
        mask = segment_visibility(segments, parents)
        x, cos, sin = self._embed(input_ids, positions)
        return self._layers(x, cos, sin, mask if self.cfg.attention == "blocked" else SegmentMask(mask))

    def _layers(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """Every block without a cache (per-layer remat as configured), then the final norm."""
        forward: Callable[..., jax.Array] = _block_forward
        if self.cfg.remat:
            save_dots = self.cfg.remat_policy == "save_dots"
            forward = functools.partial(_remat_block_forward,
                                        policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable if save_dots else None)
        for block in self.layers:
            x = constrain_activation(forward(block, x, cos, sin, mask), RESIDUAL_AXES)
        return self.final_norm(x)

    def _embed(self, input_ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Token embeddings in compute dtype and the RoPE tables of their positions."""
        cfg = self.cfg
        # Clip, not NaN-fill: a stray pad id outside the vocabulary must not poison real rows (0 * NaN).
        x = jnp.take(self.embedding[...], input_ids, axis=0, mode="clip").astype(_dtype(cfg.compute_dtype))
        cos, sin = rope_cos_sin(positions, inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        return constrain_activation(x, RESIDUAL_AXES), cos, sin

    def _valid_first_forward(self, input_ids: jax.Array, positions: jax.Array, valid: jax.Array) -> jax.Array:
        """The cache-free forward for the fused attentions, which take padding as lengths.

        Each row is rotated so its valid tokens lead (left-padded prompt + right-padded completion
        becomes valid tokens then padding), the layers run with lengths, and the hidden states are
        rotated back, so callers see the same positions as with 'blocked'. Positions travel with their
        tokens, so RoPE is unchanged. A row whose valid tokens are not one contiguous span cannot be
        expressed this way: its hidden states are NaN (loud, never silently wrong).
        """
        slots = jnp.arange(input_ids.shape[1])
        start = jnp.argmax(valid, axis=1)[:, None]  # first valid token (0 for a row with none)
        lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
        rotate = lambda a, shift: jnp.take_along_axis(a, (slots + shift) % slots.size, axis=1)  # noqa: E731
        contiguous = jnp.all(rotate(valid, start) == (slots < lengths[:, None]), axis=1)
        x, cos, sin = self._embed(rotate(input_ids, start), rotate(positions, start))
        hidden = self._layers(x, cos, sin, lengths)
        hidden = jnp.take_along_axis(hidden, ((slots - start) % slots.size)[..., None], axis=1)
        return jnp.where(contiguous[:, None, None], hidden, jnp.nan).astype(hidden.dtype)

    def lm_head_kernel(self) -> jax.Array:
        """The output projection `[embed, vocab]` (the transposed embedding when tied)."""
        if self.lm_head is None:
            return tied_head(self.embedding[...])
        return self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full logits `[batch, seq, vocab]` float32; for small vocabularies (use `token_logprobs` otherwise)."""
        return dense(hidden, self.lm_head_kernel().astype(hidden.dtype), 1, jnp.float32)

    def init_cache(self, batch: int, max_len: int, dtype: str | jnp.dtype | None = None) -> KVCache:
        """An empty cache for `batch` rows and `max_len` slots (dtype defaults to the compute dtype)."""
        cfg = self.cfg
        return KVCache.zeros(layers=cfg.num_layers, batch=batch, max_len=max_len, kv_heads=cfg.num_kv_heads,
                             head_dim=cfg.head_dim, dtype=_dtype(dtype or cfg.compute_dtype))
