"""`train.packing`: packed buffers score exactly what the padded layout scores.

Three layers: the host packer's geometry (every token placed once, buffers within their length,
counts bucketed, devices balanced); the packed forward's log-probs, gradients and InfoSeed pooled
states against the padded forward's on random length mixes (hypothesis); and the train step's
loss, metrics and gradients for every objective, packed against padded, on one device and on the
8-device mesh with micro-batches and gradient pieces.
"""

from __future__ import annotations

import logging

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, strategies as st

from maxent_jax import packing
from maxent_jax.config import get_base_config
from maxent_jax.config_check import validate
from maxent_jax.errors import UserError
from maxent_jax.model import Decoder, ModelConfig
from maxent_jax.objectives import ObjectiveSettings, get_objective
from maxent_jax.objectives.grpo import prepare_grpo_batch
from maxent_jax.objectives.infoseed import pool_hidden
from maxent_jax.objectives.maxent import prepare_maxent_batch
from maxent_jax.objectives.settings import InfoSeedSettings
from maxent_jax.packing import (
    Costs,
    Packer,
    balance,
    bucket_buffers,
    first_fit_decreasing,
    in_pieces,
    make_packed_logprob_fn,
    packed_logprobs_and_hidden,
    packed_pooled,
)
from maxent_jax.parallel.forward import make_logprob_fn
from maxent_jax.parallel.mesh import make_mesh
from maxent_jax.parallel.train_step import SplitLoss, init_train_state, make_train_step
from maxent_jax.policy import completion_logprobs, rl_loss
from maxent_jax.scoring import build_score_batch
from tests.test_parallel_step import record_gradients

VOCAB = 64
CFG = ModelConfig.tiny(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8)
SCORE = ("input_ids", "positions", "attention_mask", "completion_ids", "completion_mask")


def _grouped(rng: np.random.Generator, prompts: int, group: int, prompt_len: int, completion_len: int,
             skew: bool = True, lengths: tuple[list[int], list[int]] | None = None) -> dict[str, np.ndarray]:
    """A grouped score batch `[P, G, ...]`: prompts of 1..prompt_len tokens, completions of 0..completion_len
    (mostly short with a few at the maximum when `skew`), or of the given (prompt, completion) lengths."""
    if lengths is not None:
        prompt_lengths, lengths = lengths
    else:
        prompt_lengths = rng.integers(1, prompt_len + 1, prompts)
        if skew:
            lengths = np.where(rng.random(prompts * group) < 0.2, completion_len,
                               rng.integers(0, completion_len // 3 + 1, prompts * group))
        else:
            lengths = np.full(prompts * group, completion_len)
    prompt_ids = [list(rng.integers(1, VOCAB, n)) for n in prompt_lengths]
    completions = [list(rng.integers(1, VOCAB, n)) for n in lengths]
    rows = build_score_batch([p for p in prompt_ids for _ in range(group)], completions, prompt_len=prompt_len,
                             completion_len=completion_len, pad_id=0)
    return {k: v.reshape(prompts, group, *v.shape[1:]) for k, v in rows.items()}


def test_bucketed_counts_first_fit_and_balance():
    assert [bucket_buffers(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    rng = np.random.default_rng(0)
    sizes = list(rng.integers(1, 40, 50))
    bins = first_fit_decreasing(sizes, 40)
    assert sorted(i for b in bins for i in b) == list(range(50))
    assert all(sum(sizes[i] for i in b) <= 40 for b in bins)
    assert len(bins) <= 11 * -(-sum(sizes) // 40) // 9 + 1  # FFD's bound against the volume bound
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([41], 40)
    tokens = list(rng.integers(1, 100, 24))
    places = balance(tokens, 4, 6)
    assert sorted(b for p in places for b in p) == list(range(24)) and all(len(p) == 6 for p in places)
    loads = [sum(tokens[b] for b in p) for p in places]
    assert max(loads) - min(loads) <= max(tokens)


def test_packer_places_every_token_once_and_splits_long_groups():
    grouped = _grouped(np.random.default_rng(1), prompts=4, group=4, prompt_len=6, completion_len=10)
    lp = grouped["attention_mask"][:, 0, :6].sum(-1)
    lc = grouped["completion_mask"].sum(-1)
    for length in (46, 16, 24):
        packed, stats = Packer(length, devices=2, chunks=2)(grouped)
        buffers = packed["buffer_ids"].shape[0]
        assert buffers % 4 == 0 and stats["pack/buffers"] == buffers
        real = int((packed["buffer_segments"] > 0).sum())
        prompts_written = real - int(lc.sum())
        assert prompts_written >= int(lp.sum())  # each prompt at least once, copies only where a group splits
        if length == 46:  # one buffer fits a whole group: every prompt exactly once
            assert prompts_written == int(lp.sum())
        assert stats["pack/fill"] == pytest.approx(real / packed["buffer_ids"].size)


def test_pieces_of_each_prompts_completions_when_a_device_holds_fewer_prompts_than_pieces():
    """One prompt per batch device (the 7B recipe's shape): piece c's buffers (rows c, c + chunks, ... of
    each micro-batch) hold every prompt's completions g with g % chunks == c and a copy of the prompt,
    and `pack_logp_index` reads each completion's tokens from its own piece's head pairs. With two
    prompts per device the pieces keep taking whole groups, prompt p in piece p % chunks."""
    micro, chunks, prompt_len = 2, 2, 6
    grouped = _grouped(np.random.default_rng(4), prompts=8, group=4, prompt_len=prompt_len, completion_len=10)
    lp = grouped["attention_mask"][:, 0, :prompt_len].sum(-1)
    lc = grouped["completion_mask"].sum(-1)
    for devices, piece_of in ((4, lambda p, g: g % chunks), (2, lambda p, g: p % chunks)):
        for length in (16, 48):  # a completion per buffer (prompts copied within a piece), or a piece's share
            packed, _ = Packer(length, devices=devices, chunks=chunks, micro=micro)(grouped)
            buffers = packed["buffer_ids"].shape[0] // micro
            heads = packed["buffer_predict"].shape[1]
            prompts_in = [set() for _ in range(micro * buffers)]  # the prompts each buffer's completions read
            for p in range(8):
                for g in range(4):
                    k = int(lc[p, g])
                    if k == 0:
                        continue
                    q, h = divmod(int(packed["pack_logp_index"][p, g, 0]), heads)
                    row = (p // 4) * buffers + q * chunks + piece_of(p, g)
                    np.testing.assert_array_equal(packed["pack_logp_index"][p, g, :k], q * heads + h + np.arange(k))
                    completion = grouped["completion_ids"][p, g, :k]
                    np.testing.assert_array_equal(packed["buffer_targets"][row, h:h + k], completion)
                    slots = packed["buffer_predict"][row, h:h + k]
                    np.testing.assert_array_equal(packed["buffer_ids"][row, slots[1:]], completion[:-1])
                    start = slots[0] + 1 - lp[p]  # the prompt copy this completion reads, ending at its first predictor
                    np.testing.assert_array_equal(packed["buffer_ids"][row, start:slots[0] + 1],
                                                  grouped["input_ids"][p, 0, prompt_len - lp[p]:prompt_len])
                    prompts_in[row].add(p)
            segments = packed["buffer_segments"]
            real = int((segments > 0).sum())
            copies = sum(int(lp[p]) for row in prompts_in for p in row)
            assert real - int(lc.sum()) >= copies  # every prompt a completion reads was written in its buffer
            if devices == 4 and length == 48:  # a piece's share of a group fits a buffer: one copy per piece
                assert real - int(lc.sum()) == chunks * int(lp.sum())


def test_automatic_length_packs_skewed_steps_and_leaves_equal_ones_padded():
    """pack_length 0: a skewed step is packed into buffers shorter than a group (fewer, cheaper tokens);
    an equal-length step keeps the padded layout (no arrays), and each shape counts as one program."""
    small = ModelConfig.tiny(hidden_size=256, num_layers=4, num_heads=4, head_dim=64, num_kv_heads=2,
                             intermediate_size=768)
    packer = Packer(0, devices=1, costs=Costs.of(small))
    rng = np.random.default_rng(0)
    packed, stats = packer(_grouped(rng, prompts=2, group=8, prompt_len=40, completion_len=64))
    assert stats["pack/packed"] == 1.0 and stats["pack/length"] < 40 + 8 * 64
    assert packed["buffer_ids"].size < 2 * (40 + 8 * 64)
    packed, stats = packer(_grouped(rng, prompts=2, group=8, prompt_len=40, completion_len=64, skew=False))
    assert packed == {} and stats["pack/packed"] == 0.0 and stats["pack/programs"] == 2.0


def test_automatic_packing_never_holds_more_per_device_than_the_padded_layout():
    """The planner compiles the padded programs, so an automatic packing must not outgrow them. Without
    the guard, the cheapest buffers by cost would hold more vocabulary-head rows per device than the
    padded layout (1 prompt of 40 + 2 x 16 tokens per device: 48 against 32), or one 384-slot buffer
    whose segment mask outgrows the padded slots times a row's width (2 prompts of 100 + 16 x 16)."""
    small = ModelConfig.tiny(hidden_size=256, num_layers=4, num_heads=4, head_dim=64, num_kv_heads=2,
                             intermediate_size=768)
    cases = [(4, 4, 2, 40, 16, (2, 3, 20)), (1, 2, 16, 100, 16, (2, 3))]  # devices, prompts, G, Tp, Tc, seeds
    for devices, prompts, group, tp, tc, seeds in cases:
        for prompt_once in (True, False):
            width = tp + group * tc if prompt_once else group * (tp + tc)
            slots, heads, row = prompts * width // devices, prompts * group * tc // devices, -(-(tp + tc) // 64) * 64
            packer = Packer(0, devices=devices, costs=Costs.of(small), prompt_once=prompt_once)
            for seed in seeds:
                packed, _ = packer(_grouped(np.random.default_rng(seed), prompts=prompts, group=group, prompt_len=tp,
                                            completion_len=tc))
                if packed:
                    per_device, length = packed["buffer_ids"].shape[0] // devices, packed["buffer_ids"].shape[1]
                    assert per_device * length <= slots
                    assert per_device * packed["buffer_predict"].shape[1] <= heads
                    assert per_device * length ** 2 <= slots * row


def _model(attention: str) -> Decoder:
    return Decoder(CFG.replace(attention=attention), rngs=nnx.Rngs(0))


@pytest.mark.slow
@hypothesis.settings(max_examples=4, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), prompts=st.integers(1, 4), group=st.integers(1, 4),
       length=st.sampled_from([14, 20, 41]), chunks=st.sampled_from([1, 2]), skew=st.booleans(),
       attention=st.sampled_from(["blocked", "dot_product"]))
def test_packed_forward_equals_the_padded_one(seed, prompts, group, length, chunks, skew, attention):
    """Log-probs (0 on padding), their gradients and InfoSeed's pooled states, packed vs padded."""
    hypothesis.assume(prompts % chunks == 0)
    grouped = _grouped(np.random.default_rng(seed), prompts, group, prompt_len=5, completion_len=9, skew=skew)
    packed, _ = Packer(length, devices=1, chunks=chunks, rows_for_pooling=True)(grouped)
    batch = {k: jnp.asarray(v) for k, v in {**grouped, **packed}.items()}
    mask = batch["completion_mask"].astype(jnp.float32)
    weights = jax.random.normal(jax.random.key(seed), mask.shape)
    graphdef, params, rest = nnx.split(_model(attention), nnx.Param, ...)

    def padded(p):
        model = nnx.merge(graphdef, p, rest)
        logp, hidden = completion_logprobs(model, {k: batch[k] for k in SCORE}, 0, attention == "blocked")
        return jnp.sum(logp * mask * weights), (logp * mask, hidden)

    def packed_fn(p):
        model = nnx.merge(graphdef, p, rest)
        logp = in_pieces(lambda piece: packed_logprobs_and_hidden(model, piece, 0)[0], batch, chunks)
        return jnp.sum(logp * weights), logp

    (_, (want, hidden)), want_grads = jax.jit(jax.value_and_grad(padded, has_aux=True))(params)
    (_, got), grads = jax.jit(jax.value_and_grad(packed_fn, has_aux=True))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if chunks == 1:
        buffers_hidden = jax.jit(lambda p: packed_logprobs_and_hidden(nnx.merge(graphdef, p, rest), batch, 0)[1])(params)
        for pooling in ("mean", "last"):
            want_pool = pool_hidden(hidden.astype(jnp.float32), batch["attention_mask"].reshape(prompts * group, -1),
                                    pooling).reshape(prompts, group, -1)
            np.testing.assert_allclose(packed_pooled(buffers_hidden, batch, pooling), want_pool, rtol=1e-5, atol=1e-5)


# -- the train step: every objective, packed against padded ------------------------------------
#
# One jitted step per objective family and layout: the row-separable objectives (a `SplitLoss`,
# so gradient pieces apply) share one forward, InfoSeed's two poolings another. Each setting's
# loss and metrics are reported under its own name; the step's loss (and so its gradient) is a
# combination with distinct coefficients, so a wrong gradient in any one setting shows.

P, G, TP, TC = 16, 4, 5, 10
MICRO = 2  # 8 groups per micro-batch: the mesh's 4 batch devices x 2 gradient pieces

SEPARABLE = {
    "maxent": ("maxent", ObjectiveSettings()),  # sequence_sum importance, sequence_k3
    "maxent_clip_sequence": ("maxent", ObjectiveSettings(clip_objective_coef=2.0, importance_sampling_level="sequence")),
    "maxent_no_clip_k3": ("maxent", ObjectiveSettings(use_clip_objective=False, kl_estimator="k3")),
    "maxent_k3_corrected": ("maxent", ObjectiveSettings(kl_estimator="k3", kl_bias_correction=True)),
    "grpo_reference_k1": ("grpo", ObjectiveSettings(loss_type="reference", kl_estimator="k1")),
    "grpo_sequence_sum": ("grpo", ObjectiveSettings(loss_type="grpo")),
    "grpo_token_k2": ("grpo", ObjectiveSettings(loss_type="grpo", importance_sampling_level="token",
                                                kl_estimator="k2", sampler_correction="token_mask")),
    "bnpo_sequence": ("grpo", ObjectiveSettings(loss_type="bnpo", importance_sampling_level="sequence",
                                                sampler_correction="sequence_truncate")),
    "dr_grpo_token": ("grpo", ObjectiveSettings(loss_type="dr_grpo", importance_sampling_level="token")),
    "dr_grpo_sequence": ("grpo", ObjectiveSettings(loss_type="dr_grpo", importance_sampling_level="sequence")),
    "dapo_token": ("grpo", ObjectiveSettings(loss_type="dapo", importance_sampling_level="token", epsilon_high=0.28)),
    "dapo_sequence": ("grpo", ObjectiveSettings(loss_type="dapo", importance_sampling_level="sequence")),
}
SEEDED = InfoSeedSettings(num_seeds=2, lambda_=0.1, alpha_entropy=0.5)
INFOSEED = {
    "infoseed_grpo_mean": ("grpo", ObjectiveSettings(loss_type="grpo", importance_sampling_level="token",
                                                     info_seed=SEEDED), "mean"),
    "infoseed_maxent_last": ("maxent", ObjectiveSettings(info_seed=SEEDED), "last"),
}


def _combined(parts: dict[str, tuple]):
    """(loss, metrics) of several settings at once: loss = sum of c_i * loss_i (c_i distinct), metrics
    `name/key` per setting (its loss included)."""
    coefficients = {name: 1.0 / (i + 1.5) for i, name in enumerate(parts)}

    def combine(results: dict[str, tuple]) -> tuple:
        loss = sum(coefficients[n] * lo for n, (lo, _) in results.items())
        return loss, {f"{n}/{k}": v for n, (lo, m) in results.items() for k, v in {**m, "loss": lo}.items()}

    return combine


def separable_family():
    losses = {n: rl_loss(get_objective(o), s, 0, score_prompt_once=True) for n, (o, s) in SEPARABLE.items()}
    combine = _combined(losses)
    return SplitLoss(score=next(iter(losses.values())).score,
                     objective=lambda scores, batch: combine({n: f.objective(scores, batch) for n, f in losses.items()}))


def infoseed_family():
    losses = {n: rl_loss(get_objective(o), s, 0, pooling, score_prompt_once=True)
              for n, (o, s, pooling) in INFOSEED.items()}
    combine = _combined(losses)
    return lambda model, batch: combine({n: f(model, batch) for n, f in losses.items()})


FAMILIES = {"separable": (separable_family, 2), "infoseed": (infoseed_family, 1)}  # (loss, gradient pieces on the mesh)


def _step_arrays(rng: np.random.Generator, prompt_lengths: list[int], completion_lengths: list[int]) -> dict:
    """One step's grouped arrays `[P, G, ...]`: score rows with these lengths, the objectives' arrays."""
    grouped = _grouped(rng, P, G, TP, TC, lengths=(prompt_lengths, completion_lengths))
    mask = grouped["completion_mask"].astype(bool)
    valid = np.ones((P, G), bool)
    valid[1, 3] = False
    u = rng.integers(0, 2, (P, G)).astype(np.float32)
    ref = np.where(mask, -rng.random(mask.shape) * 4, 0.0).astype(np.float32)
    weights, _ = prepare_maxent_batch(jnp.asarray(u), jnp.asarray(valid), jnp.asarray(ref.sum(-1)),
                                      jnp.asarray(mask.sum(-1)), 0.1, 0.04, q_temperature=1.0, q_epsilon=1e-6)
    advantages, _ = prepare_grpo_batch(jnp.asarray(u), jnp.asarray(valid), "group")
    seed_ids = np.tile(np.array([-1, -1, 0, 1]), (P, 1))
    behaviour = np.where(mask, ref + rng.normal(0, 0.2, mask.shape), 0.0).astype(np.float32)
    return {**grouped, "token_mask": mask, "valid": valid, "ref_logp": ref, "behaviour_logp": behaviour,
            "weights": np.asarray(weights), "advantages": np.asarray(advantages), "seed_ids": seed_ids,
            "is_seed_aug": seed_ids >= 0}


@pytest.fixture(scope="module")
def model_parts():
    graphdef, params, rest = nnx.split(_model("blocked"), nnx.Param, ...)
    return graphdef, jax.tree.map(np.asarray, params), rest


_STEPS: dict = {}  # (family, layout) -> jitted step, kept across hypothesis examples (shapes repeat)


def _run(model_parts, family: str, layout: str, mesh, arrays: dict[str, np.ndarray], chunks: int) -> tuple[list, dict]:
    graphdef, params, rest = model_parts
    state = init_train_state(params, record_gradients(), mesh)
    if (family, layout) not in _STEPS:
        _STEPS[family, layout] = make_train_step(graphdef, rest, state, record_gradients(), FAMILIES[family][0](),
                                                 mesh, gradient_chunks=chunks)
    batch = {k: v.reshape(MICRO, -1, *v.shape[1:]) for k, v in arrays.items()}
    state, metrics = _STEPS[family, layout](state, batch, scalars={"beta": 0.04})
    return jax.tree.leaves(jax.tree.map(np.asarray, state.opt_state)), {k: float(v) for k, v in metrics.items()}


def _assert_same(got, want, where) -> None:
    for a, b in zip(got[0], want[0]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=str(where))
    assert got[1].keys() == want[1].keys()
    for key, value in want[1].items():
        assert got[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, where)


LENGTH_MIXES = st.tuples(st.lists(st.integers(1, TP), min_size=P, max_size=P),
                         st.lists(st.one_of(st.integers(0, TC // 3), st.just(TC), st.integers(0, TC)),
                                  min_size=P * G, max_size=P * G))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
# No shrinking phase: each shrunk example may be a new buffer shape, so a new compile of three steps.
@hypothesis.settings(max_examples=2, deadline=None, derandomize=True, phases=[hypothesis.Phase.generate],
                     suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                            hypothesis.HealthCheck.function_scoped_fixture])
@given(mix=LENGTH_MIXES)
def test_every_objective_packed_equals_padded(model_parts, family, mix):
    """Every objective's loss and metrics, and the family's gradient, of one step (2 micro-batches) on
    random length mixes: padded on one device against packed on one device (a buffer per group) and
    packed on the (2, 2, 2) mesh (buffers shorter than a group, so groups split, balanced over the 4
    batch devices, with gradient pieces where the loss allows them)."""
    arrays = _step_arrays(np.random.default_rng(sum(mix[1])), *mix)
    one = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    want = _run(model_parts, family, "padded", one, arrays, chunks=1)
    assert np.isfinite(want[1][f"{next(iter(SEPARABLE if family == 'separable' else INFOSEED))}/loss"])
    packed, _ = Packer(TP + G * TC, devices=1, micro=MICRO, rows_for_pooling=True)(arrays)
    _assert_same(_run(model_parts, family, "packed", one, {**arrays, **packed}, chunks=1), want, (family, "one"))
    chunks = FAMILIES[family][1]
    packed, stats = Packer(TP + 2 * TC, devices=4, chunks=chunks, micro=MICRO, rows_for_pooling=True)(arrays)
    assert stats["pack/buffers"] % (MICRO * 4 * chunks) == 0
    _assert_same(_run(model_parts, family, "mesh", make_mesh((2, 2, 2)), {**arrays, **packed}, chunks=chunks), want,
                 (family, "mesh"))


def test_packed_step_equals_the_padded_step(model_parts):
    """The fast check (default MaxEnt alone, one device, 2 micro-batches), loss, metrics and gradients;
    the slow test above covers every objective and the mesh."""
    loss = rl_loss(get_objective("maxent"), ObjectiveSettings(), 0, score_prompt_once=True)
    rng = np.random.default_rng(6)
    arrays = _step_arrays(rng, list(rng.integers(1, TP + 1, P)), list(rng.integers(0, TC + 1, P * G)))
    graphdef, params, rest = model_parts
    one = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    packed, _ = Packer(TP + G * TC, devices=1, micro=MICRO)(arrays)
    results = []
    for side in (arrays, {**arrays, **packed}):
        state = init_train_state(params, record_gradients(), one)
        step = make_train_step(graphdef, rest, state, record_gradients(), loss, one)
        state, metrics = step(state, {k: v.reshape(MICRO, -1, *v.shape[1:]) for k, v in side.items()},
                              scalars={"beta": 0.04})
        results.append((jax.tree.leaves(jax.tree.map(np.asarray, state.opt_state)),
                        {k: float(v) for k, v in metrics.items()}))
    assert any(np.any(g != 0) for g in results[0][0])
    _assert_same(results[1], results[0], "maxent")


@pytest.mark.slow
def test_packed_reference_logprobs_on_the_8_device_mesh(model_parts):
    """The packed reference log-probs (2 micro-batches, 4 batch devices) against `make_logprob_fn`'s."""
    rng = np.random.default_rng(3)
    arrays = _step_arrays(rng, list(rng.integers(1, TP + 1, P)), list(rng.integers(0, TC + 1, P * G)))
    graphdef, params, rest = model_parts
    mesh = make_mesh((2, 2, 2))
    padded_fn = make_logprob_fn(graphdef, rest, params, mesh, chunk_size=0, group=G)
    rows = {k: arrays[k].reshape(P * G, -1) for k in ("input_ids", "positions", "attention_mask", "completion_ids")}
    mask = arrays["completion_mask"]
    want_ref = np.where(mask.reshape(P * G, -1), np.asarray(padded_fn(params, rows)), 0.0)
    packed, _ = Packer(TP + 2 * TC, devices=4, micro=2)(arrays)
    packed_fn = make_packed_logprob_fn(graphdef, rest, params, mesh, chunk_size=0)
    batch = {k: v.reshape(2, -1, *v.shape[1:]) for k, v in {**packed, "completion_mask": mask}.items()}
    got = np.asarray(packed_fn(params, batch)).reshape(P * G, -1)
    np.testing.assert_allclose(got, want_ref, rtol=1e-5, atol=2e-5)


ONE_PER_DEVICE = 2 * 4  # prompts: 2 micro-batches of one per batch device of the (2, 2, 2) mesh, as the 7B recipe


@pytest.mark.slow
def test_packed_pieces_of_each_prompts_completions_equal_the_padded_step(model_parts):
    """One prompt per batch device (the 7B recipe: per_device_train_batch_size 1, gradient_chunks 4, 16
    completions), so the gradient pieces split each prompt's completions: buffers one completion long
    (prompts copied within and across pieces) on the mesh's 4 batch devices, 2 pieces. The row-separable
    family's loss, every metric (MaxEnt and the GRPO family) and gradient equal the padded step's on
    one device; and the packed reference log-probs in those pieces equal the padded ones."""
    rng = np.random.default_rng(7)
    arrays = _step_arrays(rng, list(rng.integers(1, TP + 1, P)), list(rng.integers(0, TC + 1, P * G)))
    arrays = {k: v[:ONE_PER_DEVICE] for k, v in arrays.items()}
    mesh = make_mesh((2, 2, 2))
    packed, stats = Packer(TP + TC, devices=4, chunks=2, micro=MICRO)(arrays)
    want = _run(model_parts, "separable", "padded", make_mesh((1, 1, 1), devices=jax.devices()[:1]), arrays, chunks=1)
    got = _run(model_parts, "separable", "pieces", mesh, {**arrays, **packed}, chunks=2)
    assert any(np.any(g != 0) for g in want[0])
    _assert_same(got, want, "pieces of each prompt's completions")

    graphdef, params, rest = model_parts
    rows = {k: arrays[k].reshape(ONE_PER_DEVICE * G, -1)
            for k in ("input_ids", "positions", "attention_mask", "completion_ids")}
    mask = arrays["completion_mask"]
    want_ref = np.asarray(make_logprob_fn(graphdef, rest, params, mesh, chunk_size=0, group=G)(params, rows))
    packed_fn = make_packed_logprob_fn(graphdef, rest, params, mesh, chunk_size=0, chunks=2)
    batch = {k: v.reshape(MICRO, -1, *v.shape[1:]) for k, v in {**packed, "completion_mask": mask}.items()}
    got_ref = np.asarray(packed_fn(params, batch)).reshape(ONE_PER_DEVICE * G, -1)
    np.testing.assert_allclose(got_ref, np.where(mask.reshape(ONE_PER_DEVICE * G, -1), want_ref, 0.0),
                               rtol=1e-5, atol=2e-5)


def test_config_names_a_pack_length_shorter_than_a_row():
    c = get_base_config()
    c.data.dataset_name = "synthetic:arithmetic"
    c.train.packing = True
    row = c.rollout.max_prompt_length + c.rollout.max_completion_length
    c.train.pack_length = row - 1
    with pytest.raises(UserError, match=rf"train.pack_length={row - 1} is invalid: 0 \(automatic\) or >= "):
        validate(c)
    c.train.pack_length = row
    validate(c)


def test_config_accepts_packing_with_pieces_of_each_prompts_completions():
    """The 7B recipe's shape with packing: one prompt per device, its 16 completions in 4 gradient pieces.
    Pieces that divide neither the prompts nor the completions are still refused in one line."""
    c = get_base_config()
    c.data.dataset_name = "synthetic:arithmetic"
    c.train.packing = True
    c.train.per_device_train_batch_size, c.rollout.num_generations, c.train.gradient_chunks = 1, 16, 4
    validate(c)
    c.train.gradient_chunks = 3
    with pytest.raises(UserError, match=r"^config field train.gradient_chunks=3 is invalid: a divisor of "
                                        r"train.per_device_train_batch_size=1 or of the completions per prompt \(16\)$"):
        validate(c)


@pytest.mark.slow
def test_a_default_run_packed_reports_the_padded_runs_metrics(tmp_path):
    """The tiny default (MaxEnt, supervised warm-up, 8 devices), two RL steps with train.packing on (buffers
    of a fixed length, so every step packs) and off: the same metrics to float tolerance. In 2 gradient
    pieces, as the 7B recipes run (one prompt per device: each piece holds 2 of every prompt's 4
    completions and a copy of the prompt), so the whole trainer path of packed pieces runs too; whole
    groups per piece and one piece are compared on the mesh above."""
    chunks = 2
    from tests.test_train_e2e import run, tiny_config

    quiet = {"eval.do_eval": False, "checkpoint.export_final": False, "checkpoint.save_steps": 0}
    steps = {}
    for packing in (False, True):
        config = tiny_config(**quiet, **{"train.packing": packing, "train.pack_length": 48 + 16,
                                         "train.gradient_chunks": chunks})
        steps[packing] = [r for r in run(config, tmp_path / str(packing)) if "train/loss" in r]
    assert [r["train/pack/packed"] for r in steps[True]] == [1.0, 1.0]
    for padded, packed in zip(steps[False], steps[True]):
        for key, value in padded.items():
            if key.startswith("train/") and "seconds" not in key and isinstance(value, float):
                assert packed[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_bench_lengths_and_flags():
    """The benchmark's skewed mix: a few at the maximum, mean about a quarter of it; equal: all at it.
    `--lengths` belongs to the update and train-step targets."""
    from maxent_jax.bench.__main__ import parse_args
    from maxent_jax.bench.packing import completion_lengths

    skewed = completion_lengths("skewed", 16, 64)
    assert (skewed == 64).sum() == 1 and skewed.min() >= 1 and 0.15 < skewed.mean() / 64 < 0.35
    many = completion_lengths("skewed", 1024, 1024)
    assert (many == 1024).sum() == 64 and 0.15 < many.mean() / 1024 < 0.3
    assert list(completion_lengths("equal", 4, 8)) == [8, 8, 8, 8]
    assert parse_args(["update", "--lengths", "skewed"]).lengths == "skewed"
    assert parse_args(["train-step", "--lengths", "equal"]).lengths == "equal"
    with pytest.raises(UserError, match="--lengths skewed is for the update and train-step targets only"):
        parse_args(["sampler", "--lengths", "skewed"])
    with pytest.raises(UserError, match="--vs trl and --lengths skewed are separate measurements"):
        parse_args(["train-step", "--lengths", "skewed", "--vs", "trl"])
    with pytest.raises(UserError, match="--pack-length 64 is invalid"):
        parse_args(["update", "--pack-length", "64"])


def test_several_host_processes_score_padded_with_a_warning(monkeypatch, caplog):
    """The recipes turn packing on; launched on several nodes (one trainer process each) they train
    padded, said once, instead of refusing to start."""
    config = get_base_config()
    config.train.packing = True
    monkeypatch.setattr(packing.jax, "process_count", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="maxent_jax.packing"):
        assert packing.packer_for(config, CFG, batch_devices=8, pad_id=0) is None
    assert "this run has 2; every step is scored padded" in caplog.text
    monkeypatch.setattr(packing.jax, "process_count", lambda: 1)
    assert isinstance(packing.packer_for(config, CFG, batch_devices=8, pad_id=0), Packer)
