"""The tau (weight-entropy) controller, spec 8.2: a log-space step toward an entropy target.

The error is measured against a 0.9 EMA of the weight entropy; the target can be annealed
linearly; tau is kept in [tau_min, tau_max] where tau_max = 0 means "no upper bound" (the
reference clamps to 0 then, Q16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxent_jax.controllers.settings import ControllerSettings
from maxent_jax.controllers.state import TAU_LOG_FLOOR

EMA_DECAY = 0.9


def active_entropy_target(settings: ControllerSettings, step: jax.Array) -> jax.Array | None:
    """The entropy target at global step `step`, or None when no target is configured.

    Without _start/_final: the base target. Otherwise start/final default to the base target,
    and with horizon h > 0 the target moves linearly start -> final over steps [0, h]
    (horizon <= 0: final). None (a static decision) when base, start and final are all unset.
    """
    base = settings.target_weight_entropy
    start, final = settings.target_weight_entropy_start, settings.target_weight_entropy_final
    if start is None and final is None:
        return None if base is None else jnp.asarray(base, jnp.float32)
    start = base if start is None else start
    final = base if final is None else final
    if start is None or final is None:  # only one end set and no base: hold the end that is set
        start = final if start is None else start
        final = start if final is None else final
    start, final = jnp.asarray(start, jnp.float32), jnp.asarray(final, jnp.float32)
    horizon = jnp.asarray(settings.target_weight_entropy_horizon, jnp.float32)
    frac = jnp.minimum(jnp.maximum(jnp.asarray(step, jnp.float32), 0.0), horizon) / jnp.maximum(horizon, 1.0)
    return jnp.where(horizon > 0, start + (final - start) * frac, final)


def tau_bounds(settings: ControllerSettings) -> tuple[jax.Array, jax.Array]:
    """(lower, upper) bounds for tau: [max(tau_min, 0), tau_max or +inf when tau_max <= 0]."""
    lower = jnp.maximum(jnp.asarray(settings.tau_min, jnp.float32), 0.0)
    tau_max = jnp.asarray(settings.tau_max, jnp.float32)
    return lower, jnp.where(tau_max > 0, tau_max, jnp.inf)


def sanitize_lr_scale(lr_scale: jax.Array) -> jax.Array:
    """max(lr_scale, 0), with a non-finite scale read as 1 (spec 8.2)."""
    lr_scale = jnp.asarray(lr_scale, jnp.float32)
    return jnp.where(jnp.isfinite(lr_scale), jnp.maximum(lr_scale, 0.0), 1.0)


def update_tau(
    tau: jax.Array,
    log_tau: jax.Array,
    ema: jax.Array,
    ema_set: jax.Array,
    entropy: jax.Array,
    settings: ControllerSettings,
    step: jax.Array,
    lr_scale: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One step of the tau controller at global step `step` (already incremented).

    Returns (tau, log_tau, ema, ema_set). The EMA is seeded with the entropy (or tau if the
    entropy is not finite) even during warmup; afterwards, past warmup, with a target and a
    finite entropy: ema <- 0.9 ema + 0.1 H; log_tau += tau_lr * lr_scale * (target - ema);
    tau = clip(exp(log_tau), bounds); log_tau = log(max(tau, 1e-8)).
    """
    entropy = jnp.asarray(entropy, jnp.float32)
    finite = jnp.isfinite(entropy)
    ema = jnp.where(ema_set, ema, jnp.where(finite, entropy, tau)).astype(jnp.float32)
    ema_set = jnp.ones((), jnp.bool_)
    target = active_entropy_target(settings, step)
    if target is None:
        return tau, log_tau, ema, ema_set
    past_warmup = jnp.asarray(step, jnp.float32) > jnp.maximum(jnp.asarray(settings.tau_warmup_steps, jnp.float32), 0.0)
    track = past_warmup & finite
    new_ema = EMA_DECAY * ema + (1.0 - EMA_DECAY) * entropy
    err = target - new_ema
    lr_eff = jnp.asarray(settings.tau_lr, jnp.float32) * sanitize_lr_scale(lr_scale)
    lower, upper = tau_bounds(settings)
    new_tau = jnp.clip(jnp.exp(log_tau + lr_eff * err), lower, upper)
    new_log_tau = jnp.log(jnp.maximum(new_tau, TAU_LOG_FLOOR))
    move = track & (jnp.abs(err) >= 1e-12)
    return (
        jnp.where(move, new_tau, tau).astype(jnp.float32),
        jnp.where(move, new_log_tau, log_tau).astype(jnp.float32),
        jnp.where(track, new_ema, ema).astype(jnp.float32),
        ema_set,
    )
