"""A collected batch -> the update's arrays: grouping, packing, reference log-probs, the objective's
pre-step arrays (MaxEnt weights or GRPO advantages) and the controllers' inputs.

Host code around jitted programs: the reference forward (`parallel/forward.py`, or the packed one
in `packing.py`) and the objective's pre-step function, compiled once by `objective_prep`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from maxent_jax import packing
from maxent_jax.controllers.state import ControllerInputs, ControllerState
from maxent_jax.objectives.grpo import prepare_grpo_batch
from maxent_jax.objectives.maxent import listwise_target, prepare_maxent_batch
from maxent_jax.parallel.distributed import global_batch, host_rows, mean_over_hosts, read_scalars
from maxent_jax.parallel.forward import SCORE_KEYS, make_logprob_fn
from maxent_jax.rollout.producer import Rollout
from maxent_jax.run_setup import Policy

Arrays = dict[str, np.ndarray]


def objective_prep(config: ml_collections.ConfigDict) -> Callable[..., Any]:
    """The objective's pre-step arrays in one compiled program: run eagerly they were dozens of
    small dispatches per step, a real cost on a GPU where the whole small-model step is ~60 ms.

    GRPO: `(utilities, valid) -> (advantages, stats)`; MaxEnt:
    `(utilities, valid, ref_sum, lengths, tau, beta) -> (weights, stats)`."""
    if config.objective.train_grpo_objective:
        return jax.jit(functools.partial(prepare_grpo_batch, scale_rewards=config.objective.scale_rewards))
    m = config.maxent
    return jax.jit(functools.partial(prepare_maxent_batch, q_temperature=m.q_temperature, q_epsilon=m.q_epsilon,
                                     length_normalize_ref=m.length_normalize_ref))


def reference_programs(config: ml_collections.ConfigDict, policy: Policy, params: Any, mesh: Mesh, rules: Any, *,
                       group: int, batch_devices: int) -> tuple[Callable[..., Any], Any, Callable[..., Any] | None]:
    """The compiled reference forwards: `score` on the padded score batch, and with `train.packing`
    the packer and `packed_score` on its buffers (None, None without)."""
    c = config
    # Reference log-probs in the update's micro-batches: scored all at once, a step's rows (512 prompts
    # x 16 for the 1.5B recipes) needed ~650 GB per device of activations (python -m maxent_jax.plan).
    score = make_logprob_fn(policy.graphdef, policy.rest, params, mesh, rules, chunk_size=c.model.logprob_chunk_size,
                            micro_batches=c.train.gradient_accumulation_steps,
                            group=group if c.model.score_prompt_once else 1)
    packer = packing.packer_for(c, policy.model_cfg, batch_devices, policy.pad_id) if c.train.packing else None
    if packer is None:  # off, or several host processes (`packer_for`)
        return score, None, None
    packed_score = packing.make_packed_logprob_fn(policy.graphdef, policy.rest, params, mesh, rules,
                                                  chunk_size=c.model.logprob_chunk_size, chunks=c.train.gradient_chunks)
    return score, packer, packed_score


def grouped(batch: Arrays, group: int) -> Arrays:
    """`[P * G, ...]` rows -> `[P, G, ...]`: the group-major layout of every step array."""
    return {k: v.reshape(-1, group, *v.shape[1:]) for k, v in batch.items()}


def micro_batched(arrays: Arrays, micro_batches: int, mesh: Mesh, rules: Any) -> dict[str, jax.Array]:
    """[P, ...] -> [num_micro, P / num_micro, ...]: micro-batches of whole groups, assembled into
    the global batch from every host's slice."""
    return global_batch({k: v.reshape(micro_batches, -1, *v.shape[1:]) for k, v in arrays.items()}, mesh, rules)


def reference_logprobs(batch: Arrays, packed: Arrays, params: Any, *, score: Callable[..., Any],
                       packed_score: Callable[..., Any] | None, micro_batches: int, mesh: Mesh,
                       rules: Any) -> np.ndarray:
    """`[P * G, Tc]` log-probs of `params` (the policy's or the reference's) on the step's rows: on
    the packed buffers when `packed` holds them (`train.packing`), else on the padded score batch."""
    if packing.is_packed(packed):
        logp = packed_score(params, micro_batched(packed, micro_batches, mesh, rules))
        return np.asarray(logp).reshape(batch["completion_ids"].shape)
    rows = global_batch({k: batch[k] for k in SCORE_KEYS}, mesh, rules, micro_batched=False)
    return host_rows(score(params, rows), mesh, rules)


def prepare(ro: Rollout, keep: np.ndarray, *, config: ml_collections.ConfigDict, group: int,
            packer: Callable[[Arrays], tuple[Arrays, dict[str, float]]] | None,
            reference_logprobs: Callable[[Arrays, Arrays], np.ndarray], prepare_objective: Callable[..., Any],
            controllers: ControllerState, meta_needs_batch: bool) -> tuple[Arrays, dict[str, float], ControllerInputs]:
    """Reference statistics and the objective's pre-step arrays (weights or advantages);
    `keep` `[P]`: the groups trained on (the others are marked invalid).

    Returns the update's arrays `[P, G, ...]`, the step's statistics and the controllers' inputs
    (`kl` still zero: the update measures it)."""
    c = config
    arrays = grouped(ro.batch, group)
    mask = arrays["completion_mask"]
    valid = np.repeat(keep[:, None], group, 1)
    if ro.valid is not None:  # dynamic sampling's filler groups
        valid &= ro.valid
    lengths = mask.sum(-1).astype(np.float32)
    packed, pack_stats = packer(arrays) if packer else ({}, {})
    ref_logp = reference_logprobs(ro.batch, {**packed, "completion_mask": mask}).reshape(mask.shape)
    ref_sum = (ref_logp * mask).sum(-1)
    if c.objective.train_grpo_objective:
        advantages, stats = prepare_objective(ro.utilities, valid)
        extra = {"advantages": np.asarray(advantages)}
    else:
        weights, stats = prepare_objective(ro.utilities, valid, ref_sum, lengths, controllers.tau, controllers.beta)
        extra = {"weights": np.asarray(weights)}
    stats = {**read_scalars(stats), **pack_stats}
    # Spec 5.3's reference statistics: mean summed reference log-prob and mean scored tokens per completion.
    stats["ref_logp_mean"] = float(ref_sum.mean())
    stats["avg_completion_tokens"] = float(lengths.mean())
    if not c.vllm.return_logprobs:  # ratio against the policy's own (stop-gradient) log-probs
        arrays.pop("behaviour_logp", None)
    arrays = {**arrays, **packed, "token_mask": mask, "valid": valid, "ref_logp": ref_logp, **extra}
    inputs = ControllerInputs(
        weight_entropy=jnp.asarray(mean_over_hosts(stats.get("weight_entropy", 0.0)), jnp.float32),
        kl=jnp.zeros((), jnp.float32),
        q=(listwise_target(jnp.asarray(ro.utilities), jnp.asarray(valid), c.maxent.q_temperature,
                           c.maxent.q_epsilon) if meta_needs_batch else None),
        ref_logp_sum=jnp.asarray(ref_sum),
        valid=jnp.asarray(valid), lengths=jnp.asarray(lengths))
    return arrays, stats, inputs
