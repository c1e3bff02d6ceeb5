"""Weight push from live JAX parameters (the trainer's path) and the server entry point as a process."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import jax
from flax import nnx

from maxent_jax.model.hf_io import iter_hf_tensors, load_hf_checkpoint
from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.client import RolloutClient
from maxent_jax.rollout.completions import RolloutError
from maxent_jax.rollout.weights import iter_stream
from tests.rollout_fixtures import TOKEN, rollout_model_dirs, start_rollout_server  # noqa: F401 - fixture

PROMPTS = [[1, 20, 30, 40], [1, 50, 60]]
GREEDY = SamplingParams(n=2, max_tokens=8, temperature=0.0)


def _ids(batch):
    return [[s.token_ids.tolist() for s in g] for g in batch.groups]


def _assert_state_equals(state, params):
    """Every leaf bit for bit, in the same (our) shapes and dtypes."""
    got, want = dict(nnx.to_flat_state(state)), dict(nnx.to_flat_state(params))
    assert got.keys() == want.keys()
    for path, var in want.items():
        value = got[path].get_value()
        assert value.shape == var.get_value().shape and value.dtype == var.get_value().dtype, path
        np.testing.assert_array_equal(np.asarray(value).view(np.uint8), np.asarray(var.get_value()).view(np.uint8))


def test_push_params_streams_one_tensor_at_a_time_and_equals_a_fresh_server(rollout_model_dirs):
    """Both layouts through a real jax server: `hf` when asked, `native` by default (the server offers it)."""
    dir_a, dir_b = rollout_model_dirs
    cfg, model_b = load_hf_checkpoint(dir_b)
    params = nnx.state(model_b, nnx.Param)
    params_a = nnx.state(load_hf_checkpoint(dir_a)[1], nnx.Param)
    sizes = [leaf.nbytes for leaf in jax.tree.leaves(params)]
    for native in (False, True):
        stream = iter_stream(iter_hf_tensors(params, cfg, "float32", native=native))
        chunks = [len(c) if isinstance(c, bytes) else c.nbytes for c in stream]
        assert max(chunks) == max(sizes)  # the largest piece in flight is one tensor, never the model
    with start_rollout_server("jax", dir_a) as (url, server):
        client = RolloutClient(url, client_tag="trainer", token=TOKEN)
        report = client.push_params(params, cfg, version=3, layout="hf")
        assert report["weight_version"] == 3 and report["bytes"] >= sum(sizes) and report["layout"] == "hf"
        _assert_state_equals(server.backend.state, params)
        pushed = client.generate(PROMPTS, GREEDY, current_step=4)
        native = client.push_params(params_a, cfg, version=4)
        assert native["layout"] == "native" and native["bytes"] == report["bytes"]
        _assert_state_equals(server.backend.state, params_a)
        assert client.push_params(params, cfg, version=5)["layout"] == "native"
        _assert_state_equals(server.backend.state, params)
        assert _ids(client.generate(PROMPTS, GREEDY)) == _ids(pushed)
    with start_rollout_server("jax", dir_b) as (url, _):
        fresh = RolloutClient(url, client_tag="fresh").generate(PROMPTS, GREEDY)
    assert _ids(pushed) == _ids(fresh) and pushed.metrics["rollout/weight_staleness_steps"] == 1.0
    for g1, g2 in zip(pushed.groups, fresh.groups):
        for s1, s2 in zip(g1, g2):
            np.testing.assert_array_equal(s1.logprobs, s2.logprobs)


def test_jax_backend_adopts_received_buffers_and_relayouts_the_rest_bit_exactly():
    """The server's apply path without HTTP: framed stream -> read_stream(prepare) -> load_weights."""
    import io

    from maxent_jax.model import Decoder, ModelConfig
    from maxent_jax.model.mapping import tensor_maps
    from maxent_jax.rollout.jax_backend import JaxBackend
    from maxent_jax.rollout.weights import ReceiveBuffers, read_stream

    cfg = ModelConfig.tiny()
    backend = JaxBackend(Decoder(cfg, rngs=nnx.Rngs(0)))
    target = nnx.state(Decoder(cfg, rngs=nnx.Rngs(1)), nnx.Param)
    stream = io.BytesIO(b"".join(bytes(c) for c in iter_stream(iter_hf_tensors(target, cfg, cfg.param_dtype))))
    received = {}

    def keep(name, array):
        received[name] = array
        return backend.prepare_weight(name, array)

    prepared = read_stream(stream.readinto, backend.expected_weights(), keep, ReceiveBuffers())
    old_state = backend.state
    backend.load_weights(prepared.items())
    assert backend.state is not old_state
    old_flat, new_flat = dict(nnx.to_flat_state(old_state)), dict(nnx.to_flat_state(backend.state))
    want_flat = dict(nnx.to_flat_state(target))
    adopted = 0
    for m in tensor_maps(cfg):
        got, want = new_flat[m.path].get_value(), want_flat[m.path].get_value()
        assert got.dtype == want.dtype and got.sharding == old_flat[m.path].get_value().sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        if m.from_hf(received[m.hf_name]).flags.c_contiguous and jax.default_backend() == "cpu":
            # A layout that is a view of the received bytes reaches the device without a copy.
            assert got.unsafe_buffer_pointer() == received[m.hf_name].ctypes.data
            adopted += 1
    assert adopted >= 2  # at least the embedding and the final norm


def test_native_push_is_adopted_without_a_copy_and_hf_tensors_under_native_are_refused(rollout_model_dirs):
    """Native layout: every received tensor becomes the parameter as it is; HF shapes under it are refused."""
    import io

    from maxent_jax.model import Decoder, ModelConfig
    from maxent_jax.model.mapping import tensor_maps
    from maxent_jax.rollout.jax_backend import JaxBackend
    from maxent_jax.rollout.weights import ReceiveBuffers, read_stream

    cfg = ModelConfig.tiny()
    backend = JaxBackend(Decoder(cfg, rngs=nnx.Rngs(0)))
    target = nnx.state(Decoder(cfg, rngs=nnx.Rngs(1)), nnx.Param)
    stream = io.BytesIO(b"".join(bytes(c) for c in iter_stream(iter_hf_tensors(target, cfg, native=True))))
    received = {}

    def keep(name, array):
        received[name] = array
        return backend.prepare_weight(name, array, layout="native")

    backend.load_weights(read_stream(stream.readinto, backend.expected_weights("native"), keep, ReceiveBuffers()).items())
    _assert_state_equals(backend.state, target)
    if jax.default_backend() == "cpu":
        flat = dict(nnx.to_flat_state(backend.state))
        for m in tensor_maps(cfg):
            assert flat[m.path].get_value().unsafe_buffer_pointer() == received[m.hf_name].ctypes.data, m.hf_name

    dir_a, dir_b = rollout_model_dirs
    cfg_b, model_b = load_hf_checkpoint(dir_b)
    hf = list(iter_hf_tensors(nnx.state(model_b, nnx.Param), cfg_b, "float32"))
    kernel, array = next((name, a) for name, a in hf if name.endswith("q_proj.weight"))
    with start_rollout_server("jax", dir_a) as (url, server):
        client = RolloutClient(url, client_tag="trainer", token=TOKEN)
        before = server.backend.state
        with pytest.raises(RolloutError) as err:
            client.push_weights(hf, layout="native")  # HF shapes announced as native
        message = str(err.value)
        assert "HTTP 400" in message and "nothing applied" in message and "(push in layout 'native')" in message
        native_shape = list(server.backend.expected_weights("native")[kernel][0])
        # The embedding (same shape in both layouts) passes; the first kernel is named with both shapes.
        assert f"tensor {kernel!r}: shape {list(array.shape)}, expected {native_shape}" in message
        assert server.backend.state is before and server.weight_version == 0


def test_reused_receive_memory_never_changes_a_state_still_in_use():
    """Pushes alternate between receive arenas; one still referenced by a live state is left alone."""
    import io

    from maxent_jax.model import Decoder, ModelConfig
    from maxent_jax.rollout.jax_backend import JaxBackend
    from maxent_jax.rollout.weights import ReceiveBuffers, read_stream

    cfg = ModelConfig.tiny()
    backend = JaxBackend(Decoder(cfg, rngs=nnx.Rngs(0)))
    buffers = ReceiveBuffers()
    models = [nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)), nnx.Param) for seed in (1, 2, 3)]
    streams = [b"".join(bytes(c) for c in iter_stream(iter_hf_tensors(m, cfg, cfg.param_dtype))) for m in models]

    def push(i):
        prepared = read_stream(io.BytesIO(streams[i]).readinto, backend.expected_weights(), backend.prepare_weight, buffers)
        backend.load_weights(prepared.items())

    def assert_state(state, i):
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(models[i])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    push(0)
    kept = backend.state  # e.g. a caller still holding the weights of push 0
    push(1)
    push(2)  # the arena of push 0 is still in use by `kept`: not reused
    assert_state(kept, 0)
    assert_state(backend.state, 2)
    del kept
    push(0)  # now arenas are reused; each state still reads its own weights
    assert_state(backend.state, 0)


def test_native_pushes_alternate_between_two_receive_arenas_unless_a_state_is_kept():
    """After a native push the replaced state (holding the previous arena) is collected at once."""
    import io

    from maxent_jax.model import Decoder, ModelConfig
    from maxent_jax.rollout.jax_backend import JaxBackend
    from maxent_jax.rollout.weights import ReceiveBuffers, read_stream

    cfg = ModelConfig.tiny()
    backend = JaxBackend(Decoder(cfg, rngs=nnx.Rngs(0)))
    buffers = ReceiveBuffers()
    leased = []
    lease = buffers.lease
    buffers.lease = lambda capacity: leased.append(lease(capacity)) or leased[-1]
    models = [nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)), nnx.Param) for seed in (1, 2)]
    streams = [b"".join(bytes(c) for c in iter_stream(iter_hf_tensors(m, cfg, native=True))) for m in models]

    def push(i):
        prepare = lambda name, array: backend.prepare_weight(name, array, layout="native")  # noqa: E731
        prepared = read_stream(io.BytesIO(streams[i]).readinto, backend.expected_weights("native"), prepare, buffers)
        backend.load_weights(prepared.items(), layout="native")

    for i in (0, 1, 0, 1):
        push(i)
        _assert_state_equals(backend.state, models[i])
    assert len({id(arena) for arena in leased}) == 2  # no push after the second received into new memory
    kept = backend.state  # a caller still holding the weights of the last push: its arena is left alone
    push(0)
    push(1)
    _assert_state_equals(kept, models[1])
    _assert_state_equals(backend.state, models[1])
    assert len({id(arena) for arena in leased}) == 3


def test_remote_rollout_pushes_on_cadence_and_equals_the_in_process_sampler(rollout_model_dirs):
    from maxent_jax.rollout.remote import RemoteRollout
    from maxent_jax.rollout.sampler import Sampler

    dir_a, dir_b = rollout_model_dirs
    cfg, model_b = load_hf_checkpoint(dir_b)
    params = nnx.state(model_b, nnx.Param)
    with start_rollout_server("jax", dir_a) as (url, server):
        remote = RemoteRollout(RolloutClient(url, client_tag="trainer", token=TOKEN), cfg, sync_interval_steps=2)
        pushes = [remote.maybe_push(params, step) for step in (0, 0, 1, 2, 3)]
        assert pushes == [True, False, False, True, False] and server.weight_version == 2
        assert remote.metrics["rollout/push_bytes"] > 0 and remote.metrics["rollout/push_gb_per_s"] > 0
        assert remote.metrics["rollout/push_native_layout"] == 1.0  # the jax server offers our layout
        ids, logps, stopped = remote.generate(params, PROMPTS, GREEDY, jax.random.key(0))
        assert remote.metrics["rollout/weight_staleness_steps"] == 1.0  # trained step 3, weights of step 2
    sampler, state = Sampler.for_model(model_b, eos_token_ids=[cfg.eos_token_id])
    local = sampler.generate(state, PROMPTS, GREEDY, jax.random.key(0))
    assert ids == [row[:n].tolist() for row, n in zip(local.tokens, local.lengths)]
    for got, row, n in zip(logps, local.logprobs, local.lengths):
        np.testing.assert_allclose(got, row[:n], atol=1e-6)
    np.testing.assert_array_equal(stopped, local.stopped)


@pytest.mark.slow
def test_serve_entry_point_killed_mid_run_client_retries_then_fails_clearly(rollout_model_dirs, tmp_path):
    with start_rollout_server("jax", rollout_model_dirs[0], subprocess_mode=True, tmp_dir=tmp_path) as (url, proc):
        client = RolloutClient(url, client_tag="t", max_retries=3, backoff=0.1, timeout=120)
        assert len(client.generate(PROMPTS, GREEDY).groups) == 2
        outcome = {}

        def long_request():
            try:
                outcome["batch"] = client.generate(PROMPTS * 8, SamplingParams(n=8, max_tokens=200, temperature=1.0, ignore_eos=True))
            except RolloutError as err:
                outcome["error"] = err

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(1.0)  # the request is in flight (compiling a new bucket, then decoding)
        proc.kill()
        worker.join(timeout=120)
    assert "error" in outcome, "the request finished before the kill; make it longer"
    message = str(outcome["error"])
    assert f"{url}/generate failed after 3 attempt(s)" in message and "ConnectionRefusedError" in message


@pytest.mark.slow
def test_bfloat16_server_takes_a_bfloat16_push(rollout_model_dirs):
    """`--dtype bfloat16`: /info says bfloat16, push_params casts on device, frames carry BF16."""
    from maxent_jax.rollout.jax_backend import JaxBackend
    from maxent_jax.rollout.server import RolloutServer

    dir_a, dir_b = rollout_model_dirs
    cfg, model_b = load_hf_checkpoint(dir_b)

    def serve(model_dir):
        return RolloutServer(JaxBackend.from_pretrained(model_dir, dtype="bfloat16"), port=0, token=TOKEN).start()

    server = serve(dir_a)
    try:
        client = RolloutClient(server.url, client_tag="bf16", token=TOKEN)
        assert client.info()["dtype"] == "bfloat16"
        report = client.push_params(nnx.state(model_b, nnx.Param), cfg)
        assert report["weight_version"] == 1
        pushed = client.generate(PROMPTS, GREEDY)
    finally:
        server.stop()
    fresh_server = serve(dir_b)
    try:
        fresh = RolloutClient(fresh_server.url, client_tag="bf16").generate(PROMPTS, GREEDY)
    finally:
        fresh_server.stop()
    assert _ids(pushed) == _ids(fresh)
