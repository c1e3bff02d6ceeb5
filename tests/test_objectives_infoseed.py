"""InfoSeed (spec 9): prompts, pooling, InfoNCE/CE losses with real gradients, alpha term, metrics."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxent_jax.errors import UserError
from maxent_jax.objectives import InfoSeedSettings, ObjectiveSettings, get_objective
from maxent_jax.objectives import infoseed
from maxent_jax.objectives.infoseed import init_seed_head, pool_hidden, render_seed_prompts, seed_head_logits

infonce_loss = jax.jit(infoseed.infonce_loss, static_argnums=3)
seed_ce_loss = jax.jit(infoseed.seed_ce_loss)
seed_diversity_l2 = jax.jit(infoseed.seed_diversity_l2, static_argnums=3)
subset_entropy = jax.jit(infoseed.subset_entropy, static_argnums=2)
pool = jax.jit(infoseed.pool_hidden, static_argnums=2)

TOL = dict(rtol=1e-5, atol=1e-6)


def test_render_seed_prompts_is_seeded_and_zero_based():
    prompts = ["<|user|>2+2<|assistant|>", "<|user|>3+3<|assistant|>"]
    rendered, ids = render_seed_prompts(prompts, 3, "\n[seed={seed}]", np.random.default_rng(7))
    again, ids2 = render_seed_prompts(prompts, 3, "\n[seed={seed}]", np.random.default_rng(7))
    assert rendered == again and np.array_equal(ids, ids2)
    assert ids.shape == (2, 3) and ids.min() >= 0 and ids.max() <= 2
    assert rendered[0] == f"{prompts[0]}\n[seed={ids[0, 0]}]"
    assert rendered[5] == f"{prompts[1]}\n[seed={ids[1, 2]}]"
    wrapped, ids = render_seed_prompts(["Q"], 2, "[{seed}] {prompt}", np.random.default_rng(0))
    assert wrapped == [f"[{ids[0, 0]}] Q", f"[{ids[0, 1]}] Q"]
    with pytest.raises(UserError, match="info_seed.prompt_template"):
        render_seed_prompts(["Q"], 2, "{nope}", np.random.default_rng(0))


def test_pooling_mean_and_last_respect_the_mask():
    hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    mask = jnp.array([[1, 1, 0], [0, 0, 0]], bool)
    np.testing.assert_allclose(pool(hidden, mask, "mean"), [[1.0, 2.0], [0.0, 0.0]], **TOL)
    np.testing.assert_allclose(pool(hidden, mask, "last"), [[2.0, 3.0], [0.0, 0.0]], **TOL)
    with pytest.raises(UserError, match="info_seed.pooling"):
        pool_hidden(hidden, mask, "max")


def test_infonce_hand_value():
    # rows 0, 1 share seed 0 (orthogonal to row 2, seed 1); row 3 is an original (-1)
    h = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    ids = jnp.array([0, 0, 1, -1])
    keep = jnp.ones(4, bool)
    loss = infonce_loss(h, ids, keep, 0.5)
    # row 0: logits over {1: 2.0, 2: 0.0}; positive is 1 -> -log(e^2 / (e^2 + 1)); row 1 the same
    np.testing.assert_allclose(loss, -math.log(math.exp(2) / (math.exp(2) + 1)), **TOL)
    assert float(infonce_loss(h, jnp.array([0, 1, 2, -1]), keep, 0.5)) == 0.0  # no positives


def test_ce_loss_zero_based_ids_and_originals_excluded():
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    ids = jnp.array([0, 1, -1])
    loss = seed_ce_loss(logits, ids, jnp.ones(3, bool))
    np.testing.assert_allclose(loss, -math.log(math.exp(2) / (math.exp(2) + 1)), **TOL)
    params = init_seed_head(jax.random.key(0), 4, 3)
    assert jax.eval_shape(seed_head_logits, params, jnp.ones((2, 5, 4))).shape == (2, 5, 3)


def test_subset_entropy_is_nan_free_on_signed_advantages():
    adv = jnp.array([0.5, -0.5, 0.25, -0.25])
    mask = jnp.array([True, True, False, False])
    np.testing.assert_allclose(subset_entropy(adv, mask, "abs"), math.log(2), **TOL)
    assert not np.isfinite(float(subset_entropy(adv, mask, "reference_signed")))  # Q23 reproduced
    probs = jnp.array([0.25, 0.75, 0.0, 0.0])
    np.testing.assert_allclose(subset_entropy(probs, mask, "abs"), subset_entropy(probs, mask, "reference_signed"), **TOL)
    assert float(subset_entropy(adv, jnp.zeros(4, bool), "abs")) == 0.0


def test_seed_diversity():
    h = jnp.array([[0.0, 0.0], [2.0, 0.0], [3.0, 4.0], [9.0, 9.0]])
    ids = jnp.array([0, 0, 1, -1])
    # seed means (1, 0) and (3, 4): distance sqrt(4 + 16)
    np.testing.assert_allclose(seed_diversity_l2(h, ids, jnp.ones(4, bool), 3), math.sqrt(20), rtol=1e-5)


def _seed_batch(loss_type):
    """Two groups of 2 originals + 2 seed completions; hidden states depend on parameters."""
    token_mask = jnp.ones((2, 4, 3), bool)
    batch = {
        "token_mask": token_mask,
        "valid": jnp.ones((2, 4), bool),
        "ref_logp": jnp.full((2, 4, 3), -1.0),
        "advantages": jnp.array([[0.5, -0.5, 0.5, -0.5], [1.0, 0.0, -1.0, 0.0]]),
        "weights": jnp.full((2, 4), 0.25),
        "seed_ids": jnp.array([[-1, -1, 0, 1], [-1, -1, 0, 1]]),
        "is_seed_aug": jnp.array([[False, False, True, True]] * 2),
    }
    return batch


@pytest.mark.parametrize("name, loss_type", [("grpo", "infonce"), ("maxent", "ce")])
def test_seed_loss_gradient_reaches_the_parameters(name, loss_type):
    """Q21: the pooled states are not detached, so the seed loss trains the encoder."""
    batch = _seed_batch(loss_type)
    hidden_in = jax.random.normal(jax.random.key(1), (2, 4, 5, 3))
    head = init_seed_head(jax.random.key(2), 6, 2)
    info = InfoSeedSettings(num_seeds=2, lambda_=0.5, alpha_entropy=0.3, loss_type=loss_type)
    fn = functools.partial(get_objective(name), settings=ObjectiveSettings(info_seed=info))

    def loss_fn(kernel):
        pooled = pool_hidden(jnp.tanh(hidden_in @ kernel), jnp.ones((2, 4, 5), bool), "mean")
        extra = {"seed_hidden": pooled, "seed_logits": seed_head_logits(head, pooled)}
        return fn(jnp.full((2, 4, 3), -1.0), {**batch, **extra}, {"beta": 0.0})

    kernel = jax.random.normal(jax.random.key(3), (3, 6))
    (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(kernel)
    assert np.isfinite(float(loss)) and float(metrics["loss/seed"]) > 0
    assert float(jnp.linalg.norm(grad)) > 1e-4
    # the alpha term uses |w| (no NaN even with the signed GRPO advantages)
    assert np.isfinite(float(metrics["info_seed/entropy"]))
    np.testing.assert_allclose(metrics["seed/seed_aug_frac"], 0.5, **TOL)
    assert {"seed/seed_pred_acc", "seed/seed_pred_acc_aug", "seed/seed_diversity_l2", "seed/entropy/orig",
            "seed/entropy/seed_aug"} <= set(metrics)


def test_alpha_term_value():
    batch = _seed_batch("infonce")
    info = InfoSeedSettings(num_seeds=2, alpha_entropy=0.5)
    fn = jax.jit(functools.partial(get_objective("grpo"), settings=ObjectiveSettings(info_seed=info)))
    _, m = fn(jnp.full((2, 4, 3), -1.0), batch, {"beta": 0.0})
    # originals |A| = [.5, .5, 1, 0] -> p = [.25, .25, .5, 0]; seeds |A| = [.5, .5, 1, 0] too
    h = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    np.testing.assert_allclose(m["seed/entropy/orig"], h, rtol=1e-5)
    np.testing.assert_allclose(m["info_seed/entropy"], 0.0, atol=1e-6)
    np.testing.assert_allclose(m["loss"], m["loss/policy"], rtol=1e-6)
