"""The policy's differentiable pieces inside the train step: completion log-probs and the losses.

Step batches are group-major: every array leads with `[prompts, G, ...]` (so a micro-batch always
holds whole groups and the batch axis sharded over ('data', 'fsdp') is the prompt axis). The
decoder sees `[prompts * G, seq]` rows; completion log-probs come back as `[prompts, G, Tc]`,
the layout of `maxent_jax.objectives`.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from maxent_jax.model import adapter_dropout
from maxent_jax.objectives.groups import masked_mean
from maxent_jax.objectives.infoseed import pool_hidden
from maxent_jax.objectives.total_loss import batch_masks
from maxent_jax.packing import is_packed, packed_logprobs_and_hidden, packed_pooled
from maxent_jax.parallel.forward import SCORE_KEYS, completion_logprobs_and_hidden
from maxent_jax.parallel.train_step import STEP_KEY, SplitLoss

Array = jax.Array
ScoreOutput = tuple[Array, Array]


def _rows(x: Array) -> Array:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def completion_logprobs(model, batch: Mapping[str, Array], chunk_size: int, score_prompt_once: bool = False,
                        with_entropy: bool = False) -> ScoreOutput:
    """(log p of each completion token `[P, G, Tc]` float32, last hidden states `[P*G, L, D]`).

    `score_prompt_once`: each group's shared prompt goes through the model once (`model.score_prompt_once`).
    `with_entropy`: the first element is `[P, G, Tc, 2]`, the log-probs (differentiable) and the
    entropy of the policy's distribution at each position (constant: a metric, TRL's `entropy`),
    computed from the same logits block, so it costs one reduction and no second forward.
    A packed batch (`train.packing`, `maxent_jax.packing`) is scored on its buffers; its hidden states
    are then the buffers' `[B, L, D]`.
    """
    if is_packed(batch):
        scores, hidden = packed_logprobs_and_hidden(model, batch, chunk_size, return_entropy=with_entropy)
    else:
        p, g = batch["input_ids"].shape[:2]
        rows = {k: _rows(batch[k]) for k in SCORE_KEYS}
        scores, hidden = completion_logprobs_and_hidden(model, rows, chunk_size=chunk_size,
                                                        group=g if score_prompt_once else 1,
                                                        return_entropy=with_entropy)
        scores = jax.tree.map(lambda x: x.reshape(p, g, -1), scores)
    if with_entropy:
        logp, entropy = scores
        return jnp.stack([logp, jax.lax.stop_gradient(entropy)], axis=-1), hidden
    return scores, hidden


def sft_loss(chunk_size: int) -> SplitLoss:
    """Mean negative log-likelihood of the completion tokens (the supervised warm-up): a token sum over
    a count of the batch's mask, so row-separable."""

    def nll(logp: Array, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        mask = batch["completion_mask"].astype(jnp.float32)
        value = -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return value, {"sft/nll": value}

    return SplitLoss(score=lambda model, batch: completion_logprobs(model, batch, chunk_size)[0], objective=nll)


def rl_loss(objective: Callable, settings, chunk_size: int, pooling: str = "mean",
            score_prompt_once: bool = False, lora_dropout: float = 0.0) -> Callable:
    """The train step's loss: completion log-probs of the live policy, then the registered objective.

    `batch["beta"]` is the step's beta, passed as a traced scalar (`scalars` of the train step),
    so a changing beta never recompiles the step. With InfoSeed's InfoNCE term on, the pooled last hidden
    states of each scored row enter the batch undetached, so the auxiliary loss trains the
    policy (the reference detaches them, Q21); that term compares rows with each other, so only
    without it is the loss a `SplitLoss` (row-separable, what `train.gradient_chunks` needs).
    `lora_dropout` > 0: this forward, and no other, drops the LoRA adapters' inputs
    (`model.adapter_dropout`) with the train step's `STEP_KEY` (`make_train_step(rng_seed=...)`);
    dropout is per row and token, so the loss stays row-separable.
    """
    def live(model, batch: Mapping[str, Array]) -> ScoreOutput:
        """The live policy's training forward: the only one adapter dropout applies to."""
        with adapter_dropout.active(lora_dropout, batch.get(STEP_KEY)):
            return completion_logprobs(model, batch, chunk_size, score_prompt_once, True)

    def objective_of(scores: Array, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        """scores `[P, G, Tc, 2]`: log-probs and the (constant) token entropy, mean-logged as `entropy`."""
        token_logp, entropy = scores[..., 0], scores[..., 1]
        loss, metrics = objective(token_logp, batch, {"beta": batch["beta"]}, settings)
        _, token_mask = batch_masks(batch)
        return loss, {**metrics, "entropy": masked_mean(entropy, token_mask)}

    if settings.info_seed.lambda_ <= 0:  # the log-probs are the only way rows enter: separable
        return SplitLoss(
            score=lambda model, batch: live(model, batch)[0],
            objective=objective_of)

    def loss_fn(model, batch):
        scores, hidden = live(model, batch)
        p, g = batch["input_ids"].shape[:2]
        if is_packed(batch):
            pooled = packed_pooled(hidden, batch, pooling)
        else:
            pooled = pool_hidden(hidden.astype(jnp.float32), _rows(batch["attention_mask"]), pooling)
        return objective_of(scores, {**batch, "seed_hidden": pooled.reshape(p, g, -1)})

    return loss_fn
