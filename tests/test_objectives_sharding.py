"""Every objective gives the same loss, metrics and gradients under jit, sharded
over the 8-device mesh, and eagerly (slow test); all outputs stay finite on the edge cases of one batch (all-equal
rewards, single-member and empty groups, empty completions, -inf log-probs off the mask and
an all -inf reference)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from maxent_jax.objectives import InfoSeedSettings, ObjectiveSettings, get_objective
from maxent_jax.objectives.groups import flatten_groups, group_batch, to_groups
from maxent_jax.objectives.grpo import prepare_grpo_batch
from maxent_jax.objectives.maxent import prepare_maxent_batch

P, G, T, H = 8, 4, 6, 3


def _edge_batch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, T + 1, (P, G))
    lengths[0, :] = T
    lengths[1, 2] = 0  # an empty completion
    token_mask = np.arange(T)[None, None, :] < lengths[..., None]
    valid = np.ones((P, G), bool)
    valid[2, 1:] = False  # single-member group
    valid[3, :] = False  # empty group
    valid[4, 3] = False
    u = rng.integers(0, 2, (P, G)).astype(np.float32)
    u[5, :] = 1.0  # all-equal rewards
    logp = np.where(token_mask, -rng.random((P, G, T)) * 3, -np.inf).astype(np.float32)
    ref = np.where(token_mask, logp + rng.normal(0, 0.2, (P, G, T)), -np.inf).astype(np.float32)
    ref[6, 0, :] = -np.inf  # reference gives the whole completion probability 0
    behaviour = np.where(token_mask, logp + rng.normal(0, 0.2, (P, G, T)), -np.inf).astype(np.float32)
    seed_ids = np.where(np.arange(G)[None, :] >= 2, rng.integers(0, 2, (P, G)), -1)
    batch = {
        "token_mask": token_mask,
        "valid": valid,
        "ref_logp": ref,
        "behaviour_logp": behaviour,
        "seed_ids": seed_ids.astype(np.int32),
        "is_seed_aug": seed_ids >= 0,
        "seed_hidden": rng.normal(size=(P, G, H)).astype(np.float32),
    }
    ref_sum = np.where(token_mask, ref, 0.0).sum(-1)
    return {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(logp), jnp.asarray(u), jnp.asarray(ref_sum), jnp.asarray(lengths)


CASES = [
    ("maxent", ObjectiveSettings(info_seed=InfoSeedSettings(num_seeds=2, lambda_=0.1, alpha_entropy=0.5))),
    ("grpo", ObjectiveSettings(negative_adv_rule="reference_max", info_seed=InfoSeedSettings(num_seeds=2, alpha_entropy=0.5))),
    ("grpo", ObjectiveSettings(loss_type="dapo", importance_sampling_level="token", kl_estimator="k3",
                               sampler_correction="token_truncate", epsilon_high=0.28)),
]


@jax.jit
def _prepare(batch, u, ref_sum, lengths):
    weights, wstats = prepare_maxent_batch(u, batch["valid"], ref_sum, lengths, 0.1, 0.04, q_temperature=1.0, q_epsilon=1e-6)
    adv, rstats = prepare_grpo_batch(u, batch["valid"], "group")
    return {**batch, "weights": weights, "advantages": adv}, {**wstats, **rstats}


def _value_and_grad(name, s):
    fn = functools.partial(get_objective(name), settings=s)

    def run(logp, batch, beta):
        seeds = batch.pop("seed_hidden")

        def loss(x, h):
            return fn(x, {**batch, "seed_hidden": h}, {"beta": beta})

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(logp, seeds)

    return run


def _assert_tree_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def _mesh_shard():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    return NamedSharding(mesh, PS("data"))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_jit_and_mesh_agree_and_stay_finite(case):
    name, s = CASES[case]
    batch, logp, u, ref_sum, lengths = _edge_batch()
    full, stats = _prepare(batch, u, ref_sum, lengths)
    run = jax.jit(_value_and_grad(name, s))
    jitted = run(logp, dict(full), jnp.float32(0.04))
    for leaf in jax.tree.leaves((jitted, stats)):
        assert np.all(np.isfinite(np.asarray(leaf))), (name, s)
    shard = _mesh_shard()
    sharded = run(*jax.device_put((logp, dict(full)), shard), jnp.float32(0.04))
    _assert_tree_close(jitted, sharded)
    assert sharded[1][0].sharding.is_equivalent_to(shard, 3)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)))
def test_eager_matches_jit(case):
    name, s = CASES[case]
    batch, logp, u, ref_sum, lengths = _edge_batch()
    full, _ = _prepare(batch, u, ref_sum, lengths)
    run = _value_and_grad(name, s)
    _assert_tree_close(run(logp, dict(full), 0.04), jax.jit(run)(logp, dict(full), jnp.float32(0.04)))


def test_flat_batch_regrouped_inside_the_loss_gives_the_same_result():
    """The train step hands the loss flat rows `[P*G, ...]`; `group_batch` restores the layout."""
    name, s = CASES[2]
    batch, logp, u, ref_sum, lengths = _edge_batch()
    full, _ = _prepare(batch, u, ref_sum, lengths)
    full.pop("seed_hidden")
    flat = {k: flatten_groups(v) for k, v in full.items()}
    flat["token_normalizer"] = jnp.asarray(20.0)
    fn = functools.partial(get_objective(name), settings=s)
    grouped = jax.jit(lambda x, b: fn(x, {**b, "token_normalizer": jnp.asarray(20.0)}, {"beta": 0.04})[0])(logp, full)
    regrouped = jax.jit(lambda x, b: fn(to_groups(x, G), group_batch(b, G), {"beta": 0.04})[0])(flatten_groups(logp), flat)
    np.testing.assert_allclose(regrouped, grouped, rtol=1e-5, atol=1e-7)


def test_prepare_helpers_on_the_mesh():
    batch, _, u, ref_sum, lengths = _edge_batch()
    _, stats = _prepare(batch, u, ref_sum, lengths)
    args = jax.device_put((batch, u, ref_sum, lengths), _mesh_shard())
    full, sharded_stats = jax.jit(_prepare)(*args)
    _assert_tree_close(stats, sharded_stats)
    w = np.asarray(full["weights"])
    valid = np.asarray(batch["valid"])
    np.testing.assert_allclose(w.sum(-1)[valid.any(-1)], 1.0, rtol=1e-5)
    np.testing.assert_allclose(w[6][valid[6]].sum(), 1.0, rtol=1e-5)  # -inf reference member gets 0
    assert w[6, 0] == 0.0
