"""`train.gradient_chunks`: a micro-batch's gradient taken in pieces of rows equals the whole one.

Two layers of the claim: every objective without the InfoSeed term is row-separable (the
gradient of one row's log-probs does not depend on other rows' log-probs, what `SplitLoss`
requires), and the chunked train step reproduces the unchunked step's gradients, loss and
metrics on one device and on the 8-device mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxent_jax.config import get_base_config
from maxent_jax.config_check import validate
from maxent_jax.errors import UserError
from maxent_jax.model import Decoder, ModelConfig
from maxent_jax.objectives import ObjectiveSettings, get_objective
from maxent_jax.objectives.grpo import prepare_grpo_batch
from maxent_jax.objectives.maxent import prepare_maxent_batch
from maxent_jax.parallel.mesh import make_mesh
from maxent_jax.parallel.train_step import SplitLoss, init_train_state, make_train_step
from maxent_jax.policy import rl_loss, sft_loss
from maxent_jax.scoring import build_score_batch
from tests.test_parallel_step import record_gradients

P, G, T = 8, 4, 6

SETTINGS = [
    ("maxent", ObjectiveSettings()),
    ("maxent", ObjectiveSettings(clip_objective_coef=2.0, importance_sampling_level="sequence",
                                 sampler_correction="sequence_truncate", kl_estimator="k3")),
    ("grpo", ObjectiveSettings(loss_type="reference", negative_adv_rule="reference_max")),
    ("grpo", ObjectiveSettings(loss_type="grpo", importance_sampling_level="token", sampler_correction="token_mask")),
    ("grpo", ObjectiveSettings(loss_type="bnpo", importance_sampling_level="token")),
    ("grpo", ObjectiveSettings(loss_type="dr_grpo", importance_sampling_level="token")),
    ("grpo", ObjectiveSettings(loss_type="dapo", importance_sampling_level="token", epsilon_high=0.28)),
]


def _objective_batch(rng: np.random.Generator) -> tuple[dict, jax.Array]:
    """An RL batch with uneven lengths, an empty completion, a single-member and an empty group."""
    lengths = rng.integers(0, T + 1, (P, G))
    lengths[1, 2] = 0
    token_mask = np.arange(T)[None, None, :] < lengths[..., None]
    valid = np.ones((P, G), bool)
    valid[2, 1:] = False
    valid[3, :] = False
    logp = np.where(token_mask, -rng.random((P, G, T)) * 3, 0.0).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (P, G, T))).astype(np.float32)
    u = rng.integers(0, 2, (P, G)).astype(np.float32)
    ref_sum = np.where(token_mask, ref, 0.0).sum(-1)
    weights, _ = prepare_maxent_batch(jnp.asarray(u), jnp.asarray(valid), jnp.asarray(ref_sum),
                                      jnp.asarray(lengths), 0.1, 0.04, q_temperature=1.0, q_epsilon=1e-6)
    advantages, _ = prepare_grpo_batch(jnp.asarray(u), jnp.asarray(valid), "group")
    batch = {"token_mask": token_mask, "valid": valid, "ref_logp": ref, "weights": weights, "advantages": advantages,
             "behaviour_logp": (logp + rng.normal(0, 0.2, (P, G, T))).astype(np.float32), "beta": np.float32(0.04)}
    return {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(logp)


@pytest.mark.parametrize("case", range(len(SETTINGS)))
@pytest.mark.parametrize("chunks", [2, 4])
def test_objectives_are_row_separable(case, chunks):
    """The gradient of each row's log-probs with every other row held at 0 is its part of the full gradient."""
    name, settings = SETTINGS[case]
    batch, logp = _objective_batch(np.random.default_rng(case))
    loss = jax.jit(lambda x: get_objective(name)(x, batch, {"beta": batch["beta"]}, settings)[0])
    full = np.asarray(jax.grad(loss)(logp))
    assert np.all(np.isfinite(full)) and np.any(full != 0)
    rows = np.arange(P)
    for c in range(chunks):
        piece = rows % chunks == c
        held = jnp.where(jnp.asarray(piece)[:, None, None], logp, 0.0)
        part = np.asarray(jax.grad(loss)(held))
        np.testing.assert_allclose(part[piece], full[piece], rtol=1e-6, atol=1e-7)


CFG = ModelConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8)
PROMPT, COMPLETION = 5, 6


def _step_batch(prompts: int) -> dict[str, np.ndarray]:
    """One micro-batch `[1, prompts, G, ...]` of real score rows plus the objective's arrays."""
    rng = np.random.default_rng(7)
    prompt_ids = [list(rng.integers(1, 64, rng.integers(2, PROMPT + 1))) for _ in range(prompts)]
    completions = [list(rng.integers(1, 64, rng.integers(1, COMPLETION + 1))) for _ in range(prompts * G)]
    rows = build_score_batch([p for p in prompt_ids for _ in range(G)], completions, prompt_len=PROMPT,
                             completion_len=COMPLETION, pad_id=0)
    grouped = {k: v.reshape(prompts, G, *v.shape[1:]) for k, v in rows.items()}
    mask = grouped["completion_mask"].astype(bool)
    valid = np.ones((prompts, G), bool)
    valid[1, 3] = False
    u = rng.integers(0, 2, (prompts, G)).astype(np.float32)
    ref = np.where(mask, -rng.random(mask.shape) * 4, 0.0).astype(np.float32)
    weights, _ = prepare_maxent_batch(jnp.asarray(u), jnp.asarray(valid), jnp.asarray(ref.sum(-1)),
                                      jnp.asarray(mask.sum(-1)), 0.1, 0.04, q_temperature=1.0, q_epsilon=1e-6)
    advantages, _ = prepare_grpo_batch(jnp.asarray(u), jnp.asarray(valid), "group")
    arrays = {**grouped, "token_mask": mask, "valid": valid, "ref_logp": ref,
              "weights": np.asarray(weights), "advantages": np.asarray(advantages)}
    return {k: np.asarray(v)[None] for k, v in arrays.items()}


@pytest.fixture(scope="module")
def model_parts():
    graphdef, params, rest = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return graphdef, jax.tree.map(np.asarray, params), rest


def _gradients(model_parts, loss, mesh, chunks: int, batch) -> tuple[dict, dict]:
    graphdef, params, rest = model_parts
    state = init_train_state(params, record_gradients(), mesh)
    step = make_train_step(graphdef, rest, state, record_gradients(), loss, mesh, gradient_chunks=chunks)
    state, metrics = step(state, batch, scalars={"beta": 0.04})
    return jax.tree.map(np.asarray, state.opt_state), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("name,prompt_once", [("maxent", True), ("grpo", False), ("sft", False)])
def test_chunked_step_equals_the_whole_micro_batch(model_parts, name, prompt_once):
    """Gradients, loss and metrics in 2 pieces; for MaxEnt also in 4, on the 8-device (2, 2, 2) mesh,
    and in each of two accumulated micro-batches (against those micro-batches unsplit)."""
    settings = ObjectiveSettings(clip_objective_coef=1.0, importance_sampling_level="sequence")
    loss = (sft_loss(chunk_size=0) if name == "sft"
            else rl_loss(get_objective(name), settings, chunk_size=0, score_prompt_once=prompt_once))
    assert isinstance(loss, SplitLoss)
    one = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    batch = _step_batch(8)
    two_micro = {k: v.reshape(2, 4, *v.shape[2:]) for k, v in batch.items()}
    cases = [(batch, [(one, 2)])]
    if name == "maxent":  # each compile costs seconds: the layouts once, on the default objective
        # 2 and 4 split each prompt's 4 completions; 8 does not divide them and splits whole groups;
        # (1, 8, 1) holds one prompt per device, split in its completions (the 7B recipe's layout).
        cases = [(batch, [(one, 2), (one, 4), (one, 8), (make_mesh((2, 2, 2)), 2), (make_mesh((1, 8, 1)), 4)]),
                 (two_micro, [(one, 2)])]
    for whole, runs in cases:
        grads, metrics = _gradients(model_parts, loss, one, 1, whole)
        assert any(np.any(g != 0) for g in jax.tree.leaves(grads))
        for mesh, chunks in runs:
            _assert_same(_gradients(model_parts, loss, mesh, chunks, whole), (grads, metrics), (mesh.shape, chunks))


def _assert_same(chunked, whole, where) -> None:
    (chunked_grads, chunked_metrics), (grads, metrics) = chunked, whole
    for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-7, err_msg=str(where))
    assert chunked_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert chunked_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, where)


def test_a_loss_that_is_not_split_or_rows_that_do_not_divide_are_refused(model_parts):
    graphdef, params, rest = model_parts
    one = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state = init_train_state(params, record_gradients(), one)

    def plain(model, batch):
        return jnp.zeros(()), {}

    with pytest.raises(ValueError, match="SplitLoss"):
        make_train_step(graphdef, rest, state, record_gradients(), plain, one, gradient_chunks=2)
    loss = rl_loss(get_objective("maxent"), ObjectiveSettings(), chunk_size=0)
    step = make_train_step(graphdef, rest, state, record_gradients(), loss, one, gradient_chunks=3)
    with pytest.raises(UserError, match="gradient_chunks"):
        step(state, _step_batch(8), scalars={"beta": 0.04})


def test_config_names_the_field_when_chunks_do_not_fit():
    c = get_base_config()
    c.data.dataset_name = "synthetic:arithmetic"
    c.train.per_device_train_batch_size = 4
    c.train.gradient_chunks = 3
    with pytest.raises(UserError, match=r"train.gradient_chunks=3 is invalid: a divisor of train.per_device_train_batch_size=4"):
        validate(c)
    c.train.gradient_chunks = 2
    validate(c)
    c.train.per_device_train_batch_size, c.rollout.num_generations, c.train.gradient_chunks = 1, 16, 4
    validate(c)  # each prompt's 16 completions in 4 pieces
    c.train.per_device_train_batch_size, c.train.gradient_chunks = 4, 2
    c.info_seed.enabled, c.info_seed.num_seeds, c.info_seed.lambda_ = True, 2, 0.1
    with pytest.raises(UserError, match=r"train.gradient_chunks=2 is invalid: 1 while the InfoSeed loss is on"):
        validate(c)


@pytest.mark.slow
def test_one_prompt_per_device_trains_in_pieces_of_its_completions(tmp_path):
    """The 7B recipes' layout through the trainer: one prompt per device on 8 devices, its 4 completions
    in 2 pieces (the supervised warm-up's rows, one per group, in pieces of whole rows); ~40 s."""
    from tests.test_train_e2e import _finite_train_metrics, run, tiny_config

    config = tiny_config(**{"train.gradient_chunks": 2})
    assert config.train.per_device_train_batch_size == 1 and config.rollout.num_generations == 4
    assert config.train.sft_warmup_steps > 0
    _finite_train_metrics(run(config, tmp_path))
