"""MaxEnt weighting (spec 6.2-6.4) and the MaxEnt loss (7.1): hand-checked values and properties."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maxent_jax.objectives import ObjectiveSettings, get_objective
from maxent_jax.objectives import maxent

# jitted once per shape: far cheaper than compiling every primitive eagerly
listwise_target = jax.jit(maxent.listwise_target)
maxent_weights = jax.jit(maxent.maxent_weights, static_argnums=6)
weight_entropy_stats = jax.jit(maxent.weight_entropy_stats)
q_entropy_stats = jax.jit(maxent.q_entropy_stats)
prepare_maxent_batch = jax.jit(maxent.prepare_maxent_batch, static_argnames=("length_normalize_ref",))

TOL = dict(rtol=1e-5, atol=1e-6)


def test_listwise_target_hand_values():
    u = jnp.array([[1.0, 0.0], [2.0, 2.0]])
    valid = jnp.ones((2, 2), bool)
    q = listwise_target(u, valid, 1.0, 1e-6)
    p0 = math.e / (math.e + 1)
    # p (1 - K eps) + eps with K = 2, the sum is already 1
    np.testing.assert_allclose(q[0], [p0 * (1 - 2e-6) + 1e-6, (1 - p0) * (1 - 2e-6) + 1e-6], **TOL)
    np.testing.assert_allclose(q[1], [0.5, 0.5], **TOL)  # zero-variance group -> 1/K


def test_listwise_target_temperature_and_epsilon_floor():
    u = jnp.array([[1.0, 0.0, 0.0]])
    valid = jnp.ones((1, 3), bool)
    q = listwise_target(u, valid, 0.5, 0.01)
    e2 = math.exp(2.0)
    p = np.array([e2, 1, 1]) / (e2 + 2)
    np.testing.assert_allclose(q[0], p * (1 - 0.03) + 0.01, **TOL)
    # a vanishing temperature is clamped at 1e-8: still a finite, normalised one-hot-ish q
    q = listwise_target(u, valid, 0.0, 1e-6)
    np.testing.assert_allclose(q[0], [1 - 2e-6, 1e-6, 1e-6], **TOL)


def test_listwise_target_ignores_invalid_members():
    u = jnp.array([[1.0, 0.0, 100.0]])
    valid = jnp.array([[True, True, False]])
    q = listwise_target(u, valid, 1.0, 1e-6)
    ref = listwise_target(u[:, :2], valid[:, :2], 1.0, 1e-6)
    np.testing.assert_allclose(q[0, :2], ref[0], **TOL)
    assert q[0, 2] == 0.0
    assert float(jnp.sum(listwise_target(u, jnp.zeros((1, 3), bool), 1.0, 1e-6))) == 0.0


def test_weights_hand_values_length_normalised():
    q = jnp.array([[0.75, 0.25]])
    valid = jnp.ones((1, 2), bool)
    lengths = jnp.array([[2.0, 4.0]])
    ref_sum = jnp.array([[-2.0, -8.0]])  # per-token means -1 and -2
    w = maxent_weights(q, ref_sum, valid, 0.5, 0.5, lengths, True)
    # d = 1: logits = log q + 0.5 * r -> ratio 3 * e^{0.5}
    a = 3 * math.exp(0.5)
    np.testing.assert_allclose(w[0], [a / (a + 1), 1 / (a + 1)], **TOL)
    # beta = 0: w proportional to q^(1/tau)
    w = maxent_weights(q, ref_sum, valid, 0.5, 0.0, lengths, True)
    np.testing.assert_allclose(w[0], [0.9, 0.1], **TOL)


def test_weights_hand_values_raw_with_length_reweighting():
    q = jnp.array([[0.75, 0.25]])
    valid = jnp.ones((1, 2), bool)
    lengths = jnp.array([[1.0, 3.0]])
    ref_sum = jnp.array([[-1.0, -2.0]])  # raw sums enter the softmax
    w = maxent_weights(q, ref_sum, valid, 0.5, 0.5, lengths, False)
    a = 3 * math.exp(0.5)
    w_tilde = np.array([a / (a + 1), 1 / (a + 1)])
    expected = w_tilde * np.array([1.0, 3.0]) / np.sum(w_tilde * np.array([1.0, 3.0]))
    np.testing.assert_allclose(w[0], expected, **TOL)


def test_weights_tau_beta_zero_is_argmax_with_ties_split():
    q = jnp.array([[0.4, 0.4, 0.2], [0.1, 0.7, 0.2]])
    valid = jnp.ones((2, 3), bool)
    w = maxent_weights(q, jnp.zeros((2, 3)), valid, 0.0, 0.0, jnp.ones((2, 3)), True)
    np.testing.assert_allclose(w, [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], **TOL)


def test_weights_fall_back_to_uniform_when_reference_is_minus_inf():
    q = jnp.array([[0.5, 0.5], [0.9, 0.1]])
    valid = jnp.ones((2, 2), bool)
    ref = jnp.array([[-jnp.inf, -jnp.inf], [-jnp.inf, -1.0]])
    w = maxent_weights(q, ref, valid, 0.1, 0.1, jnp.ones((2, 2)), True)
    np.testing.assert_allclose(w, [[0.5, 0.5], [0.0, 1.0]], **TOL)
    # beta = 0: the reference term vanishes even where it is -inf (w proportional to q^(1/tau))
    w = maxent_weights(q, ref, valid, 0.5, 0.0, jnp.ones((2, 2)), True)
    np.testing.assert_allclose(w[1], [0.81 / 0.82, 0.01 / 0.82], **TOL)


def test_entropy_stats_hand_values():
    w = jnp.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    valid = jnp.array([[True, True, False], [True, True, True], [False, False, False]])
    stats = weight_entropy_stats(w, valid)
    np.testing.assert_allclose(stats["weight_entropy"], math.log(2) / 2, **TOL)
    np.testing.assert_allclose(stats["weight_entropy_min"], 0.0, atol=1e-6)
    np.testing.assert_allclose(stats["weight_entropy_max"], math.log(2), **TOL)
    # samples w - 1/K: [0, 0] and [2/3, -1/3, -1/3]
    samples = np.array([0, 0, 2 / 3, -1 / 3, -1 / 3])
    np.testing.assert_allclose(stats["advantage_entropy_mean"], samples.mean(), atol=1e-6)
    np.testing.assert_allclose(stats["advantage_entropy_std"], samples.std(), **TOL)
    qs = q_entropy_stats(jnp.array([[0.5, 0.5], [0.25, 0.75]]), jnp.ones((2, 2), bool))
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(qs["q_entropy_mean"], (math.log(2) + h2) / 2, **TOL)
    np.testing.assert_allclose(qs["q_entropy_std"], (math.log(2) - h2) / 2, **TOL)


def test_prepare_maxent_batch_denominator():
    u, valid = jnp.array([[1.0, 0.0]]), jnp.ones((1, 2), bool)
    _, stats = prepare_maxent_batch(u, valid, jnp.zeros((1, 2)), jnp.ones((1, 2)), 0.0, 0.0, q_temperature=1.0, q_epsilon=1e-6)
    assert float(stats["weight_norm_denom"]) == 1.0
    _, stats = prepare_maxent_batch(u, valid, jnp.zeros((1, 2)), jnp.ones((1, 2)), 0.1, 0.04, q_temperature=1.0, q_epsilon=1e-6)
    np.testing.assert_allclose(stats["weight_norm_denom"], 0.14, **TOL)


# ---- the loss (spec 7.1) ------------------------------------------------------------------


def _one_group_batch(weights, behaviour=None):
    """Two members: tokens [-1, -1] (n=2) and [-1, -1, -1] (n=3) in a T=4 layout."""
    logp = jnp.array([[[-1.0, -1.0, -jnp.inf, -jnp.inf], [-1.0, -1.0, -1.0, -jnp.inf]]])
    mask = jnp.array([[[1, 1, 0, 0], [1, 1, 1, 0]]], bool)
    batch = {
        "token_mask": mask,
        "valid": jnp.ones((1, 2), bool),
        "ref_logp": logp,
        "weights": jnp.array([weights]),
    }
    if behaviour is not None:
        batch["behaviour_logp"] = behaviour
    return logp, batch


@functools.partial(jax.jit, static_argnames="settings_")
def _loss_and_grad(logp, batch, settings_, beta=0.0):
    fn = functools.partial(get_objective("maxent"), settings=settings_)
    (loss, metrics), grad = jax.value_and_grad(lambda x: fn(x, batch, {"beta": beta}), has_aux=True)(logp)
    return loss, metrics, grad


def test_maxent_policy_loss_and_gradient_without_clip():
    logp, batch = _one_group_batch([0.75, 0.25])
    loss, metrics, grad = _loss_and_grad(logp, batch, ObjectiveSettings(use_clip_objective=False))
    # L = -(0.75 * (-2)/2 + 0.25 * (-3)/3) = 1
    np.testing.assert_allclose(loss, 1.0, **TOL)
    np.testing.assert_allclose(metrics["loss/policy"], 1.0, **TOL)
    # dL/d logp_t = -w_i / n_i on scored tokens, 0 on padding
    np.testing.assert_allclose(grad[0, 0], [-0.375, -0.375, 0, 0], **TOL)
    np.testing.assert_allclose(grad[0, 1], [-1 / 12] * 3 + [0], **TOL)


def test_maxent_clip_term_on_policy_ratio_one():
    logp, batch = _one_group_batch([0.75, 0.25])
    loss, metrics, grad = _loss_and_grad(logp, batch, ObjectiveSettings())
    # A = w - 1/K = [0.25, -0.25], ratio 1: L_clip = -(0.25 - 0.25) = 0, grad -A_i per token
    np.testing.assert_allclose(metrics["loss/clip"], 0.0, atol=1e-7)
    np.testing.assert_allclose(loss, 1.0, **TOL)
    np.testing.assert_allclose(grad[0, 0, :2], [-0.375 - 0.25] * 2, **TOL)
    np.testing.assert_allclose(grad[0, 1, :3], [-1 / 12 + 0.25] * 3, **TOL)


@pytest.mark.parametrize(
    "rule, clip_value, grad_member1",
    [("standard_min", -0.1, 0.0), ("reference_max", -0.175, 0.25 * 0.5)],
)
def test_maxent_clip_rules_with_behaviour_logprobs(rule, clip_value, grad_member1):
    logp, batch = _one_group_batch([0.75, 0.25])
    # behaviour sums: member 0 ratio 1.5 (A>0, clipped at 1.2), member 1 ratio 0.5 (A<0)
    behaviour = logp.at[0, 0, 0].add(-math.log(1.5)).at[0, 1, 0].add(math.log(2.0))
    batch["behaviour_logp"] = behaviour
    s = ObjectiveSettings(negative_adv_rule=rule, clip_objective_coef=2.0)
    loss, metrics, grad = _loss_and_grad(logp, batch, s)
    np.testing.assert_allclose(metrics["loss/clip"], clip_value, **TOL)
    np.testing.assert_allclose(metrics["loss/policy"], 1.0 + 2.0 * clip_value, **TOL)
    # member 0 is clipped: only the likelihood term's gradient remains
    np.testing.assert_allclose(grad[0, 0, :2], [-0.375] * 2, **TOL)
    # member 1: standard min -> clipped (0); reference max -> -c * A * rho = 2 * 0.25 * 0.5
    np.testing.assert_allclose(grad[0, 1, :3], [-1 / 12 + 2.0 * grad_member1] * 3, **TOL)


def test_maxent_clip_baseline_and_flag():
    logp, batch = _one_group_batch([0.75, 0.25])
    _, metrics, grad = _loss_and_grad(logp, batch, ObjectiveSettings(clip_adv_baseline=0.0))
    # A = w: L_clip = -(0.75 + 0.25)
    np.testing.assert_allclose(metrics["loss/clip"], -1.0, **TOL)
    np.testing.assert_allclose(grad[0, 0, 0], -0.375 - 0.75, **TOL)
    # clip_range 0 disables the term whatever the flag (reference: on iff clip_range > 0)
    _, metrics, _ = _loss_and_grad(logp, batch, ObjectiveSettings(epsilon_low=0.0, epsilon_high=0.0))
    assert float(metrics["loss/clip"]) == 0.0


def test_maxent_empty_groups_not_counted():
    logp, batch = _one_group_batch([0.75, 0.25])
    two = {k: jnp.concatenate([v, v], axis=0) for k, v in batch.items()}
    two["valid"] = two["valid"].at[1].set(False)
    loss, _, _ = _loss_and_grad(jnp.concatenate([logp, logp]), two, ObjectiveSettings(use_clip_objective=False))
    np.testing.assert_allclose(loss, 1.0, **TOL)


# ---- properties ---------------------------------------------------------------------------

P, G = 3, 4


@functools.partial(jax.jit, static_argnames="length_normalize_ref")
def _weights(u, valid, ref, lengths, tau, beta, q_temperature, length_normalize_ref=True):
    q = maxent.listwise_target(u, valid, q_temperature, 1e-6)
    return maxent.maxent_weights(q, ref, valid, tau, beta, lengths, length_normalize_ref)


def _arrays(draw_u, draw_valid, draw_ref, draw_len):
    return (
        jnp.asarray(np.array(draw_u, np.float32).reshape(P, G)),
        jnp.asarray(np.array(draw_valid, bool).reshape(P, G)),
        jnp.asarray(np.array(draw_ref, np.float32).reshape(P, G)),
        jnp.asarray(np.array(draw_len, np.float32).reshape(P, G)),
    )


floats = st.floats(-3, 3, allow_nan=False, width=32)
group_inputs = st.tuples(
    st.lists(floats, min_size=P * G, max_size=P * G),
    st.lists(st.booleans(), min_size=P * G, max_size=P * G),
    st.lists(st.floats(-40, 0, width=32), min_size=P * G, max_size=P * G),
    st.lists(st.integers(0, 50), min_size=P * G, max_size=P * G),
)
coef = st.floats(0.0, 2.0, width=32)


@settings(max_examples=25, deadline=None)
@given(group_inputs, coef, coef, st.booleans())
def test_weights_sum_to_one_and_vanish_on_invalid(inputs, tau, beta, normalise):
    u, valid, ref, lengths = _arrays(*inputs)
    w = np.asarray(_weights(u, valid, ref, lengths, tau, beta, 1.0, length_normalize_ref=normalise))
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert np.all(w[~np.asarray(valid)] == 0)
    sums = w.sum(-1)
    nonempty = np.asarray(valid).any(-1)
    np.testing.assert_allclose(sums[nonempty], 1.0, rtol=1e-5)
    assert np.all(sums[~nonempty] == 0)


@settings(max_examples=20, deadline=None)
@given(group_inputs)
def test_weights_uniform_as_tau_grows(inputs):
    u, valid, ref, lengths = _arrays(*inputs)
    w = np.asarray(_weights(u, valid, ref / 40.0, lengths, 1e7, 0.04, 1.0))
    k = np.asarray(valid).sum(-1, keepdims=True)
    expected = np.where(np.asarray(valid), 1.0 / np.maximum(k, 1), 0.0)
    np.testing.assert_allclose(w, expected, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(-2, 2), min_size=P * G, max_size=P * G), group_inputs)
def test_weights_argmax_at_tau_beta_zero(u_int, inputs):
    _, valid, ref, lengths = _arrays(*inputs)
    u = jnp.asarray(np.array(u_int, np.float32).reshape(P, G))
    w = np.asarray(_weights(u, valid, ref, lengths, 0.0, 0.0, 1.0))
    uv = np.where(np.asarray(valid), np.asarray(u), -np.inf)
    best = (uv == uv.max(-1, keepdims=True)) & np.asarray(valid)
    expected = np.where(best, 1.0 / np.maximum(best.sum(-1, keepdims=True), 1), 0.0)
    np.testing.assert_allclose(w, expected, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(group_inputs, st.floats(-5, 5, width=32), st.floats(0.05, 2.0), coef)
def test_weights_invariant_to_utility_shift(inputs, shift, tau, beta):
    u, valid, ref, lengths = _arrays(*inputs)
    w = _weights(u, valid, ref, lengths, tau, beta, 1.0)
    w_shifted = _weights(u + shift, valid, ref, lengths, tau, beta, 1.0)
    np.testing.assert_allclose(w, w_shifted, atol=2e-5)
