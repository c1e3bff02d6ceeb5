"""GRPO advantages and losses (spec 7.2 + TRL loss types), ratios, sampler correction."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxent_jax.errors import UserError
from maxent_jax.objectives import ObjectiveSettings, get_objective, resolve_epsilons
from maxent_jax.objectives import grpo

grpo_advantages = jax.jit(grpo.grpo_advantages, static_argnums=2)
prepare_grpo_batch = jax.jit(grpo.prepare_grpo_batch, static_argnums=2)

TOL = dict(rtol=1e-5, atol=1e-6)


def test_advantages_centred_without_std_by_default():
    u = jnp.array([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 0.0]])
    valid = jnp.array([[True] * 4, [True, True, True, False]])
    adv, stats = prepare_grpo_batch(u, valid, "none")
    np.testing.assert_allclose(adv, [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]], **TOL)
    np.testing.assert_allclose(stats["frac_reward_zero_std"], 0.5, **TOL)
    vals = np.array([1, 0, 0, 1, 3, 3, 3.0])
    np.testing.assert_allclose(stats["reward"], vals.mean(), **TOL)
    np.testing.assert_allclose(stats["reward_std"], vals.std(), **TOL)


def test_advantages_group_and_batch_scaling_match_trl():
    u = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 1.0, 1.0]])
    valid = jnp.ones((2, 4), bool)
    g = grpo_advantages(u, valid, "group")
    std0 = np.std([1, 0, 0, 1.0], ddof=1)
    std1 = np.std([2, 0, 1, 1.0], ddof=1)
    np.testing.assert_allclose(g[0], np.array([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-4), **TOL)
    np.testing.assert_allclose(g[1], np.array([1, -1, 0, 0.0]) / (std1 + 1e-4), **TOL)
    b = grpo_advantages(u, valid, "batch")
    std = np.std(np.asarray(u).ravel(), ddof=1)
    np.testing.assert_allclose(b[1], np.array([1, -1, 0, 0.0]) / (std + 1e-4), **TOL)
    with pytest.raises(UserError, match="scale_rewards"):
        grpo.grpo_advantages(u, valid, "std")


def _batch(adv, lengths, T=4, logp_value=-1.0):
    """One group; member i has lengths[i] scored tokens of log-prob `logp_value`."""
    G = len(adv)
    mask = np.zeros((1, G, T), bool)
    for i, n in enumerate(lengths):
        mask[0, i, :n] = True
    logp = jnp.where(jnp.asarray(mask), logp_value, -jnp.inf)
    batch = {"token_mask": jnp.asarray(mask), "valid": jnp.ones((1, G), bool), "ref_logp": logp, "advantages": jnp.array([adv])}
    return logp, batch


@functools.partial(jax.jit, static_argnames="s")
def _loss_and_grad(logp, batch, s, beta=0.0):
    fn = functools.partial(get_objective("grpo"), settings=s)
    (loss, metrics), grad = jax.value_and_grad(lambda x: fn(x, batch, {"beta": beta}), has_aux=True)(logp)
    return loss, metrics, grad


def test_reference_loss_on_policy_gradient_is_minus_advantage_over_groups():
    logp, batch = _batch([0.5, -0.5, -0.5, 0.5], [1, 2, 3, 4])
    loss, metrics, grad = _loss_and_grad(logp, batch, ObjectiveSettings(clip_objective_coef=2.0))
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)
    # grad = -(c/B) A_i on every scored token of member i (sum over the group, B = 1)
    for i, (a, n) in enumerate(zip([0.5, -0.5, -0.5, 0.5], [1, 2, 3, 4])):
        np.testing.assert_allclose(grad[0, i, :n], -2.0 * a, **TOL)
        assert np.all(np.asarray(grad[0, i, n:]) == 0)


def test_reference_loss_unclipped_without_coefficient_and_baseline():
    logp, batch = _batch([1.0, -1.0], [2, 2])
    batch["behaviour_logp"] = logp.at[0, 0, 0].add(-math.log(2.0))  # ratio 2 for member 0
    s = ObjectiveSettings(use_clip_objective=False, clip_objective_coef=5.0, clip_adv_baseline=0.5)
    loss, metrics, grad = _loss_and_grad(logp, batch, s)
    # A' = [0.5, -1.5]; L = -(2 * 0.5 + 1 * (-1.5)) = 0.5 (no coefficient without clip)
    np.testing.assert_allclose(loss, 0.5, **TOL)
    np.testing.assert_allclose(grad[0, 0, :2], -2 * 0.5, **TOL)
    np.testing.assert_allclose(grad[0, 1, :2], 1.5, **TOL)
    assert float(metrics["loss/clip"]) == 0.0


@pytest.mark.parametrize("rule, expected", [("standard_min", -(1.2 * 1.0) + 0.8), ("reference_max", -(1.2 * 1.0) + 0.5)])
def test_reference_clip_rule(rule, expected):
    logp, batch = _batch([1.0, -1.0], [2, 2])
    # member 0: ratio 2 (A>0 -> clipped to 1.2); member 1: ratio 0.5 (A<0)
    batch["behaviour_logp"] = logp.at[0, 0, 0].add(-math.log(2.0)).at[0, 1, 0].add(math.log(2.0))
    loss, metrics, _ = _loss_and_grad(logp, batch, ObjectiveSettings(negative_adv_rule=rule))
    np.testing.assert_allclose(loss, expected, **TOL)
    np.testing.assert_allclose(metrics["loss/clip"], expected, **TOL)


def _trl_reference_loss(logp, old, mask, adv, level, loss_type, eps=(0.2, 0.2), max_len=4):
    """TRL's GRPO loss written out with numpy loops (its semantics, not its code)."""
    logp, old, mask, adv = (np.asarray(x, np.float64) for x in (logp, old, mask, adv))
    rows = []
    for i in range(mask.shape[0]):
        m = mask[i].astype(bool)
        lr = np.where(m, np.where(m, logp[i], 0.0) - np.where(m, old[i], 0.0), 0.0)
        if level == "sequence":
            lr = np.full_like(lr, lr[m].sum() / max(m.sum(), 1))
        ratio = np.exp(lr)
        o = np.minimum(ratio * adv[i], np.clip(ratio, 1 - eps[0], 1 + eps[1]) * adv[i])
        rows.append(np.where(m, -o, 0.0))
    ptl = np.stack(rows)
    n = mask.sum(-1)
    if loss_type == "grpo":
        return np.mean(ptl.sum(-1) / np.maximum(n, 1))
    if loss_type in ("bnpo", "dapo"):
        return ptl.sum() / max(mask.sum(), 1)
    return ptl.sum() / (mask.shape[0] * max_len)


@pytest.mark.parametrize(
    "loss_type, level", [("grpo", "token"), ("bnpo", "sequence"), ("dr_grpo", "token"), ("dapo", "token"), ("grpo", "sequence")]
)
def test_trl_loss_types_match_trl_semantics(loss_type, level):
    rng = np.random.default_rng(0)
    G, T = 4, 5
    mask = np.zeros((1, G, T), bool)
    for i, n in enumerate([5, 3, 1, 4]):
        mask[0, i, :n] = True
    logp = jnp.asarray(np.where(mask, -rng.random((1, G, T)) * 2, -np.inf), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.3, (1, G, T)), jnp.float32)
    adv = np.array([0.7, -0.2, 0.4, -0.9], np.float32)
    batch = {"token_mask": jnp.asarray(mask), "valid": jnp.ones((1, G), bool), "ref_logp": logp,
             "advantages": jnp.asarray(adv)[None], "behaviour_logp": old}
    s = ObjectiveSettings(loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28, max_completion_length=T)
    loss, _, grad = _loss_and_grad(logp, batch, s)
    expected = _trl_reference_loss(logp[0], old[0], mask[0], adv, level, loss_type, eps=(0.2, 0.28), max_len=T)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # gradient: autodiff of the same formula written directly in jnp
    ref_grad = jax.jit(jax.grad(lambda x: _jax_trl(x, old[0], mask[0], adv, level, loss_type, T)))(logp[0])
    np.testing.assert_allclose(grad[0], ref_grad, rtol=1e-5, atol=1e-7)


def _jax_trl(logp, old, mask, adv, level, loss_type, max_len):
    lr = jnp.where(mask, logp - old, 0.0)
    if level == "sequence":
        lr = jnp.broadcast_to(jnp.sum(lr, -1, keepdims=True) / jnp.maximum(mask.sum(-1, keepdims=True), 1), lr.shape)
    ratio = jnp.exp(lr)
    a = adv[:, None]
    ptl = jnp.where(mask, -jnp.minimum(ratio * a, jnp.clip(ratio, 0.8, 1.28) * a), 0.0)
    if loss_type == "grpo":
        return jnp.mean(ptl.sum(-1) / jnp.maximum(mask.sum(-1), 1))
    if loss_type in ("bnpo", "dapo"):
        return ptl.sum() / mask.sum()
    return ptl.sum() / (mask.shape[0] * max_len)


def test_dapo_uses_the_accumulation_token_normalizer():
    logp, batch = _batch([1.0, -1.0], [2, 3])
    s = ObjectiveSettings(loss_type="dapo", importance_sampling_level="token")
    base, _, _ = _loss_and_grad(logp, batch, s)
    batch["token_normalizer"] = jnp.asarray(10.0)
    scaled, _, _ = _loss_and_grad(logp, batch, s)
    np.testing.assert_allclose(scaled, base * 5 / 10, **TOL)
    batch["token_normalizer"] = jnp.full((1, 2), 10.0)  # repeated per row, as a row-sharded batch carries it
    per_row, _, _ = _loss_and_grad(logp, batch, s)
    np.testing.assert_allclose(per_row, scaled, **TOL)


def test_sampler_correction_truncates_and_masks():
    logp, batch = _batch([1.0, 1.0], [2, 2])
    # sampler log-probs lower than the trainer's by log 5 on member 0 (IS ratio 5), 0 on member 1
    batch["behaviour_logp"] = logp.at[0, 0, :2].add(-math.log(5.0) / 2)
    s = ObjectiveSettings(loss_type="bnpo", importance_sampling_level="token", sampler_correction="sequence_truncate")
    loss, metrics, grad = _loss_and_grad(logp, batch, s)
    # ratio vs trainer old (= current) is 1; loss = -(3 * 1 * 2 + 1 * 1 * 2) / 4 tokens
    np.testing.assert_allclose(loss, -2.0, **TOL)
    np.testing.assert_allclose(metrics["sampler_is/mean"], 2.0, **TOL)
    np.testing.assert_allclose(grad[0, 0, :2], -3.0 / 4, **TOL)
    s = ObjectiveSettings(loss_type="bnpo", importance_sampling_level="token", sampler_correction="sequence_mask")
    loss, _, _ = _loss_and_grad(logp, batch, s)
    np.testing.assert_allclose(loss, -0.5, **TOL)
    # without correction the sampler's log-probs are the ratio denominator: ratio sqrt(5) per token
    s = ObjectiveSettings(loss_type="bnpo", importance_sampling_level="token", epsilon_high=10.0)
    loss, _, _ = _loss_and_grad(logp, batch, s)
    np.testing.assert_allclose(loss, -(2 * math.sqrt(5) + 2) / 4, **TOL)


def test_settings_errors_name_the_field():
    with pytest.raises(UserError, match="objective.loss_type='ppo'"):
        ObjectiveSettings(loss_type="ppo")
    with pytest.raises(UserError, match="importance_sampling_level='token'"):
        ObjectiveSettings(importance_sampling_level="token")
    with pytest.raises(UserError, match="objective.negative_adv_rule"):
        ObjectiveSettings(negative_adv_rule="max")
    assert resolve_epsilons(0.2) == (0.2, 0.2)
    assert resolve_epsilons(1.5) == (1.0, 1.0)
    assert resolve_epsilons(0.2, epsilon_high=0.28) == (0.2, 0.28)
    assert resolve_epsilons(0.2, epsilon_low=0.1) == (0.1, 0.1)
