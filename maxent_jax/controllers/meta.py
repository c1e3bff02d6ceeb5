"""The meta-controller, spec 8.3: tau and beta as parameters of an optax optimizer.

Gradients, by `controller_meta.method`:
  analytic            the reference's proxies g_tau = H - H*, g_beta = -clip(KL - KL*, +-c)
                      (the raw KL - KL* is what is logged as beta_grad, as in the reference).
  first_order         g_tau = d/dtau 0.5 (H(w(tau, beta)) - H*)^2, exact through the closed-form
                      weights of the step's batch (`potential.py`); g_beta the clipped KL proxy
                      (KL depends on beta only through future policy updates).
  truncated_backprop  g_tau = d/dtau_0 of 0.5 (H(tau_T, beta_T) - H*)^2 after T unrolled proxy
                      controller steps (lax.scan) on the same batch; g_beta as above.
  use_hessian         (first_order / truncated_backprop with sgd) a safeguarded Newton step in
                      log tau: the tau coordinate is log tau, its "gradient" is f'/h with h the
                      exact second derivative, floored at the Gauss-Newton curvature.
The entropy potential is differentiated with respect to tau only: beta stays the KL
coefficient, driven by the KL target alone, as in the reference.
Each meta update takes `analytic_steps` optimizer steps on the same statistics; the learning
rates are lr_tau * lr_scale and lr_beta * lr_scale; tau is projected into its bounds and
beta onto >= 0 after every step.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from maxent_jax.controllers.potential import mean_weight_entropy
from maxent_jax.controllers.settings import ControllerSettings
from maxent_jax.controllers.state import TAU_LOG_FLOOR, ControllerInputs, meta_direction_transform, meta_param_template
from maxent_jax.controllers.tau import sanitize_lr_scale, tau_bounds

MAX_NEWTON_LOG_STEP = 1.0  # |Newton step in log tau| <= 1 (tau changes by at most a factor e)


@flax.struct.dataclass
class MetaDiagnostics:
    """What one meta update computed (float32 scalars; `applied` is bool)."""

    tau_grad: jax.Array
    beta_grad: jax.Array  # the raw KL - KL* the reference logs; the applied step uses -clip(KL - KL*)
    loss: jax.Array
    tau_curvature: jax.Array
    tau_projected: jax.Array
    beta_projected: jax.Array
    applied: jax.Array


def effective_meta_lrs(settings: ControllerSettings) -> tuple[jax.Array, jax.Array]:
    """(lr_tau, lr_beta): the per-parameter rate if > 0, else controller_meta.lr."""
    lr = jnp.asarray(settings.meta_lr, jnp.float32)
    tau_lr = jnp.asarray(settings.meta_tau_lr, jnp.float32)
    beta_lr = jnp.asarray(settings.meta_beta_lr, jnp.float32)
    return jnp.where(tau_lr > 0, tau_lr, lr), jnp.where(beta_lr > 0, beta_lr, lr)


def meta_due(settings: ControllerSettings, step: jax.Array) -> jax.Array:
    """Whether a meta update runs after global step `step` (already incremented): on and
    some learning rate > 0 and (step + 1) % update_interval == 0, as the reference."""
    if not settings.meta_enabled:
        return jnp.zeros((), jnp.bool_)
    lr_tau, lr_beta = effective_meta_lrs(settings)
    interval = jnp.asarray(settings.meta_update_interval, jnp.int32)
    on_time = jnp.mod(jnp.asarray(step, jnp.int32) + 1, jnp.maximum(interval, 1)) == 0
    return ((lr_tau > 0) | (lr_beta > 0)) & on_time


def _kl_terms(
    inputs: ControllerInputs, settings: ControllerSettings
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(applied beta gradient -clip(KL - KL*), raw KL - KL*, KL potential term, KL target on).

    The step uses the clipped proxy; the raw error is what the reference logs as
    `train/meta/beta_grad` (spec 8.3), so a user sees how far KL is from its target even
    when the clip hides it from the update.
    """
    kl_target = jnp.asarray(settings.kl_target, jnp.float32)
    on = kl_target > 0
    err = jnp.asarray(inputs.kl, jnp.float32) - kl_target
    clip = jnp.asarray(settings.meta_beta_grad_clip, jnp.float32)
    clipped = jnp.where(clip > 0, jnp.clip(err, -clip, clip), err)
    return jnp.where(on, -clipped, 0.0), jnp.where(on, err, 0.0), jnp.where(on, 0.5 * err**2, 0.0), on


def _entropy_fn(inputs: ControllerInputs, settings: ControllerSettings) -> Callable[[jax.Array, jax.Array], jax.Array]:
    batch = (inputs.q, inputs.ref_logp_sum, inputs.valid, inputs.lengths)
    if any(x is None for x in batch):
        raise ValueError(
            f"controller_meta.method={settings.meta_method!r} needs ControllerInputs.q, .ref_logp_sum, .valid "
            "and .lengths (the step's batch) to rebuild the closed-form weights"
        )
    return lambda tau, beta: mean_weight_entropy(tau, beta, *batch, settings.length_normalize_ref)


def _entropy_loss_fn(
    inputs: ControllerInputs,
    settings: ControllerSettings,
    target: jax.Array,
    lr_scale: jax.Array,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """f(tau, beta): the entropy potential the first_order / truncated_backprop methods differentiate."""
    entropy = _entropy_fn(inputs, settings)
    if settings.meta_method == "first_order":
        return lambda tau, beta: 0.5 * (entropy(tau, beta) - target) ** 2

    lr_tau, lr_beta = effective_meta_lrs(settings)
    beta_grad, _, _, _ = _kl_terms(inputs, settings)
    lower, upper = tau_bounds(settings)

    def unrolled(tau: jax.Array, beta: jax.Array) -> jax.Array:
        def inner(carry: tuple[jax.Array, jax.Array], _: None) -> tuple[tuple[jax.Array, jax.Array], None]:
            t, b = carry
            t = jnp.clip(t - lr_tau * lr_scale * (entropy(t, b) - target), lower, upper)
            b = jnp.maximum(0.0, b - lr_beta * lr_scale * beta_grad)
            return (t, b), None

        (t, b), _ = jax.lax.scan(inner, (tau, beta), None, length=settings.meta_truncation_steps)
        return 0.5 * (entropy(t, b) - target) ** 2

    return unrolled


def _tau_gradient(
    tau: jax.Array,
    beta: jax.Array,
    inputs: ControllerInputs,
    settings: ControllerSettings,
    target: jax.Array | None,
    lr_scale: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tau-coordinate gradient or Newton direction, curvature, entropy potential) at (tau, beta)."""
    zero = jnp.zeros((), jnp.float32)
    if target is None:
        return zero, zero, zero
    if settings.meta_method == "analytic":
        err = jnp.asarray(inputs.weight_entropy, jnp.float32) - target
        return err, zero, 0.5 * err**2
    loss_fn = _entropy_loss_fn(inputs, settings, target, lr_scale)
    if not settings.meta_use_hessian:
        loss, grad = jax.value_and_grad(loss_fn)(tau, beta)
        return grad, zero, loss

    def in_log_tau(u: jax.Array) -> jax.Array:
        return loss_fn(jnp.exp(u), beta)

    u = jnp.log(jnp.maximum(tau, TAU_LOG_FLOOR))
    loss, grad = jax.value_and_grad(in_log_tau)(u)
    curvature = jax.grad(jax.grad(in_log_tau))(u)
    # f = 0.5 e^2 => f'' = e'^2 + e e''; e'^2 = f'^2 / (2 f) is the Gauss-Newton curvature, >= 0.
    gauss_newton = grad**2 / jnp.maximum(2.0 * loss, 1e-30)
    safe = jnp.maximum(curvature, gauss_newton)
    direction = jnp.where(safe > 1e-12, grad / jnp.maximum(safe, 1e-12), 0.0)
    direction = jnp.clip(direction, -MAX_NEWTON_LOG_STEP, MAX_NEWTON_LOG_STEP)
    return direction, safe, loss


def _one_step(
    params: dict[str, jax.Array],
    opt_state: Any,
    inputs: ControllerInputs,
    settings: ControllerSettings,
    target: jax.Array | None,
    lr_scale: jax.Array,
) -> tuple[dict[str, jax.Array], Any, MetaDiagnostics]:
    """One optimizer step on {"tau", "beta"}; returns projected params, optimizer state, diagnostics."""
    tau, beta = params["tau"], params["beta"]
    tau_grad, curvature, entropy_loss = _tau_gradient(tau, beta, inputs, settings, target, lr_scale)
    beta_grad, kl_error, kl_loss, beta_on = _kl_terms(inputs, settings)
    grads = {"tau": tau_grad.astype(jnp.float32), "beta": beta_grad.astype(jnp.float32)}
    directions, opt_state = meta_direction_transform(settings).update(grads, opt_state, params)
    lr_tau, lr_beta = effective_meta_lrs(settings)
    lower, upper = tau_bounds(settings)
    if settings.meta_use_hessian:
        u = jnp.log(jnp.maximum(tau, TAU_LOG_FLOOR)) - lr_tau * lr_scale * directions["tau"]
        raw_tau = jnp.exp(u)
    else:
        raw_tau = tau - lr_tau * lr_scale * directions["tau"]
    raw_beta = beta - lr_beta * lr_scale * directions["beta"]
    new_tau = jnp.clip(raw_tau, lower, upper) if target is not None else tau
    new_beta = jnp.where(beta_on, jnp.maximum(raw_beta, 0.0), beta)
    diag = MetaDiagnostics(
        tau_grad=grads["tau"],
        beta_grad=kl_error,
        loss=(entropy_loss + kl_loss).astype(jnp.float32),
        tau_curvature=curvature.astype(jnp.float32),
        tau_projected=jnp.asarray(target is not None) & (new_tau != raw_tau),
        beta_projected=new_beta <= 0,
        applied=jnp.ones((), jnp.bool_),
    )
    return {"tau": new_tau.astype(jnp.float32), "beta": new_beta.astype(jnp.float32)}, opt_state, diag


def meta_update(
    tau: jax.Array,
    beta: jax.Array,
    opt_state: Any,
    inputs: ControllerInputs,
    settings: ControllerSettings,
    target: jax.Array | None,
    lr_scale: jax.Array,
) -> tuple[jax.Array, jax.Array, Any, MetaDiagnostics]:
    """`analytic_steps` meta optimizer steps on the step's statistics.

    Returns (tau, beta, opt_state, diagnostics of the first step, i.e. at the incoming values).
    Skips everything (state unchanged, applied=False) when the statistics are not finite.
    """
    lr_scale = sanitize_lr_scale(lr_scale)
    params = meta_param_template(tau, beta)
    params1, state1, first = _one_step(params, opt_state, inputs, settings, target, lr_scale)

    def more(carry: tuple[dict[str, jax.Array], Any], _: None) -> tuple[tuple[dict[str, jax.Array], Any], None]:
        p, s, _d = _one_step(*carry, inputs, settings, target, lr_scale)
        return (p, s), None

    (params_n, state_n), _ = jax.lax.scan(more, (params1, state1), None, length=settings.meta_analytic_steps - 1)
    finite = (
        jnp.isfinite(first.tau_grad)
        & jnp.isfinite(first.beta_grad)
        & jnp.isfinite(params_n["tau"])
        & jnp.isfinite(params_n["beta"])
    )
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    return (
        keep(params_n["tau"], tau),
        keep(params_n["beta"], beta),
        jax.tree.map(keep, state_n, opt_state),
        first.replace(applied=finite),
    )
