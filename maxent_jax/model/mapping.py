"""Names and layouts of every parameter: our NNX state path <-> Hugging Face tensor name.

Qwen2, Llama and Qwen3 checkpoints share one naming scheme (`model.layers.{i}.self_attn.q_proj.weight`,
...); they differ only in which tensors exist: Qwen2 has q/k/v biases, Qwen3 has `q_norm`/`k_norm`,
untied models have `lm_head.weight`. The same table serves checkpoint loading/export and the
weight push to a vLLM server, which expects HF names and layouts.

Layout conversions (HF `nn.Linear` stores `[out, in]`):

| ours                                   | HF                        | to HF                        |
|----------------------------------------|---------------------------|------------------------------|
| q/k/v kernel `[embed, heads, head_dim]`| `[heads*head_dim, embed]` | reshape(embed, -1).T         |
| q/k/v bias `[heads, head_dim]`         | `[heads*head_dim]`        | reshape(-1)                  |
| o kernel `[heads, head_dim, embed]`    | `[embed, heads*head_dim]` | reshape(-1, embed).T         |
| gate/up `[embed, mlp]`, down `[mlp, embed]`, lm_head `[embed, vocab]` | transposed | .T  |
| embedding `[vocab, embed]`, norm scales| same                      | identity                     |

The conversions only reshape and transpose, so they are exact (bit-for-bit) in both directions.
On numpy arrays they are numpy views and copies (the host path of checkpoint loading); on jax
arrays each is one compiled program per shape (the device path of export and the weight push).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from maxent_jax.model.config import ModelConfig

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter: where it lives in our state, its HF name, and the two layout conversions."""

    path: Path
    hf_name: str
    to_hf: Callable
    from_hf: Callable


def _identity(x):
    return x


# The relayouts, written once for numpy and jax arrays alike (shapes in the table above).
def _transpose(x):
    return x.T


def _qkv_to_hf(x):
    return x.reshape(x.shape[0], -1).T


def _qkv_from_hf(x, heads: int, head_dim: int):
    return x.T.reshape(x.shape[1], heads, head_dim)


def _bias_to_hf(x):
    return x.reshape(-1)


def _bias_from_hf(x, heads: int, head_dim: int):
    return x.reshape(heads, head_dim)


def _out_to_hf(x):
    return x.reshape(-1, x.shape[-1]).T


def _out_from_hf(x, heads: int, head_dim: int):
    return x.T.reshape(heads, head_dim, x.shape[0])


# One compiled program per function and shape, shared by every layer and every push. Eagerly,
# jax runs a reshape and a transpose as two programs, each a full copy on XLA:CPU; compiled,
# they are one transpose (408 MB model, 2-core CPU: from_hf on device 1.9 -> 3.0 GB/s, to_hf
# plus the transfer to the host 0.8-1.0 -> 1.1 GB/s).
_JITTED = {fn: jax.jit(fn) for fn in (_transpose, _qkv_to_hf, _bias_to_hf, _out_to_hf)} | {
    fn: jax.jit(fn, static_argnames=("heads", "head_dim")) for fn in (_qkv_from_hf, _bias_from_hf, _out_from_hf)}


def _relayout(fn: Callable, **shape: int) -> Callable:
    """`fn` on numpy arrays (host views and copies as numpy makes them), its compiled twin on jax arrays."""
    jitted = _JITTED[fn]
    return lambda x: jitted(x, **shape) if isinstance(x, jax.Array) else fn(x, **shape)


_TRANSPOSE = _relayout(_transpose)


def _qkv(heads: int, head_dim: int) -> tuple[Callable, Callable]:
    return _relayout(_qkv_to_hf), _relayout(_qkv_from_hf, heads=heads, head_dim=head_dim)


def _qkv_bias(heads: int, head_dim: int) -> tuple[Callable, Callable]:
    return _relayout(_bias_to_hf), _relayout(_bias_from_hf, heads=heads, head_dim=head_dim)


def _out(heads: int, head_dim: int) -> tuple[Callable, Callable]:
    return _relayout(_out_to_hf), _relayout(_out_from_hf, heads=heads, head_dim=head_dim)


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every parameter of a decoder built from `cfg`, in HF checkpoint order (embeddings, layers, norm, head)."""
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    maps = [TensorMap(("embedding",), "model.embed_tokens.weight", _identity, _identity)]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        attn = (*ours, "attn")
        for proj, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
            maps.append(TensorMap((*attn, proj, "kernel"), f"{hf}.self_attn.{proj}.weight", *_qkv(heads, h)))
            if cfg.attention_bias:
                maps.append(TensorMap((*attn, proj, "bias"), f"{hf}.self_attn.{proj}.bias", *_qkv_bias(heads, h)))
        maps.append(TensorMap((*attn, "o_proj", "kernel"), f"{hf}.self_attn.o_proj.weight", *_out(n, h)))
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                maps.append(TensorMap((*attn, norm, "scale"), f"{hf}.self_attn.{norm}.weight", _identity, _identity))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            maps.append(TensorMap((*ours, "mlp", proj, "kernel"), f"{hf}.mlp.{proj}.weight", _TRANSPOSE, _TRANSPOSE))
        maps.append(TensorMap((*ours, "input_norm", "scale"), f"{hf}.input_layernorm.weight", _identity, _identity))
        maps.append(TensorMap((*ours, "post_attn_norm", "scale"), f"{hf}.post_attention_layernorm.weight",
                              _identity, _identity))
    maps.append(TensorMap(("final_norm", "scale"), "model.norm.weight", _identity, _identity))
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", _TRANSPOSE, _TRANSPOSE))
    return maps


def ignorable_hf_tensor(name: str, cfg: ModelConfig) -> bool:
    """HF tensors that carry no parameters of ours: rotary buffers, and a tied head saved anyway."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")
