"""One entry for the controllers after an optimizer step, in the order of spec 8.

Order: metrics describe the tau/beta this step used; then either (meta off) the beta rule and
the tau rule, or (meta on) the meta update when due - with the meta-controller on, the two
rules never run, even if every meta learning rate is 0. There is no broadcast step: the
caller feeds every host the same globally reduced statistics, so all hosts compute the same
new state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxent_jax.controllers.beta import beta_controller_enabled, update_beta
from maxent_jax.controllers.meta import MetaDiagnostics, effective_meta_lrs, meta_due, meta_update
from maxent_jax.controllers.settings import ControllerSettings
from maxent_jax.controllers.state import TAU_LOG_FLOOR, ControllerInputs, ControllerState
from maxent_jax.controllers.tau import active_entropy_target, sanitize_lr_scale, update_tau


def update_controllers(
    state: ControllerState,
    inputs: ControllerInputs,
    settings: ControllerSettings,
    step: jax.Array,
    lr_scale: jax.Array,
) -> tuple[ControllerState, dict[str, jax.Array]]:
    """Advance the controllers after optimizer step `step` (the global step after its increment).

    `lr_scale` = lr(s) / max(lr_0, 1e-12) of the policy schedule (spec 7.6); it scales the tau
    and meta learning rates. Returns the new state and the step's `train/...` metrics.
    Pure and jit/vmap-able (settings may be a jit argument: its numbers are leaves).
    """
    step = jnp.asarray(step, jnp.int32)
    target = active_entropy_target(settings, step)
    if settings.meta_enabled:
        ema, ema_set = state.entropy_ema, state.entropy_ema_set
        due = meta_due(settings, step)
        m_tau, m_beta, m_opt, diag = meta_update(
            state.tau, state.beta, state.meta_opt_state, inputs, settings, target, lr_scale
        )
        applied = due & diag.applied
        tau = jnp.where(applied, m_tau, state.tau)
        beta = jnp.where(applied, m_beta, state.beta)
        log_tau = jnp.where(applied, jnp.log(jnp.maximum(tau, TAU_LOG_FLOOR)), state.log_tau)
        opt_state = jax.tree.map(lambda new, old: jnp.where(applied, new, old), m_opt, state.meta_opt_state)
        diag = diag.replace(applied=applied)
        last_tau_grad = jnp.where(applied, diag.tau_grad, state.last_tau_grad)
        last_beta_grad = jnp.where(applied, diag.beta_grad, state.last_beta_grad)
    else:
        beta = update_beta(state.beta, inputs.kl, settings)
        tau, log_tau, ema, ema_set = update_tau(
            state.tau, state.log_tau, state.entropy_ema, state.entropy_ema_set,
            inputs.weight_entropy, settings, step, lr_scale,
        )
        opt_state, diag = state.meta_opt_state, None
        last_tau_grad, last_beta_grad = state.last_tau_grad, state.last_beta_grad
    new_state = ControllerState(
        tau=tau,
        log_tau=log_tau,
        beta=beta,
        entropy_ema=ema,
        entropy_ema_set=ema_set,
        prev_tau=state.tau,
        prev_beta=state.beta,
        step=step,
        meta_updates=state.meta_updates + (diag.applied.astype(jnp.int32) if diag is not None else 0),
        meta_opt_state=opt_state,
        last_tau_grad=last_tau_grad,
        last_beta_grad=last_beta_grad,
    )
    return new_state, controller_metrics(state, new_state, inputs, settings, step, lr_scale, target, diag)


def controller_metrics(
    used: ControllerState,
    new: ControllerState,
    inputs: ControllerInputs,
    settings: ControllerSettings,
    step: jax.Array,
    lr_scale: jax.Array,
    target: jax.Array | None,
    diag: MetaDiagnostics | None,
) -> dict[str, jax.Array]:
    """The controllers' `train/...` metrics of one step (spec 12.4 names; float32 scalars).

    tau/beta (and the deltas against the previous step) are the values *used* by this step's
    loss; EMA, target, errors and train/meta/* are what this step's update computed from the
    step's statistics (the reference logs the meta values one step late). train/meta/tau_grad and
    beta_grad are those of the last applied meta update; train/meta/loss is the potential at
    this step's values whether or not an update was due.
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    entropy, kl = f32(inputs.weight_entropy), f32(inputs.kl)
    has_target = target is not None
    target_v = f32(target) if has_target else f32(0.0)
    past_warmup = f32(step) > jnp.maximum(f32(settings.tau_warmup_steps), 0.0)
    ent_err = jnp.where(has_target, entropy - target_v, 0.0)
    kl_target = f32(settings.kl_target)
    kl_on = kl_target > 0
    delta_tau, delta_beta = used.tau - used.prev_tau, used.beta - used.prev_beta
    ema = jnp.where(new.entropy_ema_set, new.entropy_ema, entropy)
    out = {
        "train/tau": used.tau,
        "train/tau_log": used.log_tau,
        "train/beta": used.beta,
        "train/delta_tau": delta_tau,
        "train/delta_tau_abs": jnp.abs(delta_tau),
        "train/delta_beta": delta_beta,
        "train/delta_beta_abs": jnp.abs(delta_beta),
        "train/weight_entropy_ema": ema,
        "train/tau_target_entropy": target_v,
        "train/tau_target_enabled": f32(has_target),
        "train/tau_schedule_active": f32(has_target and not settings.meta_enabled) * past_warmup,
        "train/tau_lr": f32(settings.tau_lr) * sanitize_lr_scale(lr_scale),
        "train/tau_min": f32(settings.tau_min),
        "train/tau_max": f32(settings.tau_max),
        "train/tau_warmup_steps": f32(settings.tau_warmup_steps),
        "train/weight_entropy_error": ent_err,
        "train/weight_entropy_abs_error": jnp.abs(ent_err),
        "train/tau_loss": 0.5 * ent_err**2,
        "train/kl_error_to_target": jnp.where(kl_on, kl - kl_target, 0.0),
        "train/kl_ratio_to_target": jnp.where(kl_on, kl / jnp.maximum(kl_target, 1e-8), 0.0),
    }
    # One key per quantity: the reference also logs train/kl_coeff (= beta), train/kl_controller/*
    # and train/weighting/* copies of these; docs/telemetry.md maps them.
    for name, value in (
        ("target", kl_target),
        ("horizon", f32(settings.kl_horizon)),
        ("step_size", f32(settings.kl_ctl_step_size)),
        ("enabled", f32(beta_controller_enabled(settings))),
    ):
        out[f"train/kl_controller_{name}"] = value
    lr_tau, lr_beta = effective_meta_lrs(settings)
    zero = f32(0.0)
    tau_grad, beta_grad = new.last_tau_grad, new.last_beta_grad
    out.update({
        "train/meta/enabled": f32(settings.meta_enabled),
        "train/meta/lr": f32(settings.meta_lr),
        "train/meta/tau_lr": lr_tau,
        "train/meta/beta_lr": lr_beta,
        "train/meta/update_interval": f32(settings.meta_update_interval),
        "train/meta/truncation_steps": f32(settings.meta_truncation_steps),
        "train/meta/use_hessian": f32(settings.meta_use_hessian),
        "train/meta/updated": f32(diag.applied) if diag is not None else zero,
        "train/meta/tau_grad": tau_grad,
        "train/meta/beta_grad": beta_grad,
        "train/meta/grad_norm": jnp.sqrt(tau_grad**2 + beta_grad**2),
        "train/meta/loss": diag.loss if diag is not None else zero,
        "train/meta/tau_curvature": diag.tau_curvature if diag is not None else zero,
        "train/meta/tau_projected": f32(diag.tau_projected) if diag is not None else zero,
        "train/meta/beta_projected": f32(diag.beta_projected) if diag is not None else zero,
    })
    return {k: f32(v) for k, v in out.items()}
