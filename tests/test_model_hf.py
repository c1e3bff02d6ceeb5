"""Parity with transformers: tiny random Qwen2 (tied/untied), Llama 3 and Qwen3 checkpoints built with torch.

For each family: load the saved checkpoint into our decoder; per-token log-probs of left- AND
right-padded batches of mixed lengths match transformers' unpadded forward to 1e-5 relative in
float32; export -> transformers reload gives bit-identical weights and logits; load -> export ->
load is bit-exact. Sharded placement and the tensor stream are checked on the 8-device CPU mesh.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from maxent_jax.errors import UserError
from maxent_jax.model.config import ModelConfig
from maxent_jax.model.decoder import Decoder
from maxent_jax.model.hf_io import (INDEX_FILE, SINGLE_FILE, export_hf_checkpoint, iter_hf_tensors,
                                    load_hf_checkpoint, resolve_checkpoint)
from maxent_jax.model.logprobs import token_logprobs
from maxent_jax.model.mapping import tensor_maps
from maxent_jax.model.rope import inverse_frequencies

LENGTHS = (7, 12, 4)
WIDTH = 12
VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
              attn_implementation="eager")
FAMILIES = {
    "qwen2_tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    "qwen2_untied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                     dict(tie_word_embeddings=False, rope_theta=1000.0)),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(tie_word_embeddings=False, rope_parameters={
                   "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
}


def _build_hf(name: str, out_dir: Path) -> torch.nn.Module:
    """A random float32 HF model with non-trivial norms and biases, saved to `out_dir`."""
    config_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, initializer_range=0.1, **extra)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.normal_(1.0, 0.2)
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.2)
    model.save_pretrained(out_dir)
    return model


def _sequences() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=n).astype(np.int32) for n in LENGTHS]


def _hf_logprobs(model: torch.nn.Module, seq: np.ndarray) -> np.ndarray:
    """Next-token log-probs `[len - 1]` of one unpadded sequence, float32."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(seq[None].astype(np.int64))).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, torch.from_numpy(seq[1:, None].astype(np.int64)))[:, 0].numpy()


def _padded(seqs, left: bool):
    ids = np.zeros((len(seqs), WIDTH), np.int32)
    mask = np.zeros((len(seqs), WIDTH), bool)
    for row, seq in enumerate(seqs):
        cols = slice(WIDTH - len(seq), WIDTH) if left else slice(0, len(seq))
        ids[row, cols], mask[row, cols] = seq, True
    return ids, np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32), mask


def _our_logprobs(model, seqs) -> dict[bool, list[np.ndarray]]:
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, positions, mask):
        m = nnx.merge(graphdef, state)
        hidden, _ = m(ids, positions, mask)
        return token_logprobs(m, hidden[:, :-1], ids[:, 1:], chunk_size=5)

    out = {}
    for left in (True, False):
        ids, positions, mask = _padded(seqs, left)
        logp = np.asarray(run(state, ids, positions, mask))
        out[left] = [logp[r, WIDTH - len(s):] if left else logp[r, :len(s) - 1] for r, s in enumerate(seqs)]
    return out


def _flat_params(model) -> dict:
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_parity_with_transformers_export_and_round_trip(name, tmp_path):
    hf_model = _build_hf(name, tmp_path / "hf")
    seqs = _sequences()
    cfg, model = load_hf_checkpoint(tmp_path / "hf")
    assert cfg.family == name.split("_")[0].replace("llama3", "llama")
    if name == "llama3":  # the scaling must touch all three bands: kept, blended, divided by factor
        ratio = (inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
                 / inverse_frequencies(cfg.head_dim, cfg.rope_theta, None))
        assert ratio.max() == 1 and ratio.min() == np.float32(1 / 8) and ((ratio > 1 / 8) & (ratio < 1)).any()

    ours = _our_logprobs(model, seqs)
    for row, seq in enumerate(seqs):
        reference = _hf_logprobs(hf_model, seq)
        np.testing.assert_allclose(ours[True][row], reference, rtol=1e-5, atol=0, err_msg=f"left-padded row {row}")
        np.testing.assert_allclose(ours[False][row], reference, rtol=1e-5, atol=0, err_msg=f"right-padded row {row}")

    # Export (sharded into several files for one family) -> transformers reload: identical weights and logits.
    shard_bytes = 40_000 if name == "qwen2_untied" else 5 * 2**30
    export_hf_checkpoint(model, cfg, tmp_path / "out", max_shard_bytes=shard_bytes)
    assert (tmp_path / "out" / (INDEX_FILE if name == "qwen2_untied" else SINGLE_FILE)).is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    original_sd, reloaded_sd = hf_model.state_dict(), reloaded.state_dict()
    assert set(original_sd) == set(reloaded_sd)
    for key, value in original_sd.items():
        assert torch.equal(value, reloaded_sd[key]), key
    with torch.no_grad():
        batch = torch.from_numpy(seqs[1][None].astype(np.int64))
        assert torch.equal(hf_model(input_ids=batch).logits, reloaded(input_ids=batch).logits)

    # load -> export -> load is bit-exact.
    cfg_again, model_again = load_hf_checkpoint(tmp_path / "out")
    assert cfg_again == cfg
    first, second = _flat_params(model), _flat_params(model_again)
    assert first.keys() == second.keys()
    for path in first:
        np.testing.assert_array_equal(first[path], second[path], err_msg=str(path))


RULES = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
         "head_dim": None}


def test_layout_conversions_agree_on_numpy_and_jax_arrays():
    """Every mapping converts a host (numpy) and a device (jax, compiled) array to the same HF bytes
    and back, bit-exact, for a config with every kind of tensor (biases, q/k norms, untied head)."""
    cfg = ModelConfig.tiny(attention_bias=True, qk_norm=True, tie_word_embeddings=False, num_heads=4,
                           num_kv_heads=2, head_dim=8, hidden_size=32, intermediate_size=48, num_layers=1)
    params = _flat_params(Decoder(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for m in tensor_maps(cfg):
        ours = rng.standard_normal(params[m.path].shape).astype(np.float32)
        host, device = np.asarray(m.to_hf(ours)), m.to_hf(jax.numpy.asarray(ours))
        assert isinstance(device, jax.Array) and host.ndim <= 2
        np.testing.assert_array_equal(np.asarray(device), host)
        np.testing.assert_array_equal(np.asarray(m.from_hf(jax.numpy.asarray(host))), ours)
        np.testing.assert_array_equal(m.from_hf(host), ours)


def test_sharded_load_places_each_tensor_and_streams_back_bit_exact(tmp_path):
    _build_hf("qwen2_untied", tmp_path / "hf")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    by_names = lambda names: NamedSharding(mesh, PartitionSpec(*(RULES[n] for n in names)))  # noqa: E731
    cfg, model = load_hf_checkpoint(tmp_path / "hf", mesh=mesh, shardings=by_names)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        expected = by_names(var.get_metadata()["out_sharding"])
        assert var.get_value().sharding.is_equivalent_to(expected, var.get_value().ndim), path

    # The same placement given as a pytree of shardings (e.g. computed by the parallel package).
    tree = jax.tree.map(lambda v: by_names(v.get_metadata()["out_sharding"]), nnx.state(model, nnx.Param),
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    _, model_tree = load_hf_checkpoint(tmp_path / "hf", shardings=tree)
    _, model_replicated = load_hf_checkpoint(tmp_path / "hf", mesh=mesh)
    for other in (model_tree, model_replicated):
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                     nnx.to_flat_state(nnx.state(other, nnx.Param))):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    assert model_replicated.embedding.get_value().sharding.is_fully_replicated

    saved = load_file(str(tmp_path / "hf" / SINGLE_FILE))
    streamed = dict(iter_hf_tensors(nnx.state(model, nnx.Param), cfg))
    assert streamed.keys() == saved.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(streamed[key], value, err_msg=key)
    bf16 = dict(iter_hf_tensors(model, cfg, "bfloat16"))
    assert all(str(t.dtype) == "bfloat16" for t in bf16.values())


def test_load_casts_to_bfloat16_and_rejects_incomplete_or_foreign_checkpoints(tmp_path):
    _build_hf("qwen3", tmp_path / "hf")
    cfg, model = load_hf_checkpoint(tmp_path / "hf", dtype="bfloat16", compute_dtype="bfloat16", remat=True)
    assert cfg.param_dtype == "bfloat16" and cfg.remat and model.lm_head.get_value().dtype == jax.numpy.bfloat16
    export_hf_checkpoint(model, cfg, tmp_path / "bf16")  # bfloat16 safetensors that transformers reads as such
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").to(torch.bfloat16)
    for key, value in original.state_dict().items():
        assert reloaded.state_dict()[key].dtype == torch.bfloat16 and torch.equal(value, reloaded.state_dict()[key])

    tensors = load_file(str(tmp_path / "hf" / SINGLE_FILE))
    missing = dict(tensors)
    missing.pop("model.layers.1.self_attn.k_norm.weight")
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file(missing, str(tmp_path / "missing" / SINGLE_FILE))
    with pytest.raises(UserError, match="lacks tensor 'model.layers.1.self_attn.k_norm.weight'"):
        load_hf_checkpoint(tmp_path / "missing")

    foreign = {**tensors, "model.layers.0.mlp.gate_proj.bias": np.zeros(96, np.float32)}
    save_file(foreign, str(tmp_path / "missing" / SINGLE_FILE))
    with pytest.raises(UserError, match="'model.layers.0.mlp.gate_proj.bias'"):
        load_hf_checkpoint(tmp_path / "missing")

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "missing" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    save_file(tensors, str(tmp_path / "missing" / SINGLE_FILE))
    with pytest.raises(UserError, match="lacks tensor 'model.layers.2"):
        load_hf_checkpoint(tmp_path / "missing")


def test_paths_that_are_neither_local_nor_reachable_give_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope" / "deeper dir")
    with pytest.raises(UserError, match="could not be downloaded"):  # HF_HUB_OFFLINE=1 in conftest
        resolve_checkpoint("nobody-here/no-such-model")
    with pytest.raises(UserError, match="has no config.json"):
        load_hf_checkpoint(tmp_path)


def test_tiny_default_exports_with_its_tokenizer_and_matches_transformers(tmp_path):
    from maxent_jax.data.tokenizer import build_offline_tokenizer

    cfg = ModelConfig.tiny()
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    tokenizer_dir = build_offline_tokenizer(tmp_path / "cache")
    out = export_hf_checkpoint(model, cfg, tmp_path / "export", tokenizer_dir=tokenizer_dir)
    export_hf_checkpoint(model, cfg, out, tokenizer_dir=tokenizer_dir)  # overwriting an export is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "export"]

    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = np.asarray(tok("<think>3 * 4 = 12</think><answer>12</answer>").input_ids, np.int32)[None]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    positions = np.arange(ids.shape[1], dtype=np.int32)[None]
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state):
        m = nnx.merge(graphdef, state)
        return m.logits(m(ids, positions, np.ones_like(ids, bool))[0])

    np.testing.assert_allclose(np.asarray(logits(state)), expected, rtol=1e-5, atol=1e-6)
