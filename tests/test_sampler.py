"""The in-process sampler against full forwards of the same model (the definition of correct)."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from maxent_jax.model import Decoder, ModelConfig
from maxent_jax.rollout import sampler as sampler_module
from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.sampler import Sampler, bucket, filter_logits

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]


@pytest.fixture(scope="module")
def tiny():
    model = Decoder(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    sampler, state = Sampler.for_model(model)
    return model, sampler, state


_FULL_LEN = 32


@jax.jit
def _forward_logprobs(graphdef, state, ids: jax.Array, length: jax.Array) -> jax.Array:
    """log softmax of a full forward (no cache) over right-padded ids `[1, 32]` -> `[32, vocab]`."""
    model = nnx.merge(graphdef, state)
    positions = jnp.arange(ids.shape[1])[None]
    hidden, _ = model(ids, positions, positions < length)
    return jax.nn.log_softmax(model.logits(hidden)[0].astype(jnp.float32), axis=-1)


def _full_logprobs(model: Decoder, prompt: list[int], completion: list[int]) -> np.ndarray:
    """Full-forward log-probs `[len(completion), vocab]` at the positions that predict the completion."""
    seq = prompt + completion
    ids = np.zeros((1, _FULL_LEN), np.int32)
    ids[0, : len(seq)] = seq
    graphdef, state = nnx.split(model)
    logp = _forward_logprobs(graphdef, state, ids, len(seq))
    return np.asarray(logp)[len(prompt) - 1 : len(seq) - 1]


def test_greedy_equals_argmax_loop_over_full_forwards(tiny):
    model, sampler, state = tiny
    max_tokens = 10
    out = sampler.generate(state, PROMPTS, SamplingParams(n=2, max_tokens=max_tokens, temperature=0.0), jax.random.key(0))
    for p, prompt in enumerate(PROMPTS):
        ids = list(prompt)
        for _ in range(max_tokens):
            ids.append(int(np.argmax(_full_logprobs(model, ids, [0])[0])))
            if ids[-1] == model.cfg.eos_token_id:
                break
        expected = ids[len(prompt) :]
        for j in range(2):
            r = 2 * p + j
            assert out.tokens[r, : out.lengths[r]].tolist() == expected
            np.testing.assert_array_equal(out.sampling_logprobs[r], 0.0)  # a point mass


def test_sampled_logprobs_equal_rescored_full_forward(tiny):
    model, sampler, state = tiny
    params = SamplingParams(n=3, max_tokens=12, temperature=0.7, top_p=0.9, top_k=40)
    out = sampler.generate(state, PROMPTS, params, jax.random.key(1))
    for p, prompt in enumerate(PROMPTS):
        for j in range(params.n):
            r = p * params.n + j
            completion = out.tokens[r, : out.lengths[r]].tolist()
            full = _full_logprobs(model, prompt, completion)
            picked = full[np.arange(len(completion)), completion]
            np.testing.assert_allclose(out.logprobs[r, : len(completion)], picked, atol=1e-5, rtol=0)
            # the sampling log-probs are those of the tempered, truncated distribution of the same logits
            # (log-softmax differs from the logits by a per-row constant, which the filter ignores)
            masked = np.asarray(filter_logits(jnp.asarray(full), 0.7, jnp.int32(40), 0.9))
            sampled = np.asarray(jax.nn.log_softmax(jnp.asarray(masked), axis=-1))[np.arange(len(completion)), completion]
            np.testing.assert_allclose(out.sampling_logprobs[r, : len(completion)], sampled, atol=1e-4, rtol=0)
            assert np.all(out.tokens[r, len(completion) :] == model.cfg.pad_token_id)


def test_deterministic_per_key_and_independent_of_batch_padding(tiny):
    _, sampler, state = tiny
    params = SamplingParams(n=3, max_tokens=12, temperature=0.7, top_p=0.9, top_k=40)
    a = sampler.generate(state, PROMPTS, params, jax.random.key(1))
    b = sampler.generate(state, PROMPTS, params, jax.random.key(1))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # one prompt fewer changes the prompt bucket (3 -> 2 rows of padding), not the rows' samples
    c = sampler.generate(state, PROMPTS[:2], params, jax.random.key(1))
    np.testing.assert_array_equal(c.tokens, a.tokens[:6])
    programs = sampler.num_programs
    d = sampler.generate(state, PROMPTS, params, jax.random.key(2))
    assert not np.array_equal(d.tokens, a.tokens)
    assert sampler.num_programs == programs  # same bucket, another key: no new program


def test_eos_and_stop_tokens_end_rows_and_max_tokens_reports_length(tiny):
    model, sampler, state = tiny
    eos = model.cfg.eos_token_id
    base = sampler.generate(state, PROMPTS, SamplingParams(n=2, max_tokens=10, temperature=0.0), jax.random.key(0))
    # with this seed, greedy decoding of the third prompt emits EOS first; the others run to max_tokens
    assert base.stopped.tolist() == [False, False, False, False, True, True]
    assert base.lengths.tolist() == [10, 10, 10, 10, 1, 1] and base.tokens[4, 0] == eos
    ignore = sampler.generate(state, PROMPTS, SamplingParams(n=2, max_tokens=10, temperature=0.0, ignore_eos=True),
                              jax.random.key(0))
    assert not ignore.stopped.any() and (ignore.lengths == 10).all() and ignore.tokens[4, 0] == eos
    stop_id = int(base.tokens[2, 3])
    first = base.tokens[2].tolist().index(stop_id)
    out = sampler.generate(state, PROMPTS, SamplingParams(n=2, max_tokens=10, temperature=0.0, stop_token_ids=(stop_id,)),
                           jax.random.key(0))
    assert out.stopped[2] and out.lengths[2] == first + 1 and out.tokens[2, first] == stop_id
    assert (out.tokens[2, first + 1 :] == model.cfg.pad_token_id).all() and (out.logprobs[2, first + 1 :] == 0).all()


# -- the sampling distribution ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vocab():
    """vocab 32 with a scaled embedding so the next-token distribution is far from uniform."""
    cfg = ModelConfig.tiny(vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                           num_kv_heads=1, eos_token_id=None)
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    model.embedding.set_value(model.embedding.get_value() * 3.0)
    sampler, state = Sampler.for_model(model, eos_token_ids=[])
    prompt = [3, 4, 5]
    probs = np.exp(_full_logprobs(model, prompt, [0])[0])
    return sampler, state, prompt, probs


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    probs = np.asarray(probs, np.float64)
    expected = probs / probs.sum() * counts.sum()
    keep = expected >= 5  # pool the rare tokens into one bin
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    return float(stats.chisquare(obs, exp).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (1.5, 6, 0.9)])
def test_empirical_distribution_matches_softmax(small_vocab, temperature, top_k, top_p):
    sampler, state, prompt, probs = small_vocab
    n = 4096
    out = sampler.generate(state, [prompt], SamplingParams(n=n, max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p),
                           jax.random.key(7))
    counts = np.bincount(out.tokens[:, 0], minlength=probs.size)
    target = np.asarray(jax.nn.softmax(filter_logits(jnp.log(jnp.asarray(probs))[None], temperature, jnp.int32(top_k), top_p))[0])
    assert 0.02 < probs.max() < 0.9  # a non-trivial distribution
    assert (target > 0).sum() >= 5  # several tokens survive the filters
    assert counts[target == 0].sum() == 0  # nothing outside the top-k / top-p set
    assert _chi_square_p(counts, target) > 1e-3


def test_filter_logits_keeps_top_k_then_nucleus():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    keep = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, 1.0, jnp.int32(k), p))[0]).tolist()  # noqa: E731
    assert keep(0, 1.0) == [True] * 5
    assert keep(2, 1.0) == [True, True, False, False, False]
    assert keep(0, 0.69) == [True, True, False, False, False]  # 0.4 + 0.3 reaches 0.69
    assert keep(0, 0.71) == [True, True, True, False, False]
    assert keep(0, 0.3) == [True, False, False, False, False]
    # top-p on the top-3 renormalised distribution (0.471, 0.353, 0.176): 0.8 needs two, 0.85 three
    assert keep(3, 0.8) == [True, True, False, False, False]
    assert keep(3, 0.85) == [True, True, True, False, False]
    scaled = np.asarray(filter_logits(logits, 0.5, jnp.int32(0), 1.0))
    np.testing.assert_allclose(scaled, np.asarray(logits) / 0.5, rtol=1e-6)


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert bucket(3, 16) == 16 and bucket(17, 16) == 32


@pytest.mark.slow
def test_runs_on_params_sharded_over_the_training_mesh(tiny):
    """The trainer's (graphdef, params, rest) split, params born sharded over 8 devices: same samples."""
    from maxent_jax.parallel.mesh import make_mesh
    from maxent_jax.parallel.train_step import init_sharded_model

    _, sampler, state = tiny
    mesh = make_mesh((1, -1, 1))
    graphdef, params, rest = init_sharded_model(lambda rngs: Decoder(ModelConfig.tiny(), rngs=rngs), mesh)
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params))
    sharded = Sampler(graphdef, eos_token_ids=sampler.eos_token_ids)
    params_ = SamplingParams(n=2, max_tokens=8, temperature=0.7, top_p=0.9)
    got = sharded.generate((params, rest), PROMPTS, params_, jax.random.key(0))
    want = sampler.generate(state, PROMPTS, params_, jax.random.key(0))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_stop_strings_are_cut_on_the_host_and_refused_without_a_decoder(tiny):
    from maxent_jax.rollout.sampler import SampleBatch
    from maxent_jax.rollout.stop_strings import apply_stop_strings

    decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # noqa: E731 - token i is the letter i
    lp = -np.arange(1, 11, dtype=np.float32).reshape(2, 5)
    batch = SampleBatch(tokens=np.array([[0, 1, 2, 3, 4], [3, 3, 3, 9, 9]], np.int32), logprobs=lp, sampling_logprobs=lp,
                        lengths=np.array([5, 3], np.int32), stopped=np.array([False, False]))
    cut, texts = apply_stop_strings(batch, ("cd", "zz"), decode, pad_id=9)
    assert texts == ["ab", "ddd"]  # the text ends before "cd"; row 1 has no stop string
    assert cut.lengths.tolist() == [4, 3] and cut.stopped.tolist() == [True, False]
    assert cut.tokens[0].tolist() == [0, 1, 2, 3, 9] and cut.logprobs[0, 4] == 0 and cut.logprobs[0, 3] == -4
    np.testing.assert_array_equal(cut.tokens[1], batch.tokens[1])
    _, sampler, state = tiny
    with pytest.raises(ValueError, match=r"stop strings \['x'\] need decode="):
        sampler.generate(state, PROMPTS, SamplingParams(stop=("x",)), jax.random.key(0))


def test_decode_streams_give_the_one_program_samples(tiny):
    """streams=2 (3 prompts split 1 + 2, two programs at once): the same tokens, lengths and stop flags,
    log-probs within float32 rounding, with EOS stops, top-p filtering and stop strings on the host."""
    model, sampler, state = tiny
    streamed = Sampler(sampler.graphdef, eos_token_ids=sampler.eos_token_ids, streams=2)
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    params = SamplingParams(n=3, max_tokens=12, temperature=1.3, top_p=0.95, stop=("7 7",))
    for key in (0, 1):
        want = sampler.generate(state, PROMPTS, params, jax.random.key(key), decode=decode)
        got = streamed.generate(state, PROMPTS, params, jax.random.key(key), decode=decode)
        assert got.tokens.shape == want.tokens.shape == (9, 12)
        for field in ("tokens", "lengths", "stopped"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        for field in ("logprobs", "sampling_logprobs"):
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=1e-5, err_msg=field)
    assert streamed.num_programs == 2  # one program per share size (1 and 2 prompts)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several devices")
def test_decode_streams_refuse_parameters_sharded_over_devices(tiny):
    from jax.sharding import NamedSharding, PartitionSpec

    from maxent_jax.parallel.mesh import make_mesh

    _, sampler, state = tiny
    mesh = make_mesh((1, -1, 1))
    spread = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec())), state)
    streamed = Sampler(sampler.graphdef, eos_token_ids=sampler.eos_token_ids, streams=2)
    with pytest.raises(ValueError, match="streams=2 needs parameters on one device"):
        streamed.generate(spread, PROMPTS, SamplingParams(n=1, max_tokens=2), jax.random.key(0))


def _loop_bodies(hlo: str) -> list[str]:
    """The body computations of every while loop in a compiled module's text."""
    computations = dict(re.findall(r"^(?:ENTRY )?%?([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)^\}", hlo, re.S | re.M))
    return [computations[name] for name in re.findall(r"while\(.*?body=%([\w.\-]+)", hlo)]


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_decode_loop_updates_the_kv_cache_in_place(kv_heads, monkeypatch):
    """An XLA:CPU regression guard (`model.cache`): no decode step copies a KV-cache array.

    With a one-kv-head cache that kept its size-1 axis, XLA:CPU fused each cache update twice and
    copied every cache array on every step (16 copies per step in the bench's `tiny` preset).
    """
    cfg = ModelConfig.tiny(num_kv_heads=kv_heads, hidden_size=64, num_heads=2, intermediate_size=128)
    sampler, state = Sampler.for_model(Decoder(cfg, rngs=nnx.Rngs(0)))
    calls = []
    real = sampler_module._decode
    monkeypatch.setattr(sampler_module, "_decode", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    sampler.generate(state, PROMPTS, SamplingParams(n=2, max_tokens=4), jax.random.key(0))
    (args, kwargs), = calls
    hlo = real.lower(*args, **kwargs).compile().as_text()
    step = max(_loop_bodies(hlo), key=len)  # the decode loop (the others are RoPE and noise helpers)
    assert step.count(" dot(") + step.count("fusion(") > 10  # it is the model's step
    rows = bucket(len(PROMPTS)) * 2
    max_len = args[2].shape[1] + kwargs["max_new"]
    cache_elements = rows * kv_heads * cfg.head_dim * max_len
    copied = [shape for shape in re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} copy\(", step)
              if math.prod(int(d) for d in shape.split(",")) == cache_elements]
    assert copied == []
