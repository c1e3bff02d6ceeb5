"""`train/entropy`: the mean entropy of the policy's next-token distribution over completion tokens (TRL's
`entropy`), taken from the train step's own logits block, against the full logits written out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxent_jax.model import Decoder
from maxent_jax.objectives import ObjectiveSettings, get_objective
from maxent_jax.policy import rl_loss
from tests.test_gradient_chunks import CFG, COMPLETION, PROMPT, _step_batch


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [0, 4])
def test_entropy_metric_is_the_masked_mean_token_entropy(chunk_size):
    model = Decoder(CFG, rngs=nnx.Rngs(3))
    batch = {k: jnp.asarray(v[0]) for k, v in _step_batch(4).items()}
    loss = rl_loss(get_objective("grpo"), ObjectiveSettings(), chunk_size=chunk_size)
    value, metrics = loss(model, {**batch, "beta": jnp.float32(0.04)})
    assert np.isfinite(float(value))

    rows = {k: np.asarray(batch[k]).reshape(-1, *batch[k].shape[2:])
            for k in ("input_ids", "positions", "attention_mask")}
    hidden, _ = model(*(jnp.asarray(rows[k]) for k in ("input_ids", "positions", "attention_mask")))
    logits = np.asarray(model.logits(hidden[:, PROMPT - 1:PROMPT - 1 + COMPLETION]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    entropy = -(np.exp(logp) * logp).sum(-1).reshape(np.asarray(batch["token_mask"]).shape)
    mask = np.asarray(batch["token_mask"]) & np.asarray(batch["valid"])[..., None]
    assert float(metrics["entropy"]) == pytest.approx(entropy[mask].mean(), rel=1e-5)
    assert 0 < float(metrics["entropy"]) <= np.log(CFG.vocab_size)


@pytest.mark.slow
def test_entropy_does_not_change_the_gradient():
    """The entropy rides along as a constant: the loss's gradient is the log-probs' alone."""
    model = Decoder(CFG, rngs=nnx.Rngs(3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = {**{k: jnp.asarray(v[0]) for k, v in _step_batch(4).items()}, "beta": jnp.float32(0.04)}
    settings = ObjectiveSettings()
    loss = rl_loss(get_objective("maxent"), settings, chunk_size=0)

    def plain(p):
        from maxent_jax.policy import completion_logprobs

        logp, _ = completion_logprobs(nnx.merge(graphdef, p, rest), batch, 0)
        return get_objective("maxent")(logp, batch, {"beta": batch["beta"]}, settings)[0]

    ours = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), batch)[0])(params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(jax.grad(plain)(params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
