"""`ModelConfig`: the architecture of one decoder, read from and written to a Hugging Face `config.json`.

One frozen dataclass covers the three supported families, which differ only in switches:

| family  | HF `model_type` | switches                                             |
|---------|-----------------|------------------------------------------------------|
| `qwen2` | `qwen2`         | `attention_bias=True` (bias on q/k/v, none on o)     |
| `llama` | `llama`         | `rope_scaling` may be a `llama3` dict                |
| `qwen3` | `qwen3`         | `qk_norm=True` (RMSNorm over head_dim on q and k)    |

transformers 5 stores `rope_theta` and `rope_scaling` inside one `rope_parameters` dict; older
checkpoints have them at top level. `from_hf_config` reads both spellings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from maxent_jax.errors import UserError

FAMILIES = ("qwen2", "llama", "qwen3")
DTYPES = ("float32", "bfloat16")
# How training/scoring forwards compute attention (model.attention): see model/attention.py.
ATTENTION_IMPLEMENTATIONS = ("blocked", "dot_product", "cudnn")
# What per-layer remat keeps from the forward (model.remat_policy): nothing, or matmul outputs.
REMAT_POLICIES = ("full", "save_dots")
_HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture and numerics of a decoder-only transformer.

    `param_dtype` is the storage dtype of parameters; `compute_dtype` the dtype of activations and
    matmul inputs. Norms, softmax and log-softmax always run in float32 regardless.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    family: str = "qwen2"
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"
    attention: str = "blocked"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model.{name}={value!r} is invalid; expected a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"model.num_kv_heads={self.num_kv_heads} is invalid; it must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise UserError(f"model.head_dim={self.head_dim} is invalid; RoPE needs an even head_dim")
        if self.family not in FAMILIES:
            raise UserError(f"model.family={self.family!r} is invalid; expected one of {', '.join(FAMILIES)}")
        for name, allowed in (("param_dtype", DTYPES), ("compute_dtype", DTYPES),
                              ("attention", ATTENTION_IMPLEMENTATIONS), ("remat_policy", REMAT_POLICIES)):
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"model.{name}={getattr(self, name)!r} is invalid; expected one of {', '.join(allowed)}")
        if not self.rms_norm_eps > 0:
            raise UserError(f"model.rms_norm_eps={self.rms_norm_eps!r} is invalid; expected a positive float")
        if not self.rope_theta > 0:
            raise UserError(f"model.rope_theta={self.rope_theta!r} is invalid; expected a positive float")
        if self.rope_scaling is not None:
            _check_llama3_scaling(self.rope_scaling)
            # A dict field would make the frozen dataclass unhashable (jit static args need hashing).
            object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (e.g. `cfg.replace(compute_dtype='bfloat16')`)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides: Any) -> "ModelConfig":
        """The embedded default: a Qwen2-style decoder small enough to train on two CPU cores.

        vocab 512 matches `maxent_jax.data.tokenizer.build_offline_tokenizer` (ids 0/1/2 are
        `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`); head_dim 32 is a size vLLM's CPU kernels accept.
        """
        fields: dict[str, Any] = dict(
            vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
            attention_bias=True, max_position_embeddings=1024, family="qwen2",
            bos_token_id=None, eos_token_id=2, pad_token_id=0,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from the dict of a Hugging Face `config.json` (`overrides` set dtypes, remat, ...)."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise UserError(
                f"config.json model_type={model_type!r} is not supported; expected one of {', '.join(FAMILIES)}")
        rope = dict(hf.get("rope_parameters") or {})
        legacy_scaling = hf.get("rope_scaling")
        if legacy_scaling:
            rope = {**legacy_scaling, **rope}
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            rope_scaling: dict[str, Any] | None = {"rope_type": "llama3",
                                                   **{k: rope[k] for k in _LLAMA3_KEYS if k in rope}}
        elif rope_type == "default":
            rope_scaling = None
        else:
            raise UserError(
                f"config.json rope_type={rope_type!r} is not supported; expected 'default' or 'llama3'")
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        fields: dict[str, Any] = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            family=model_type,
            bos_token_id=_single_id(hf.get("bos_token_id")),
            eos_token_id=_single_id(hf.get("eos_token_id")),
            pad_token_id=_single_id(hf.get("pad_token_id")),
        )
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"config.json hidden_act={hf['hidden_act']!r} is not supported; expected 'silu'")
        if hf.get("use_sliding_window"):
            raise UserError("config.json use_sliding_window=True is not supported; expected false (full attention)")
        if model_type == "llama" and bool(hf.get("mlp_bias", False)):
            raise UserError("config.json mlp_bias=True is not supported; expected false")
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` dict transformers needs to rebuild this architecture."""
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {**dict(self.rope_scaling), "rope_theta": self.rope_theta}
        out: dict[str, Any] = {
            "architectures": [_HF_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(rope_parameters)
        if self.family == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.family == "qwen3":
            out["attention_bias"] = self.attention_bias
        return out


class _FrozenDict(dict):
    """A hashable read-only dict, so a `ModelConfig` can be a static argument of `jax.jit`."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("ModelConfig.rope_scaling is read-only")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]


def _check_llama3_scaling(scaling: Mapping[str, Any]) -> None:
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "llama3":
        raise UserError(f"model.rope_scaling={dict(scaling)!r} is not supported; "
                        "expected None or a dict with rope_type 'llama3'")
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise UserError(f"model.rope_scaling={dict(scaling)!r} is invalid; llama3 scaling needs {', '.join(missing)}")


def _single_id(value: Any) -> int | None:
    """HF allows a list of eos ids; the model config keeps the first (the tokenizer keeps the rest)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)
