"""beta (8.1) and tau (8.2) rules, settings and validation, against hand-computed reference numbers.

The reference runs these rules in Python float64; our state is float32, so comparisons use a
float32-sized relative tolerance (spec 16: ~1e-5; we hold 2e-6).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from maxent_jax.controllers import (
    ControllerInputs,
    ControllerSettings,
    init_controller_state,
    update_controllers,
    validate_controller_settings,
)
from maxent_jax.controllers.beta import update_beta
from maxent_jax.controllers.tau import active_entropy_target, update_tau
from maxent_jax.config import get_base_config
from maxent_jax.errors import UserError

RTOL = 2e-6


def _config(**maxent: object) -> ml_collections.ConfigDict:
    """The base config with the controllers switched on, plus overrides for `maxent`."""
    cfg = get_base_config()
    cfg.objective.beta = 0.04
    cfg.controllers.update({"kl_target": 0.05, "kl_horizon": 100, "kl_ctl_step_size": 0.2})
    cfg.maxent.update({"tau": 0.3, "target_weight_entropy": 1.2, "tau_lr": 0.05, "tau_min": 0.01,
                       "tau_max": 2.0, "tau_warmup_steps": -1, **maxent})
    return cfg


def test_from_config_reads_every_field_and_resolves_warmup_minus_one():
    s = ControllerSettings.from_config(_config(), optimizer_warmup_steps=7)
    assert (s.beta_init, s.kl_target, s.kl_horizon, s.kl_ctl_step_size) == (0.04, 0.05, 100.0, 0.2)
    assert (s.tau_init, s.target_weight_entropy, s.tau_lr, s.tau_min, s.tau_max) == (0.3, 1.2, 0.05, 0.01, 2.0)
    assert s.tau_warmup_steps == 7.0  # -1 follows the optimizer warmup (Q17)
    assert ControllerSettings.from_config(_config(tau_warmup_steps=3), optimizer_warmup_steps=7).tau_warmup_steps == 3
    defaults = ControllerSettings.from_config(get_base_config(), optimizer_warmup_steps=0)
    assert defaults == ControllerSettings(beta_init=defaults.beta_init)  # dataclass defaults = config defaults


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"meta_use_hessian": True, "meta_method": "analytic", "meta_lr": 1.0}, "controller_meta.use_hessian"),
        ({"meta_use_hessian": True, "meta_method": "first_order", "meta_optimizer": "adam", "meta_lr": 1.0},
         "controller_meta.use_hessian"),
        ({"meta_use_hessian": True, "meta_method": "first_order"}, "controller_meta.use_hessian"),
        ({"meta_method": "potential"}, "controller_meta.method"),
        ({"meta_optimizer": "rmsprop"}, "controller_meta.optimizer"),
        ({"tau_min": 0.5, "tau_max": 0.1}, "maxent.tau_max"),
        ({"meta_truncation_steps": 0}, "controller_meta.truncation_steps"),
        ({"kl_target": -1.0}, "controllers.kl_target"),
        ({"target_weight_entropy": float("nan")}, "maxent.target_weight_entropy"),
    ],
)
def test_invalid_settings_name_the_field(changes, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")) as err:
        validate_controller_settings(ControllerSettings(beta_init=0.04, **changes))
    assert "\n" not in str(err.value)


def test_tau_max_zero_means_unbounded_not_an_error():
    validate_controller_settings(ControllerSettings(beta_init=0.0, tau_min=0.5, tau_max=0.0))


def _beta_ref(beta, kl, target, horizon, step):
    """Spec 8.1 transcribed in float64."""
    if not (target > 0 and horizon > 0 and step > 0) or not math.isfinite(kl):
        return beta
    e = kl / max(target, 1e-8) - 1
    if abs(e) < 1e-8:
        return beta
    e = min(max(e, -step), step)
    scale = 1 + e / max(1, horizon)
    if scale <= 0:
        scale = 1e-6
    return max(0.0, beta * scale)


@pytest.mark.parametrize(
    ("beta", "kl", "target", "horizon", "step", "expected"),
    [
        (0.04, 0.2, 0.1, 10, 0.2, 0.0408),  # e = 1 clipped to 0.2; scale 1.02
        (0.04, 0.09, 0.1, 10, 0.2, 0.04 * (1 - 0.01)),  # e = -0.1, unclipped
        (0.04, 0.1, 0.1, 10, 0.2, 0.04),  # on target: no-op
        (0.04, float("nan"), 0.1, 10, 0.2, 0.04),  # non-finite KL: no-op
        (0.04, 0.2, 0.0, 10, 0.2, 0.04),  # target 0: off
        (0.04, 0.2, 0.1, 0, 0.2, 0.04),  # horizon 0: off
        (0.5, 0.0, 0.1, 1, 5.0, 0.5e-6),  # e = -1, scale 0 -> 1e-6
        (0.3, 0.5, 0.1, 0.5, 0.3, 0.3 * 1.3),  # horizon < 1 counts as 1
    ],
)
def test_beta_rule_reference_numbers(beta, kl, target, horizon, step, expected):
    s = ControllerSettings(beta_init=beta, kl_target=target, kl_horizon=horizon, kl_ctl_step_size=step)
    got = float(update_beta(jnp.float32(beta), jnp.float32(kl), s))
    assert got == pytest.approx(expected, rel=RTOL)
    assert got == pytest.approx(_beta_ref(beta, kl, target, horizon, step), rel=RTOL)


def _tau_ref(tau, log_tau, ema, h, target, step, warmup, lr, lr_scale, tau_min, tau_max):
    """Spec 8.2 transcribed in float64, with tau_max <= 0 read as 'no upper bound' (Q16)."""
    lr_eff = lr * (max(lr_scale, 0.0) if math.isfinite(lr_scale) else 1.0)
    if ema is None:
        ema = h if math.isfinite(h) else tau
    if target is None or step <= max(0, warmup) or not math.isfinite(h):
        return tau, log_tau, ema
    ema = 0.9 * ema + 0.1 * h
    err = target - ema
    if abs(err) < 1e-12:
        return tau, log_tau, ema
    log_tau = log_tau + lr_eff * err
    tau = max(math.exp(log_tau), tau_min)
    if tau_max > 0:
        tau = min(tau, tau_max)
    return tau, math.log(max(tau, 1e-8)), ema


def test_tau_rule_sequence_matches_float64_reference():
    warmup, lr, tau_min, tau_max, target = 2, 0.5, 0.05, 0.6, 1.0
    s = ControllerSettings(beta_init=0.0, tau_init=0.4, target_weight_entropy=target, tau_lr=lr,
                           tau_min=tau_min, tau_max=tau_max, tau_warmup_steps=warmup)
    entropies = [0.3, 0.5, 0.4, float("nan"), 0.2, 1.9, 2.5, 4.0, 4.0, 4.0, 0.01]
    scales = [1.0, 1.0, 0.5, 1.0, float("inf"), -1.0, 1.0, 8.0, 8.0, 8.0, 3.0]
    tau, log_tau, ema = 0.4, math.log(0.4), None
    st = (jnp.float32(0.4), jnp.log(jnp.float32(0.4)), jnp.float32(0.0), jnp.bool_(False))
    step_fn = jax.jit(update_tau)
    hit_bounds = set()
    for step, (h, scale) in enumerate(zip(entropies, scales), start=1):
        tau, log_tau, ema = _tau_ref(tau, log_tau, ema, h, target, step, warmup, lr, scale, tau_min, tau_max)
        st = step_fn(*st, jnp.float32(h), s, step, jnp.float32(scale))
        np.testing.assert_allclose([float(st[0]), float(st[1]), float(st[2])], [tau, log_tau, ema], rtol=RTOL)
        hit_bounds |= {b for b in (tau_min, tau_max) if tau == b}
    assert hit_bounds == {tau_min, tau_max}  # the sequence exercised both bounds


def test_tau_rule_hand_numbers_first_steps():
    """EMA seeds at H (also in warmup); past warmup log tau moves by lr * (target - EMA)."""
    s = ControllerSettings(beta_init=0.0, tau_init=0.5, target_weight_entropy=1.0, tau_lr=0.1, tau_warmup_steps=1)
    st = (jnp.float32(0.5), jnp.log(jnp.float32(0.5)), jnp.float32(0.0), jnp.bool_(False))
    st = update_tau(*st, jnp.float32(0.5), s, 1, 1.0)  # warmup: only the EMA seed
    assert (float(st[0]), float(st[2]), bool(st[3])) == (0.5, 0.5, True)
    st = update_tau(*st, jnp.float32(0.7), s, 2, 1.0)  # EMA 0.52, err 0.48
    assert float(st[2]) == pytest.approx(0.52, rel=RTOL)
    assert float(st[0]) == pytest.approx(0.5 * math.exp(0.048), rel=RTOL)


def test_tau_max_zero_does_not_clamp_tau_to_zero_q16():
    s = ControllerSettings(beta_init=0.0, tau_init=0.5, target_weight_entropy=2.0, tau_lr=1.0, tau_max=0.0)
    st = update_tau(jnp.float32(0.5), jnp.log(jnp.float32(0.5)), jnp.float32(1.0), jnp.bool_(True),
                    jnp.float32(1.0), s, 5, 1.0)
    assert float(st[0]) == pytest.approx(0.5 * math.e, rel=RTOL)  # err = 2 - 1, no clamp to 0


def test_no_target_leaves_tau_alone_but_seeds_ema():
    s = ControllerSettings(beta_init=0.0, tau_init=0.5, tau_lr=1.0)
    st = update_tau(jnp.float32(0.5), jnp.log(jnp.float32(0.5)), jnp.float32(0.0), jnp.bool_(False),
                    jnp.float32(0.8), s, 5, 1.0)
    assert (float(st[0]), float(st[2]), bool(st[3])) == (0.5, pytest.approx(0.8), True)


@pytest.mark.parametrize(
    ("base", "start", "final", "horizon", "step", "expected"),
    [
        (1.0, None, None, 10, 5, 1.0),
        (1.0, 2.0, None, 10, 5, 1.5),  # final defaults to base
        (None, 2.0, 0.0, 10, 5, 1.0),
        (None, 2.0, 0.0, 10, 50, 0.0),  # clamped at the horizon
        (None, 2.0, 0.0, 0, 3, 0.0),  # horizon 0: final
        (None, 2.0, 0.0, 4, -3, 2.0),  # negative step counts as 0
    ],
)
def test_annealed_entropy_target(base, start, final, horizon, step, expected):
    s = ControllerSettings(beta_init=0.0, target_weight_entropy=base, target_weight_entropy_start=start,
                           target_weight_entropy_final=final, target_weight_entropy_horizon=horizon)
    assert float(active_entropy_target(s, jnp.int32(step))) == pytest.approx(expected)


def test_update_controllers_runs_beta_then_tau_and_reports_used_values():
    s = ControllerSettings(beta_init=0.04, kl_target=0.1, kl_horizon=10, kl_ctl_step_size=0.2,
                           tau_init=0.5, target_weight_entropy=1.0, tau_lr=0.1)
    state = init_controller_state(s)
    step = jax.jit(update_controllers)
    state1, m1 = step(state, ControllerInputs(weight_entropy=jnp.float32(0.5), kl=jnp.float32(0.2)), s, 1, 1.0)
    assert float(state1.beta) == pytest.approx(0.0408, rel=RTOL)
    assert float(state1.tau) == pytest.approx(0.5 * math.exp(0.05), rel=RTOL)
    assert float(m1["train/tau"]) == 0.5 and float(m1["train/beta"]) == pytest.approx(0.04)
    assert float(m1["train/delta_tau"]) == 0.0
    assert float(m1["train/kl_error_to_target"]) == pytest.approx(0.1)
    assert float(m1["train/tau_target_entropy"]) == 1.0
    state2, m2 = step(state1, ControllerInputs(weight_entropy=jnp.float32(0.5), kl=jnp.float32(0.1)), s, 2, 1.0)
    assert float(m2["train/delta_tau"]) == pytest.approx(float(state1.tau) - 0.5, rel=1e-5)
    assert float(m2["train/delta_beta"]) == pytest.approx(0.0008, rel=1e-4)
    assert float(m2["train/weight_entropy_ema"]) == pytest.approx(0.5)
    assert int(state2.step) == 2
