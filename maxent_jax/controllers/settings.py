"""Controller hyper-parameters as plain Python values, taken once out of the ConfigDict.

`ControllerSettings` is a frozen, keyword-only dataclass registered as a JAX pytree: the
numeric hyper-parameters (learning rates, targets, bounds) are leaves, so a batch of configs
can be stacked and `jax.vmap`-ed; the choices that change the program (method, optimizer,
loop lengths, whether a target exists) are static metadata. The controller math never reads
a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from maxent_jax.errors import UserError

META_METHODS = ("analytic", "first_order", "truncated_backprop")
META_OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControllerSettings:
    """Everything the beta, tau and meta controllers need (spec 8, 13.2 names in comments)."""

    # beta (KL) controller, spec 8.1
    beta_init: float  # objective.beta (init_kl_coeff)
    kl_target: float = 0.0
    kl_horizon: float = 0.0
    kl_ctl_step_size: float = 0.0
    # tau (weight-entropy) controller, spec 8.2
    tau_init: float = 0.0  # maxent.tau
    target_weight_entropy: float | None = None
    target_weight_entropy_start: float | None = None
    target_weight_entropy_final: float | None = None
    target_weight_entropy_horizon: float = 0.0
    tau_lr: float = 0.0
    tau_min: float = 0.0
    tau_max: float = 0.0  # 0 = no upper bound (Q16)
    tau_warmup_steps: float = 0.0  # already resolved: -1 was replaced by the optimizer warmup (Q17)
    length_normalize_ref: bool = True  # maxent.length_normalize_ref: the closed-form weights of 6.3
    # meta-controller, spec 8.3
    meta_enabled: bool = False
    meta_method: str = "analytic"
    meta_lr: float = 0.0
    meta_tau_lr: float = 0.0
    meta_beta_lr: float = 0.0
    meta_beta_grad_clip: float = 0.0
    meta_update_interval: float = 1.0
    meta_objective: str = "potential"
    meta_analytic_steps: int = 1
    meta_optimizer: str = "sgd"
    meta_truncation_steps: int = 1
    meta_use_hessian: bool = False
    # resume
    overwrite_from_config: bool = False

    @classmethod
    def from_config(cls, cfg: Any, *, optimizer_warmup_steps: int) -> "ControllerSettings":
        """Read the controller fields of the base config (`maxent_jax.config`).

        `optimizer_warmup_steps` is the policy optimizer's resolved warmup length; it replaces
        `maxent.tau_warmup_steps = -1` ("follow the optimizer warmup", Q17).
        """
        m, c, meta = cfg.maxent, cfg.controllers, cfg.controller_meta
        warmup = int(m.tau_warmup_steps)
        if warmup == -1:
            warmup = int(optimizer_warmup_steps)
        settings = cls(
            beta_init=float(cfg.objective.beta),
            kl_target=float(c.kl_target),
            kl_horizon=float(c.kl_horizon),
            kl_ctl_step_size=float(c.kl_ctl_step_size),
            tau_init=float(m.tau),
            target_weight_entropy=_optional_float(m.target_weight_entropy),
            target_weight_entropy_start=_optional_float(m.target_weight_entropy_start),
            target_weight_entropy_final=_optional_float(m.target_weight_entropy_final),
            target_weight_entropy_horizon=float(m.target_weight_entropy_horizon),
            tau_lr=float(m.tau_lr),
            tau_min=float(m.tau_min),
            tau_max=float(m.tau_max or 0.0),
            tau_warmup_steps=float(warmup),
            length_normalize_ref=bool(m.length_normalize_ref),
            meta_enabled=bool(meta.enabled),
            meta_method=str(meta.method),
            meta_lr=float(meta.lr),
            meta_tau_lr=float(meta.tau_lr),
            meta_beta_lr=float(meta.beta_lr),
            meta_beta_grad_clip=float(meta.beta_grad_clip),
            meta_update_interval=float(meta.update_interval),
            meta_objective=str(meta.objective),
            meta_analytic_steps=int(meta.analytic_steps),
            meta_optimizer=str(meta.optimizer),
            meta_truncation_steps=int(meta.truncation_steps),
            meta_use_hessian=bool(meta.use_hessian),
            overwrite_from_config=bool(c.overwrite_from_config),
        )
        validate_controller_settings(settings)
        return settings

    @property
    def has_entropy_target(self) -> bool:
        """Whether any entropy target is configured (else the tau controller never moves tau)."""
        return any(
            v is not None
            for v in (self.target_weight_entropy, self.target_weight_entropy_start, self.target_weight_entropy_final)
        )


_STATIC_FIELDS = (
    "length_normalize_ref",
    "meta_enabled",
    "meta_method",
    "meta_objective",
    "meta_analytic_steps",
    "meta_optimizer",
    "meta_truncation_steps",
    "meta_use_hessian",
    "overwrite_from_config",
)
jax.tree_util.register_dataclass(
    ControllerSettings,
    data_fields=[f.name for f in dataclasses.fields(ControllerSettings) if f.name not in _STATIC_FIELDS],
    meta_fields=list(_STATIC_FIELDS),
)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _fail(field: str, value: Any, valid: str) -> UserError:
    return UserError(f"{field}={value!r} is invalid: expected {valid}")


def validate_controller_settings(s: ControllerSettings) -> None:
    """Raise UserError (one line, naming the field) for values or combinations that make no sense."""
    nonneg = {
        "objective.beta": s.beta_init,
        "controllers.kl_target": s.kl_target,
        "controllers.kl_horizon": s.kl_horizon,
        "controllers.kl_ctl_step_size": s.kl_ctl_step_size,
        "maxent.tau": s.tau_init,
        "maxent.target_weight_entropy_horizon": s.target_weight_entropy_horizon,
        "maxent.tau_lr": s.tau_lr,
        "maxent.tau_min": s.tau_min,
        "maxent.tau_max": s.tau_max,
        "maxent.tau_warmup_steps (resolved)": s.tau_warmup_steps,
        "controller_meta.lr": s.meta_lr,
        "controller_meta.tau_lr": s.meta_tau_lr,
        "controller_meta.beta_lr": s.meta_beta_lr,
        "controller_meta.beta_grad_clip": s.meta_beta_grad_clip,
    }
    for field, value in nonneg.items():
        if not (math.isfinite(value) and value >= 0):
            raise _fail(field, value, "a finite number >= 0")
    for field, value in (
        ("maxent.target_weight_entropy", s.target_weight_entropy),
        ("maxent.target_weight_entropy_start", s.target_weight_entropy_start),
        ("maxent.target_weight_entropy_final", s.target_weight_entropy_final),
    ):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise _fail(field, value, "unset or a finite number >= 0")
    if s.tau_max > 0 and s.tau_max < s.tau_min:
        raise _fail("maxent.tau_max", s.tau_max, f"0 (no upper bound) or >= maxent.tau_min={s.tau_min}")
    for field, value in (
        ("controller_meta.update_interval", s.meta_update_interval),
        ("controller_meta.analytic_steps", s.meta_analytic_steps),
        ("controller_meta.truncation_steps", s.meta_truncation_steps),
    ):
        if not (value >= 1 and float(value).is_integer()):
            raise _fail(field, value, "an integer >= 1")
    if s.meta_method not in META_METHODS:
        raise _fail("controller_meta.method", s.meta_method, f"one of {', '.join(META_METHODS)}")
    if s.meta_optimizer not in META_OPTIMIZERS:
        raise _fail("controller_meta.optimizer", s.meta_optimizer, f"one of {', '.join(META_OPTIMIZERS)}")
    if s.meta_use_hessian and s.meta_method == "analytic":
        raise _fail(
            "controller_meta.use_hessian",
            True,
            "False with controller_meta.method='analytic' (its proxy gradient has no curvature); "
            "use method 'first_order' or 'truncated_backprop' for a Newton step",
        )
    if s.meta_use_hessian and s.meta_optimizer != "sgd":
        raise _fail(
            "controller_meta.use_hessian",
            True,
            f"False with controller_meta.optimizer={s.meta_optimizer!r} (Adam's normalisation would undo "
            "the Newton scaling); use optimizer 'sgd'",
        )
    if s.meta_use_hessian and s.meta_tau_lr == 0 and s.meta_lr == 0:
        raise _fail(
            "controller_meta.use_hessian",
            True,
            "False unless controller_meta.tau_lr (or controller_meta.lr) > 0: it scales the Newton step",
        )
