"""Adapter-only weight pushes (rollout/adapters.py) through a real jax rollout server: the base once
in full, then the adapters alone, merged by the server into its own copy of the base; hostile
adapter pushes are refused with one JSON error and change nothing."""

from __future__ import annotations

import json
import urllib.request

import jax
import numpy as np
import pytest
from flax import nnx

from maxent_jax.model.hf_io import load_hf_checkpoint
from maxent_jax.model.lora import LoRAParam, LoRASettings, apply_lora, resolve_targets
from maxent_jax.model.lora_io import merged_state, peft_tensors
from maxent_jax.rollout.adapters import AdapterSpec
from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.client import RolloutClient
from maxent_jax.rollout.completions import RolloutError
from maxent_jax.rollout.remote import RemoteRollout
from maxent_jax.rollout.sampler import Sampler
from tests.rollout_fixtures import TOKEN, rollout_model_dirs, start_rollout_server  # noqa: F401 - fixture

PROMPTS = [[5, 6, 7], [9, 10]]
GREEDY = SamplingParams(n=1, max_tokens=6, temperature=0.0)
SETTINGS = LoRASettings(4, 8.0, resolve_targets(["q_proj", "v_proj", "down_proj"]))


def _randomize(model: nnx.Module, seed: int) -> None:
    """Non-zero adapters (B starts at 0, which would make every push look like the base's)."""
    key = jax.random.key(seed)
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, LoRAParam):
            var.set_value(0.3 * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype))


def _assert_serves(server, model: nnx.Module) -> None:
    """The server's state is the base with the adapters merged (the trainer's own merge), to float32 rounding."""
    got, want = dict(nnx.to_flat_state(server.backend.state)), dict(nnx.to_flat_state(merged_state(model)))
    assert got.keys() == want.keys()
    for path, var in want.items():
        np.testing.assert_allclose(np.asarray(got[path].get_value()), np.asarray(var.get_value()), atol=2e-6, err_msg=str(path))


@pytest.mark.slow  # ~35 s on a busy 2-core host: three model loads, four pushes, two samplers
def test_lora_pushes_send_the_base_once_then_adapters_alone(rollout_model_dirs):
    dir_a, dir_b = rollout_model_dirs
    cfg, model = load_hf_checkpoint(dir_b)  # the trainer's base is not the server's start model
    apply_lora(model, SETTINGS, seed=0)
    _randomize(model, 1)
    with start_rollout_server("jax", dir_a) as (url, server):
        client = RolloutClient(url, client_tag="trainer", token=TOKEN)
        remote = RemoteRollout(client, cfg, lora=SETTINGS)
        assert remote.maybe_push(model, 1)
        first = remote.metrics["rollout/push_bytes"]
        assert server.adapter_version == 1 and client.info()["adapter_version"] == 1
        _assert_serves(server, model)

        _randomize(model, 2)
        assert remote.maybe_push(model, 2)
        adapter_bytes = sum(a.nbytes for a in peft_tensors(model).values())
        assert remote.metrics["rollout/push_adapter_only"] == 1.0
        assert adapter_bytes <= remote.metrics["rollout/push_bytes"] < adapter_bytes + 8192 < first
        assert server.adapter_version == 2 and client.info()["weight_version"] == 2
        _assert_serves(server, model)
        ids, logps, _ = remote.generate(None, PROMPTS, GREEDY, jax.random.key(0))
        sampler, state = Sampler.for_model(nnx.merge(nnx.graphdef(load_hf_checkpoint(dir_b)[1]), merged_state(model)),
                                           eos_token_ids=[cfg.eos_token_id])
        local = sampler.generate(state, PROMPTS, GREEDY, jax.random.key(0))
        assert ids == [row[:n].tolist() for row, n in zip(local.tokens, local.lengths)]
        for got, row, n in zip(logps, local.logprobs, local.lengths):
            np.testing.assert_allclose(got, row[:n], atol=1e-5)

        # Another full push gives the server another base: the next LoRA push sends the base again.
        stale = remote.base_id
        client.push_params(nnx.state(load_hf_checkpoint(dir_a)[1], nnx.Param), cfg, version=3)
        assert server.adapter_version is None and client.info()["base_id"] != stale
        with pytest.raises(RolloutError, match="HTTP 409.*push the base in full first"):
            client.push_adapter(peft_tensors(model), AdapterSpec(4, 8.0, SETTINGS.targets, stale), version=4)
        assert remote.maybe_push(model, 4) and remote.base_id != stale
        assert remote.metrics["rollout/push_bytes"] > first / 2
        _assert_serves(server, model)


@pytest.fixture(scope="module")
def jax_server(rollout_model_dirs):
    """One server for the refusal tests (each checks that a refusal changed nothing)."""
    with start_rollout_server("jax", rollout_model_dirs[0]) as handle:
        yield handle


def _post(url: str, query: str, body: bytes = b"", token: str = TOKEN) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/weights?{query}", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize(
    "query, status, message",
    [
        ("layout=lora&rank=4&alpha=8&targets=q_proj", 400, "needs query parameter 'base'"),
        ("layout=lora&rank=0&alpha=8&targets=q_proj&base=ab", 400, "rank='0'"),
        ("layout=lora&rank=4&alpha=-1&targets=q_proj&base=ab", 400, "alpha='-1'"),
        ("layout=lora&rank=4&alpha=nan&targets=q_proj&base=ab", 400, "alpha='nan'"),
        ("layout=lora&rank=4&alpha=8&targets=q_proj,lm_head&base=ab", 400, "targets="),
        ("layout=lora&rank=4&alpha=8&targets=q_proj&base=../x", 400, "base="),
        ("layout=lora&rank=99999&alpha=8&targets=q_proj&base=ab", 400, "allow at most"),
        ("layout=hf&rank=4", 400, "unknown query parameter 'rank'"),
        ("layout=lora&rank=4&alpha=8&targets=q_proj&base=ab&base=cd", 400, "2 times"),
    ],
)
def test_hostile_adapter_pushes_are_refused_with_json_and_change_nothing(jax_server, query, status, message):
    url, server = jax_server
    before = server.info()
    code, body = _post(url, query, b"\0" * 16)
    assert code == status and message in body["error"], body
    assert server.info() == before


def test_adapter_push_on_another_base_or_of_wrong_shape_is_refused(jax_server, rollout_model_dirs):
    cfg, model = load_hf_checkpoint(rollout_model_dirs[0])
    apply_lora(model, SETTINGS, seed=0)
    tensors = peft_tensors(model)
    url, server = jax_server
    client = RolloutClient(url, client_tag="t", token=TOKEN)
    base = client.info()["base_id"]
    with pytest.raises(RolloutError, match="HTTP 409"):
        client.push_adapter(tensors, AdapterSpec(4, 8.0, SETTINGS.targets, "0" * 16))
    with pytest.raises(RolloutError, match="HTTP 400.*shape"):  # rank 4 tensors under rank 2
        client.push_adapter(tensors, AdapterSpec(2, 8.0, SETTINGS.targets, base))
    with pytest.raises(RolloutError, match="HTTP 400.*unknown tensor"):  # a target the spec does not name
        client.push_adapter(tensors, AdapterSpec(4, 8.0, ("q_proj",), base))
    assert server.weight_version == 0 and server.adapter_version is None
    report = client.push_adapter(tensors, AdapterSpec(4, 8.0, SETTINGS.targets, base), version=5)
    assert report["layout"] == "lora" and server.adapter_version == 5
    _assert_serves(server, model)  # B = 0: the base's own weights


def test_a_server_without_adapter_pushes_gets_the_merged_model(rollout_model_dirs):
    """E.g. a vLLM started without LoRA: the LoRA policy pushes base + adapters merged, in full."""
    from maxent_jax.rollout.jax_backend import JaxBackend
    from maxent_jax.rollout.server import RolloutServer

    cfg, model = load_hf_checkpoint(rollout_model_dirs[1])
    apply_lora(model, SETTINGS, seed=0)
    _randomize(model, 1)
    backend = JaxBackend.from_pretrained(rollout_model_dirs[0])
    backend.weight_layouts = ("hf", "native")
    server = RolloutServer(backend, port=0, token=TOKEN).start()
    try:
        remote = RemoteRollout(RolloutClient(server.url, client_tag="t", token=TOKEN), cfg, lora=SETTINGS)
        assert remote.maybe_push(model, 1) and remote.metrics["rollout/push_adapter_only"] == 0.0
        assert server.adapter_version is None and remote.base_id is None
        _assert_serves(server, model)
    finally:
        server.stop()
