"""ModelConfig: both config.json spellings of RoPE, round trips, and one-line errors for bad values."""

from __future__ import annotations

import pytest

from maxent_jax.errors import UserError
from maxent_jax.model.config import ModelConfig

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
BASE = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def test_transformers5_rope_parameters_and_legacy_top_level_fields_read_the_same():
    new = {**BASE, "model_type": "llama", "rope_parameters": {**LLAMA3, "rope_theta": 5e5}}
    old = {**BASE, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": dict(LLAMA3)}
    a, b = ModelConfig.from_hf_config(new), ModelConfig.from_hf_config(old)
    assert a == b
    assert a.rope_theta == 5e5 and a.rope_scaling["factor"] == 8.0 and a.head_dim == 16
    assert hash(a) == hash(b)  # usable as a jit static argument


def test_family_switches_follow_model_type():
    qwen2 = ModelConfig.from_hf_config({**BASE, "model_type": "qwen2", "rope_theta": 1e6})
    qwen3 = ModelConfig.from_hf_config({**BASE, "model_type": "qwen3", "head_dim": 32,
                                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert qwen2.attention_bias and not qwen2.qk_norm and qwen2.rope_scaling is None
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.head_dim == 32


@pytest.mark.parametrize("cfg", [
    ModelConfig.tiny(),
    ModelConfig.tiny(family="llama", attention_bias=False, rope_scaling=LLAMA3, tie_word_embeddings=False),
    ModelConfig.tiny(family="qwen3", attention_bias=False, qk_norm=True),
])
def test_to_hf_config_round_trips(cfg):
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_eos_list_keeps_the_first_id():
    cfg = ModelConfig.from_hf_config({**BASE, "model_type": "llama", "eos_token_id": [7, 9]})
    assert cfg.eos_token_id == 7


@pytest.mark.parametrize("change, field", [
    ({"num_heads": 3, "num_kv_heads": 2}, "num_kv_heads"),
    ({"head_dim": 15}, "head_dim"),
    ({"family": "gpt2"}, "family"),
    ({"compute_dtype": "float16"}, "compute_dtype"),
    ({"param_dtype": "int8"}, "param_dtype"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_layers": 2.0}, "num_layers"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, "rope_scaling"),
])
def test_bad_values_name_the_field(change, field):
    with pytest.raises(UserError, match=f"model.{field}=") as err:
        ModelConfig.tiny(**change)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("extra, needle", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias=True"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=True"),
])
def test_unsupported_checkpoints_are_rejected_with_one_line(extra, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        ModelConfig.from_hf_config({**BASE, **extra})
