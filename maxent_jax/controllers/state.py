"""The controllers' state and the statistics that feed them, both as pytrees.

`ControllerState` is checkpointed with the rest of the train state (Orbax) and mirrored to
`controller_state.json` (see `persistence.py`). All scalars are float32 (int32 counters), so
the state jits, vmaps and round-trips exactly.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from maxent_jax.controllers.settings import ControllerSettings

TAU_LOG_FLOOR = 1e-8  # log_tau = log(max(tau, 1e-8)), as the reference


@flax.struct.dataclass
class ControllerState:
    """tau, beta and what their updates carry from step to step (all float32 / int32 scalars).

    tau, log_tau: the MaxEnt temperature and its log (log(max(tau, 1e-8))); the tau rule
        accumulates in log space.
    beta: the KL / reference coefficient.
    entropy_ema, entropy_ema_set: the 0.9 EMA of the weight entropy; unset until the first
        statistic arrives (a flag instead of the reference's NaN sentinel).
    prev_tau, prev_beta: the values used by the previous optimizer step (for delta metrics).
    step: the last global step the controllers saw; meta_updates: meta updates applied.
    meta_opt_state: the optax state of the meta optimizer over {"tau", "beta"}.
    last_tau_grad, last_beta_grad: the gradients of the last meta update.
    """

    tau: jax.Array
    log_tau: jax.Array
    beta: jax.Array
    entropy_ema: jax.Array
    entropy_ema_set: jax.Array
    prev_tau: jax.Array
    prev_beta: jax.Array
    step: jax.Array
    meta_updates: jax.Array
    meta_opt_state: Any
    last_tau_grad: jax.Array
    last_beta_grad: jax.Array


@flax.struct.dataclass
class ControllerInputs:
    """The statistics of one optimizer step, reduced by the caller.

    weight_entropy: mean per-group weight entropy (spec 6.4) over *every* group of the whole
        accumulation window on *all* hosts (the reference uses the last micro-batch only).
    kl: token-weighted KL (spec 7.3) over the whole window and all hosts, i.e.
        sum_i k_i n_i / sum_i n_i across everything (the reference: last micro-batch, rank 0).
    q, ref_logp_sum, valid, lengths: `[prompts, group]` arrays of the step's batch, needed
        only by the `first_order` / `truncated_backprop` meta methods to rebuild the
        closed-form weights w(tau, beta) of spec 6.3: listwise target q, summed reference
        log-probs S_ref, a mask of real completions, completion token counts n (the same
        arrays the weights were computed from). None for the other controllers.
    """

    weight_entropy: jax.Array
    kl: jax.Array
    q: jax.Array | None = None
    ref_logp_sum: jax.Array | None = None
    valid: jax.Array | None = None
    lengths: jax.Array | None = None


def meta_param_template(tau: jax.Array, beta: jax.Array) -> dict[str, jax.Array]:
    """The meta optimizer's parameter tree: plain {"tau", "beta"} float32 scalars."""
    return {"tau": jnp.asarray(tau, jnp.float32), "beta": jnp.asarray(beta, jnp.float32)}


def meta_direction_transform(settings: ControllerSettings) -> optax.GradientTransformation:
    """The optax transform turning meta gradients into descent directions (learning rate 1).

    The per-leaf learning rates (tau vs beta) and the LR-schedule scale change every step, so
    they multiply the direction afterwards (`meta.py`); this is exact for SGD and for the
    torch-default Adam/AdamW (betas 0.9/0.999, eps 1e-8, AdamW weight decay 0.01).
    """
    if settings.meta_optimizer == "sgd":
        return optax.identity()
    adam = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
    if settings.meta_optimizer == "adam":
        return adam
    return optax.chain(adam, optax.add_decayed_weights(0.01))


def init_controller_state(settings: ControllerSettings, step: int = 0) -> ControllerState:
    """Fresh state from the config values (spec 6.1 / 8.2 initial values)."""
    tau = jnp.asarray(settings.tau_init, jnp.float32)
    beta = jnp.asarray(settings.beta_init, jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    return ControllerState(
        tau=tau,
        log_tau=jnp.log(jnp.maximum(tau, TAU_LOG_FLOOR)),
        beta=beta,
        entropy_ema=zero,
        entropy_ema_set=jnp.zeros((), jnp.bool_),
        prev_tau=tau,
        prev_beta=beta,
        step=jnp.asarray(step, jnp.int32),
        meta_updates=jnp.zeros((), jnp.int32),
        meta_opt_state=meta_direction_transform(settings).init(meta_param_template(tau, beta)),
        last_tau_grad=zero,
        last_beta_grad=zero,
    )
