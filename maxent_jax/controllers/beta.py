"""The beta (KL) controller, spec 8.1: a multiplicative step toward a KL target."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxent_jax.controllers.settings import ControllerSettings


def beta_controller_enabled(settings: ControllerSettings) -> jax.Array:
    """On iff kl_target, kl_horizon and kl_ctl_step_size are all > 0 (all default 0: off)."""
    return (
        (jnp.asarray(settings.kl_target) > 0)
        & (jnp.asarray(settings.kl_horizon) > 0)
        & (jnp.asarray(settings.kl_ctl_step_size) > 0)
    )


def update_beta(beta: jax.Array, kl: jax.Array, settings: ControllerSettings) -> jax.Array:
    """One step of the KL controller.

    e = clip(KL / max(KL*, 1e-8) - 1, +-step_size); beta <- max(0, beta * (1 + e / max(1, horizon))),
    with a non-positive scale replaced by 1e-6. No-op when disabled, when KL is not finite,
    or when |e| < 1e-8 before clipping. `beta`, `kl`: float32 scalars.
    """
    kl = jnp.asarray(kl, jnp.float32)
    target = jnp.asarray(settings.kl_target, jnp.float32)
    step_size = jnp.asarray(settings.kl_ctl_step_size, jnp.float32)
    err = kl / jnp.maximum(target, 1e-8) - 1.0
    err_clipped = jnp.clip(err, -step_size, step_size)
    scale = 1.0 + err_clipped / jnp.maximum(1.0, jnp.asarray(settings.kl_horizon, jnp.float32))
    scale = jnp.where(scale <= 0, 1e-6, scale)
    moved = jnp.maximum(0.0, beta * scale)
    apply = beta_controller_enabled(settings) & jnp.isfinite(kl) & (jnp.abs(err) >= 1e-8)
    return jnp.where(apply, moved, beta).astype(jnp.float32)
