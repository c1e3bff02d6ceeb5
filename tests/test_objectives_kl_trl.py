"""objective.kl_bias_correction against TRL's own GRPOTrainer._compute_loss on a fixed batch.

TRL is driven offline: `_compute_loss` is called on a stand-in trainer whose log-prob
function returns the batch's fixed per-token log-probs (a leaf tensor, so TRL's gradient
is read back too); everything else is TRL's code.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxent_jax.errors import UserError
from maxent_jax.objectives import ObjectiveSettings, get_objective

torch = pytest.importorskip("torch")
GRPOTrainer = pytest.importorskip("trl").GRPOTrainer

BETA, EPS_LOW, EPS_HIGH = 0.04, 0.2, 0.28


def _fixed_batch(seed=0, groups=2, members=4, tokens=6):
    rng = np.random.default_rng(seed)
    mask = np.zeros((groups, members, tokens), bool)
    for (p, g), n in np.ndenumerate(rng.integers(1, tokens + 1, (groups, members))):
        mask[p, g, :n] = True
    logp = np.where(mask, -rng.uniform(0.1, 2.5, mask.shape), 0.0).astype(np.float32)
    old = np.where(mask, logp + rng.normal(0, 0.2, mask.shape), 0.0).astype(np.float32)
    ref = np.where(mask, logp + rng.normal(0, 0.5, mask.shape), 0.0).astype(np.float32)
    adv = rng.normal(size=(groups, members)).astype(np.float32)
    return logp, old, ref, mask, adv


def _trl_loss_and_grad(logp, old, ref, mask, adv, loss_type, level, bias_correction):
    """Loss and d loss / d logp from TRL's `_compute_loss` (one micro-batch, no accumulation)."""
    flat = lambda x: torch.tensor(x.reshape(-1, x.shape[-1]))  # noqa: E731
    per_token_logps = flat(logp).requires_grad_(True)
    rows, tokens = per_token_logps.shape
    accelerator = types.SimpleNamespace(
        reduce=lambda t, reduction: t, gather=lambda t: t, gather_for_metrics=lambda t: t,
        num_processes=1, sync_gradients=True)
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.ones(rows, tokens), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
        beta=BETA, loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, use_vllm=False,
        max_completion_length=tokens, current_gradient_accumulation_steps=1, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, model=types.SimpleNamespace(training=True), accelerator=accelerator,
        _metrics={"train": __import__("collections").defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None, steps_per_generation=1),
    )
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, tokens, dtype=torch.long), "completion_mask": flat(mask).long(),
        "advantages": torch.tensor(adv.reshape(-1)), "old_per_token_logps": flat(old),
        "ref_per_token_logps": flat(ref), "num_items_in_batch": torch.tensor(float(mask.sum())),
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return float(loss.detach()), per_token_logps.grad.numpy().reshape(logp.shape)


def _ours(logp, old, ref, mask, adv, loss_type, level, bias_correction):
    s = ObjectiveSettings(loss_type=loss_type, importance_sampling_level=level, epsilon_low=EPS_LOW,
                          epsilon_high=EPS_HIGH, kl_estimator="k3", kl_bias_correction=bias_correction,
                          max_completion_length=logp.shape[-1])
    batch = {"token_mask": jnp.asarray(mask), "valid": jnp.ones(adv.shape, bool), "ref_logp": jnp.asarray(ref),
             "advantages": jnp.asarray(adv), "old_logp": jnp.asarray(old)}
    fn = lambda x: get_objective("grpo")(x, batch, {"beta": BETA}, s)  # noqa: E731
    (loss, _), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logp))
    return float(loss), np.asarray(grad)


@pytest.mark.parametrize("loss_type, level", [("bnpo", "token"), ("grpo", "token"), ("dapo", "sequence")])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_kl_bias_correction_matches_trl_compute_loss(loss_type, level, bias_correction):
    batch = _fixed_batch()
    trl_loss, trl_grad = _trl_loss_and_grad(*batch, loss_type, level, bias_correction)
    loss, grad = _ours(*batch, loss_type, level, bias_correction)
    assert loss == pytest.approx(trl_loss, rel=1e-5)
    np.testing.assert_allclose(grad, np.where(batch[3], trl_grad, 0.0), rtol=1e-4, atol=1e-7)


def test_the_correction_changes_the_loss_and_needs_a_token_estimator():
    batch = _fixed_batch(seed=1)
    on, _ = _ours(*batch, "bnpo", "token", True)
    off, _ = _ours(*batch, "bnpo", "token", False)
    assert on != pytest.approx(off, rel=1e-4)
    with pytest.raises(UserError, match="kl_bias_correction=True is not valid with objective.kl_estimator='sequence_k3'"):
        ObjectiveSettings(kl_bias_correction=True)
