"""KL estimators (spec 7.3), diagnostics (7.5) and length statistics (5.5)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from maxent_jax.objectives import ObjectiveSettings, get_objective
from maxent_jax.objectives import diagnostics
from maxent_jax.objectives import kl as kl_module

length_stats = jax.jit(diagnostics.length_stats, static_argnums=2)
kl_diagnostics = jax.jit(kl_module.kl_diagnostics, static_argnums=(5, 6))
sequence_k3 = jax.jit(kl_module.sequence_k3)
token_kl = jax.jit(kl_module.token_kl, static_argnums=3)

TOL = dict(rtol=1e-5, atol=1e-7)


def test_sequence_k3_hand_values_and_gradient():
    seq = jnp.array([[-2.0, -4.0]])  # per-token means -1 and -1 (n = 2, 4)
    ref_mean = jnp.array([[-1.5, -1.0]])
    lengths = jnp.array([[2.0, 4.0]])
    valid = jnp.ones((1, 2), bool)
    kl, k = sequence_k3(seq, ref_mean, lengths, valid)
    k0 = math.exp(-0.5) + 0.5 - 1
    np.testing.assert_allclose(k[0], [k0, 0.0], **TOL)
    np.testing.assert_allclose(kl, k0 * 2 / 6, **TOL)
    grad = jax.jit(jax.grad(lambda s: kl_module.sequence_k3(s, ref_mean, lengths, valid)[0]))(seq)
    # dKL/dS_i = -(e^delta_i - 1) / sum max(n, 1)
    np.testing.assert_allclose(grad[0], [-(math.exp(-0.5) - 1) / 6, 0.0], **TOL)


def test_sequence_k3_guards():
    kl, _ = sequence_k3(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1, 2), bool))
    assert float(kl) == 0.0
    # a hugely negative policy mean is clamped at delta = 60 (finite)
    kl, _ = sequence_k3(jnp.array([[-1e6]]), jnp.array([[0.0]]), jnp.array([[1.0]]), jnp.ones((1, 1), bool))
    np.testing.assert_allclose(kl, math.exp(60) - 61, rtol=1e-5)


def test_token_estimators():
    logp = jnp.array([[[-1.0, -2.0]]])
    ref = jnp.array([[[-1.5, -jnp.inf]]])
    mask = jnp.array([[[True, False]]])
    d = 0.5
    np.testing.assert_allclose(token_kl(logp, ref, mask, "k1")[0, 0], [d, 0], **TOL)
    np.testing.assert_allclose(token_kl(logp, ref, mask, "k2")[0, 0], [d * d / 2, 0], **TOL)
    np.testing.assert_allclose(token_kl(logp, ref, mask, "k3")[0, 0], [math.exp(-d) + d - 1, 0], **TOL)


def test_kl_in_the_loss_is_beta_weighted():
    logp = jnp.array([[[-1.0, -1.0], [-1.0, -1.0]]])
    ref = jnp.array([[[-1.5, -1.5], [-1.0, -1.0]]])
    batch = {"token_mask": jnp.ones((1, 2, 2), bool), "valid": jnp.ones((1, 2), bool), "ref_logp": ref,
             "weights": jnp.array([[0.5, 0.5]])}
    fn = functools.partial(get_objective("maxent"), settings=ObjectiveSettings(use_clip_objective=False))
    (loss, m), grad = jax.jit(jax.value_and_grad(lambda x: fn(x, batch, {"beta": 0.1}), has_aux=True))(logp)
    k0 = math.exp(-0.5) + 0.5 - 1
    np.testing.assert_allclose(m["loss/kl"], k0 / 2, **TOL)
    np.testing.assert_allclose(m["loss/weighted_kl"], 0.1 * k0 / 2, **TOL)
    np.testing.assert_allclose(loss, 1.0 + 0.1 * k0 / 2, **TOL)
    np.testing.assert_allclose(m["kl"], k0 / 2, **TOL)  # unweighted mean of k_i (equal lengths)
    # policy: -w/n = -0.25 per token; KL: -beta (e^delta - 1) / 4 per token of member 0
    np.testing.assert_allclose(grad[0, 0], -0.25 - 0.1 * (math.exp(-0.5) - 1) / 4, **TOL)
    np.testing.assert_allclose(grad[0, 1], -0.25, **TOL)
    fn = jax.jit(functools.partial(get_objective("maxent"), settings=ObjectiveSettings(use_clip_objective=False, kl_estimator="k1")))
    _, m = fn(logp, batch, {"beta": 0.1})
    np.testing.assert_allclose(m["loss/kl"], 0.25, **TOL)  # token mean of [0.5, 0.5, 0, 0]


def test_diagnostics_clip_regions_and_buckets():
    k = jnp.array([[0.1, 0.2, 0.3, 0.4]])
    seq_mean = jnp.array([[0.0, 0.0, 0.0, 0.0]])
    ref_mean = jnp.array([[0.5, -0.5, 0.0, 0.1]])  # log r = [-0.5, 0.5, 0, -0.1]
    lengths = jnp.array([[10.0, 40.0, 300.0, 0.0]])
    valid = jnp.ones((1, 4), bool)
    d = kl_diagnostics(k, seq_mean, ref_mean, lengths, valid, 0.2, 0.2)
    np.testing.assert_allclose(d["kl"], 0.25, **TOL)
    np.testing.assert_allclose(d["clip_ratio/low_mean"], 0.25, **TOL)  # -0.5 < log 0.8
    np.testing.assert_allclose(d["clip_ratio/high_mean"], 0.25, **TOL)  # 0.5 > log 1.2
    np.testing.assert_allclose(d["clip_ratio/region_mean"], 0.5, **TOL)
    assert float(d["clip_ratio/low_min"]) == 0.0 and float(d["clip_ratio/high_max"]) == 1.0
    # buckets on max(n, 1): {10, 1} -> 0-32, 40 -> 33-64, 300 -> 257+
    np.testing.assert_allclose(d["kl_per_token_bucket/0-32"], (0.1 * 10 + 0.4 * 1) / 11, **TOL)
    np.testing.assert_allclose(d["kl_per_token_bucket_tokens/0-32"], 11.0, **TOL)
    np.testing.assert_allclose(d["kl_per_token_bucket/33-64"], 0.2, **TOL)
    np.testing.assert_allclose(d["kl_per_token_bucket/257+"], 0.3, **TOL)
    assert float(d["kl_per_token_bucket_tokens/65-128"]) == 0.0


def test_length_stats():
    lengths = jnp.array([[3.0, 8.0, 8.0, 5.0]])
    valid = jnp.array([[True, True, True, False]])
    s = length_stats(lengths, valid, 8)
    np.testing.assert_allclose(s["completions/mean_length_sampled"], 19 / 3, **TOL)
    assert float(s["completions/min_length_sampled"]) == 3 and float(s["completions/max_length_sampled"]) == 8
    np.testing.assert_allclose(s["completions/clipped_frac"], 2 / 3, **TOL)
    assert float(s["completions/mean_length_terminated"]) == 3.0
    np.testing.assert_allclose(np.asarray(length_stats(lengths, valid, 2)["completions/mean_length_terminated"]), 0.0)
