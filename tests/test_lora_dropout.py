"""LoRA adapter dropout (`lora.dropout`, `model/adapter_dropout.py`): PEFT's dropout on the adapters'
input, only in the live policy's forward of the RL loss, with masks fixed by (seed, state step,
micro-batch, gradient-chunk piece), so a resumed step draws what the uninterrupted one drew."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxent_jax.config import get_base_config
from maxent_jax.config_check import validate
from maxent_jax.errors import UserError
from maxent_jax.model import Decoder, ModelConfig, adapter_dropout
from maxent_jax.model.lora import LoRAParam, LoRASettings, apply_lora, resolve_targets
from maxent_jax.objectives import ObjectiveSettings, get_objective
from maxent_jax.parallel.forward import SCORE_KEYS, make_logprob_fn
from maxent_jax.parallel.mesh import make_mesh
from maxent_jax.parallel.train_step import init_train_state, make_train_step
from maxent_jax.policy import rl_loss
from tests.test_gradient_chunks import _step_batch
from tests.test_parallel_step import record_gradients

CFG = ModelConfig.tiny(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=8)
MESH = make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _lora_model() -> Decoder:
    """Adapters on every projection with non-zero B, so they change the outputs and have gradients."""
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    apply_lora(model, LoRASettings(4, 8.0, resolve_targets("all-linear")), seed=0)
    key = jax.random.key(1)
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, LoRAParam):
            var.set_value(0.3 * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype))
    return model


@pytest.fixture(scope="module")
def parts():
    graphdef, adapters, rest = nnx.split(_lora_model(), LoRAParam, ...)
    return graphdef, jax.tree.map(np.asarray, adapters), rest


@pytest.fixture(scope="module")
def micro_batch():
    return _step_batch(2)  # [1, 2 prompts, G=4, ...]


def _loss(rate: float):
    return rl_loss(get_objective("maxent"), ObjectiveSettings(), 0, lora_dropout=rate)


_STEPS: dict = {}  # (rate, seed, chunks) -> train step: each is compiled once for the whole file


def _step(parts, rate: float, seed: int | None, chunks: int = 1):
    if (rate, seed, chunks) not in _STEPS:
        graphdef, adapters, rest = parts
        state = init_train_state(adapters, record_gradients(), MESH)
        _STEPS[rate, seed, chunks] = make_train_step(graphdef, rest, state, record_gradients(), _loss(rate), MESH,
                                                     gradient_chunks=chunks, rng_seed=seed)
    return _STEPS[rate, seed, chunks]


def _grads(parts, batch, rate: float, seed: int | None, steps: int = 1, chunks: int = 1) -> list:
    """The adapter gradients of `steps` consecutive train steps (the recording optimizer leaves the
    adapters as they are, so the steps differ only in `state.step`)."""
    step = _step(parts, rate, seed, chunks)
    state = init_train_state(parts[1], record_gradients(), MESH)
    out = []
    for _ in range(steps):
        state, metrics = step(state, batch, scalars={"beta": 0.04})
        assert not bool(metrics["skipped"])
        out.append(jax.tree.leaves(jax.tree.map(np.asarray, state.opt_state)))
    return out


def _equal(a: list, b: list) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_rate_zero_is_bit_identical_to_no_dropout(parts, micro_batch):
    """Dropout 0 (with or without a step key) computes exactly the step without dropout."""
    without = _grads(parts, micro_batch, 0.0, None)[0]
    assert _equal(without, _grads(parts, micro_batch, 0.0, 3)[0])
    assert any(np.any(g != 0) for g in without)


def test_dropout_changes_the_gradient_reproducibly_and_per_step(parts, micro_batch):
    plain = _grads(parts, micro_batch, 0.0, None)[0]
    first, second = _grads(parts, micro_batch, 0.3, 3, steps=2)
    assert all(np.all(np.isfinite(g)) for g in first)
    assert not _equal(first, plain)  # the adapters' inputs were dropped
    assert _equal(first, _grads(parts, micro_batch, 0.3, 3)[0])  # same (seed, step): same masks
    assert not _equal(first, second)  # the next step draws new masks (same adapters, same batch)


@pytest.mark.slow  # two more compiles (~20 s on a shared 2-core CPU)
def test_each_micro_batch_and_gradient_chunk_draws_its_own_masks(parts, micro_batch):
    first = _grads(parts, micro_batch, 0.3, 3)[0]
    # Two copies of the micro-batch: the mean of two gradients that equal `first` only if both copies
    # drew the first micro-batch's masks.
    twice = {k: np.concatenate([v, v]) for k, v in micro_batch.items()}
    doubled = _grads(parts, twice, 0.3, 3)[0]
    assert not all(np.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(doubled, first, strict=True))
    # Gradient chunks: every piece draws its own masks, reproducibly.
    chunked = _grads(parts, micro_batch, 0.3, 3, chunks=2)[0]
    assert _equal(chunked, _grads(parts, micro_batch, 0.3, 3, chunks=2)[0])


def test_a_step_from_a_restored_state_draws_what_the_uninterrupted_step_drew(parts, micro_batch):
    """The key is a function of the train state's step: restarting from a copy of the state after
    step 1 (what a checkpoint restore gives) reproduces step 2 exactly."""
    step = _step(parts, 0.3, 3)
    state, _ = step(init_train_state(parts[1], record_gradients(), MESH), micro_batch, scalars={"beta": 0.04})
    saved = jax.tree.map(np.asarray, state)
    state, straight = step(state, micro_batch, scalars={"beta": 0.04})
    resumed_state, resumed = step(jax.device_put(saved), micro_batch, scalars={"beta": 0.04})
    assert float(straight["loss"]) == float(resumed["loss"])
    assert _equal(jax.tree.leaves(jax.tree.map(np.asarray, state)), jax.tree.leaves(jax.tree.map(np.asarray, resumed_state)))


def test_dropout_touches_the_adapter_path_only_and_only_inside_its_context():
    model = _lora_model()
    rows = {k: jnp.asarray(v.reshape(-1, v.shape[-1])) for k, v in _step_batch(2).items() if k in SCORE_KEYS}
    tokens = (rows["input_ids"], rows["positions"], rows["attention_mask"])
    plain = np.asarray(model(*tokens)[0])
    with adapter_dropout.active(0.5, jax.random.PRNGKey(0)):
        dropped = np.asarray(model(*tokens)[0])
    assert not np.allclose(plain, dropped)
    np.testing.assert_array_equal(np.asarray(model(*tokens)[0]), plain)  # the context is gone again
    # With B = 0 the adapters add nothing, dropped or not: the base product always sees the whole input.
    for path, var in nnx.iter_graph(model):
        if isinstance(var, LoRAParam) and path[-1] == "lora_b":
            var.set_value(jnp.zeros_like(var.get_value()))
    base = np.asarray(model(*tokens)[0])
    with adapter_dropout.active(0.5, jax.random.PRNGKey(0)):
        np.testing.assert_array_equal(np.asarray(model(*tokens)[0]), base)


def test_dropped_keeps_the_expectation_and_zeroes_about_rate():
    x = jnp.ones((200, 100), jnp.float32)
    with adapter_dropout.active(0.25, jax.random.PRNGKey(0)):
        out = np.asarray(adapter_dropout.dropped(x, 0))
    assert set(np.unique(out).tolist()) == {0.0, float(np.float32(1.0 / 0.75))}
    assert abs(np.mean(out == 0) - 0.25) < 0.02 and abs(out.mean() - 1.0) < 0.03
    np.testing.assert_array_equal(np.asarray(adapter_dropout.dropped(x, 0)), np.asarray(x))
    with pytest.raises(ValueError, match="rng_seed"), adapter_dropout.active(0.1, None):
        pass


def test_scoring_is_unaffected_by_the_dropout_of_the_update(parts, micro_batch):
    """The behaviour/reference scorer never drops, before or after a dropout step was traced and run."""
    graphdef, adapters, rest = parts
    rows = {k: jnp.asarray(v.reshape(-1, v.shape[-1])) for k, v in micro_batch.items() if k in SCORE_KEYS}
    score = make_logprob_fn(graphdef, rest, adapters, MESH, chunk_size=0)
    before = np.asarray(score(adapters, rows))
    _grads(parts, micro_batch, 0.3, 3)
    fresh = make_logprob_fn(graphdef, rest, adapters, MESH, chunk_size=0)
    np.testing.assert_array_equal(np.asarray(fresh(adapters, rows)), before)
    np.testing.assert_array_equal(np.asarray(score(adapters, rows)), before)


@pytest.mark.parametrize("value, ok", [(0.0, True), (0.05, True), (0.9, True), (1.0, False), (-0.1, False),
                                       (True, False), (float("nan"), False)])
def test_config_accepts_a_dropout_in_zero_one(value, ok):
    config = get_base_config()
    config.lora.enabled = True
    config.lora.dropout = value
    if ok:
        validate(config)
        return
    with pytest.raises(UserError, match=r"lora\.dropout.*\[0, 1\)") as err:
        validate(config)
    assert "\n" not in str(err.value)


def test_a_recipe_lora_dropout_maps_onto_the_lora_section():
    from maxent_jax import recipes

    recipe = recipes.translate({"use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05})
    config = recipes.apply(get_base_config(), recipe)
    validate(config)
    assert config.lora.dropout == 0.05
