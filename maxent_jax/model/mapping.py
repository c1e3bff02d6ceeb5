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

The conversions only reshape and transpose, so they work on numpy and jax arrays alike and are
exact (bit-for-bit) in both directions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

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


def _transpose(x):
    return x.T


def _qkv(embed: int, heads: int, head_dim: int) -> tuple[Callable, Callable]:
    return (lambda x: x.reshape(embed, heads * head_dim).T,
            lambda x: x.T.reshape(embed, heads, head_dim))


def _qkv_bias(heads: int, head_dim: int) -> tuple[Callable, Callable]:
    return (lambda x: x.reshape(heads * head_dim), lambda x: x.reshape(heads, head_dim))


def _out(embed: int, heads: int, head_dim: int) -> tuple[Callable, Callable]:
    return (lambda x: x.reshape(heads * head_dim, embed).T,
            lambda x: x.T.reshape(heads, head_dim, embed))


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every parameter of a decoder built from `cfg`, in HF checkpoint order (embeddings, layers, norm, head)."""
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    maps = [TensorMap(("embedding",), "model.embed_tokens.weight", _identity, _identity)]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        attn = (*ours, "attn")
        for proj, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
            maps.append(TensorMap((*attn, proj, "kernel"), f"{hf}.self_attn.{proj}.weight", *_qkv(d, heads, h)))
            if cfg.attention_bias:
                maps.append(TensorMap((*attn, proj, "bias"), f"{hf}.self_attn.{proj}.bias", *_qkv_bias(heads, h)))
        maps.append(TensorMap((*attn, "o_proj", "kernel"), f"{hf}.self_attn.o_proj.weight", *_out(d, n, h)))
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                maps.append(TensorMap((*attn, norm, "scale"), f"{hf}.self_attn.{norm}.weight", _identity, _identity))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            maps.append(TensorMap((*ours, "mlp", proj, "kernel"), f"{hf}.mlp.{proj}.weight", _transpose, _transpose))
        maps.append(TensorMap((*ours, "input_norm", "scale"), f"{hf}.input_layernorm.weight", _identity, _identity))
        maps.append(TensorMap((*ours, "post_attn_norm", "scale"), f"{hf}.post_attention_layernorm.weight",
                              _identity, _identity))
    maps.append(TensorMap(("final_norm", "scale"), "model.norm.weight", _identity, _identity))
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", _transpose, _transpose))
    return maps


def ignorable_hf_tensor(name: str, cfg: ModelConfig) -> bool:
    """HF tensors that carry no parameters of ours: rotary buffers, and a tied head saved anyway."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")
