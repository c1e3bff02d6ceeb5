"""`controller_state.json`: the spec 8.4 layout plus what an exact restore needs, and resume rules.

The Orbax checkpoint holds the `ControllerState` pytree with the rest of the train state and
is what a resume reads; the JSON file is the human-readable mirror in the workdir (and a
restore source when only it exists). float32 values are written as the float64 numbers they
equal, so JSON round-trips are exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxent_jax.controllers.settings import ControllerSettings
from maxent_jax.controllers.state import TAU_LOG_FLOOR, ControllerState, init_controller_state
from maxent_jax.errors import UserError

FILENAME = "controller_state.json"
FORMAT_VERSION = 1
log = logging.getLogger(__name__)


def _num(x: Any) -> float:
    return float(np.asarray(jax.device_get(x), np.float32))


def to_json(state: ControllerState, settings: ControllerSettings) -> dict[str, Any]:
    """The spec 8.4 document; the `maxent_jax` section carries the rest of the state exactly."""
    s = settings
    leaves = jax.tree.leaves(jax.device_get(state.meta_opt_state))
    ema_set = bool(np.asarray(jax.device_get(state.entropy_ema_set)))
    return {
        "beta": _num(state.beta),
        "tau": _num(state.tau),
        "tau_log": _num(state.log_tau),
        "tau_entropy_ema": _num(state.entropy_ema) if ema_set else _num(state.tau),
        "meta": {
            "version": 1,
            "controller": {
                "enabled": s.meta_enabled,
                "method": s.meta_method,
                "learning_rate": float(s.meta_lr),
                "tau_learning_rate": float(s.meta_tau_lr),
                "beta_learning_rate": float(s.meta_beta_lr),
                "beta_grad_clip": float(s.meta_beta_grad_clip),
                "update_interval": int(s.meta_update_interval),
                "objective": s.meta_objective,
                "analytic_steps": int(s.meta_analytic_steps),
                "optimizer": s.meta_optimizer,
                "truncation_steps": int(s.meta_truncation_steps),
                "use_hessian": s.meta_use_hessian,
                "last_tau_grad": _num(state.last_tau_grad),
                "last_beta_grad": _num(state.last_beta_grad),
            },
        },
        "maxent_jax": {
            "version": FORMAT_VERSION,
            "tau_entropy_ema_set": ema_set,
            "prev_tau": _num(state.prev_tau),
            "prev_beta": _num(state.prev_beta),
            "step": int(np.asarray(jax.device_get(state.step))),
            "meta_updates": int(np.asarray(jax.device_get(state.meta_updates))),
            "meta_optimizer": s.meta_optimizer,
            "meta_optimizer_state": [np.asarray(x).item() for x in leaves],
        },
    }


def _require_number(data: dict[str, Any], key: str, source: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{source}: field {key!r}={value!r} is invalid: expected a finite number")
    return float(value)


def from_json(data: dict[str, Any], settings: ControllerSettings, source: str = FILENAME) -> ControllerState:
    """Rebuild the state from `to_json` output, or from a reference-written file.

    A reference file (no `maxent_jax` section) gives tau, beta, log tau, the EMA and the last
    meta gradients; the rest starts fresh. The meta optimizer state is restored only when the
    file was written with the same `controller_meta.optimizer` (else it restarts, with a warning).
    """
    tau = _require_number(data, "tau", source)
    beta = _require_number(data, "beta", source)
    fresh = init_controller_state(settings)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    tau_log = data.get("tau_log")
    tau_log = f32(tau_log) if isinstance(tau_log, (int, float)) else jnp.log(jnp.maximum(f32(tau), TAU_LOG_FLOOR))
    ema = data.get("tau_entropy_ema")
    extra = data.get("maxent_jax") or {}
    ema_ok = isinstance(ema, (int, float)) and math.isfinite(ema)
    ema_set = bool(extra.get("tau_entropy_ema_set", ema_ok)) and ema_ok
    controller = (data.get("meta") or {}).get("controller") or {}
    opt_state = fresh.meta_opt_state
    stored = extra.get("meta_optimizer_state")
    if stored is not None:
        template, treedef = jax.tree.flatten(fresh.meta_opt_state)
        if extra.get("meta_optimizer") == settings.meta_optimizer and len(stored) == len(template):
            opt_state = jax.tree.unflatten(
                treedef, [jnp.asarray(v, dtype=t.dtype) for v, t in zip(stored, template)]
            )
        else:
            log.warning(
                "%s: meta optimizer state written for controller_meta.optimizer=%r, config has %r; it restarts",
                source, extra.get("meta_optimizer"), settings.meta_optimizer,
            )
    return ControllerState(
        tau=f32(tau),
        log_tau=tau_log,
        beta=f32(beta),
        entropy_ema=f32(ema if ema_set else 0.0),
        entropy_ema_set=jnp.asarray(ema_set),
        prev_tau=f32(extra.get("prev_tau", tau)),
        prev_beta=f32(extra.get("prev_beta", beta)),
        step=jnp.asarray(int(extra.get("step", 0)), jnp.int32),
        meta_updates=jnp.asarray(int(extra.get("meta_updates", 0)), jnp.int32),
        meta_opt_state=opt_state,
        last_tau_grad=f32(controller.get("last_tau_grad", 0.0)),
        last_beta_grad=f32(controller.get("last_beta_grad", 0.0)),
    )


def write_controller_state(path: str | os.PathLike[str], state: ControllerState, settings: ControllerSettings) -> Path:
    """Write `to_json` to `path` atomically (write `<path>.tmp`, then rename over `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(to_json(state, settings), fh, indent=2, allow_nan=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_controller_state(path: str | os.PathLike[str], settings: ControllerSettings) -> ControllerState:
    """Load a `controller_state.json` (ours or the reference's); UserError if it is unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"controller state file {str(path)!r} is unreadable: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"controller state file {str(path)!r} is invalid: expected a JSON object")
    try:
        return from_json(data, settings, source=str(path))
    except (TypeError, ValueError) as err:  # a hand-edited value of the wrong kind
        raise UserError(f"controller state file {str(path)!r} is invalid: {err}") from None


def resume_controller_state(
    restored: ControllerState | None, settings: ControllerSettings, step: int = 0
) -> ControllerState:
    """The state a run starts from.

    Nothing restored: fresh from config. Restored and `controllers.overwrite_from_config`:
    tau, beta, log tau from config, the EMA unset, the meta optimizer and its gradients reset
    (the step counter and the meta update count are kept). Otherwise the restored state, exactly.
    """
    if restored is None:
        return init_controller_state(settings, step)
    if settings.overwrite_from_config:
        fresh = init_controller_state(settings)
        return fresh.replace(step=restored.step, meta_updates=restored.meta_updates)
    return restored
