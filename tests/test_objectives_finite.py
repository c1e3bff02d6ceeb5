"""Property: every output (weights, statistics, losses, metrics, gradients) is finite on random
batches full of edge cases: all-equal rewards, single-member and empty groups, empty
completions, -inf log-probs off the mask and -inf reference sequences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from maxent_jax.objectives import InfoSeedSettings, ObjectiveSettings, get_objective
from maxent_jax.objectives.grpo import prepare_grpo_batch
from maxent_jax.objectives.maxent import prepare_maxent_batch

P, G, T = 4, 3, 5
SEEDS = InfoSeedSettings(num_seeds=2, lambda_=0.1, alpha_entropy=0.5)
MAXENT = ObjectiveSettings(info_seed=SEEDS)
GRPO = ObjectiveSettings(loss_type="grpo", importance_sampling_level="token", kl_estimator="k3",
                         sampler_correction="token_truncate", info_seed=SEEDS)


@jax.jit
def _everything(u, valid, lengths, logp, ref, behaviour, seed_hidden, tau, beta):
    token_mask = jnp.arange(T)[None, None, :] < lengths[..., None]
    ref_sum = jnp.sum(jnp.where(token_mask, ref, 0.0), axis=-1)
    weights, wstats = prepare_maxent_batch(u, valid, ref_sum, lengths, tau, beta, q_temperature=0.5, q_epsilon=1e-6)
    adv, rstats = prepare_grpo_batch(u, valid, "group")
    seed_ids = jnp.where(jnp.arange(G)[None, :] > 0, jnp.arange(G)[None, :] % 2, -1) * jnp.ones((P, 1), jnp.int32)
    batch = {"token_mask": token_mask, "valid": valid, "ref_logp": ref, "behaviour_logp": behaviour,
             "weights": weights, "advantages": adv, "seed_ids": seed_ids, "is_seed_aug": seed_ids >= 0}
    out = {"weights": weights, **wstats, **rstats}
    for name, s in (("maxent", MAXENT), ("grpo", GRPO)):
        fn = functools.partial(get_objective(name), settings=s)

        def loss(x, h, fn=fn):
            return fn(x, {**batch, "seed_hidden": h}, {"beta": beta})

        (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(logp, seed_hidden)
        out[name] = (value, metrics, grads)
    return out


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 1.0]), min_size=P * G, max_size=P * G),
    st.lists(st.booleans(), min_size=P * G, max_size=P * G),
    st.lists(st.integers(0, T), min_size=P * G, max_size=P * G),
    st.lists(st.booleans(), min_size=P * G, max_size=P * G),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.0, 0.1, 5.0]),
    st.sampled_from([0.0, 0.04, 1.0]),
)
def test_all_outputs_finite(u, valid, lengths, ref_dead, seed, tau, beta):
    rng = np.random.default_rng(seed)
    lengths = np.array(lengths).reshape(P, G)
    mask = np.arange(T)[None, None, :] < lengths[..., None]
    logp = np.where(mask, -rng.random((P, G, T)) * 5, -np.inf).astype(np.float32)
    ref = np.where(mask, logp + rng.normal(0, 0.5, (P, G, T)), -np.inf).astype(np.float32)
    ref[np.array(ref_dead).reshape(P, G)] = -np.inf
    behaviour = np.where(mask, logp + rng.normal(0, 0.5, (P, G, T)), -np.inf).astype(np.float32)
    out = _everything(
        jnp.asarray(np.array(u, np.float32).reshape(P, G)), jnp.asarray(np.array(valid).reshape(P, G)),
        jnp.asarray(lengths), jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(behaviour),
        jnp.asarray(rng.normal(size=(P, G, 4)).astype(np.float32)), jnp.float32(tau), jnp.float32(beta),
    )
    for path, leaf in jax.tree_util.tree_leaves_with_path(out):
        assert np.all(np.isfinite(np.asarray(leaf))), jax.tree_util.keystr(path)
