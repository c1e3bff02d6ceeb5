"""beta (KL), tau (weight-entropy) and meta controllers: pure pytree state updated after each step.

Typical use in the train loop::

    settings = ControllerSettings.from_config(cfg, optimizer_warmup_steps=warmup)
    state = resume_controller_state(restored_or_none, settings)
    ...
    state, metrics = update_controllers(state, ControllerInputs(weight_entropy=h, kl=kl), settings, step, lr_scale)
    write_controller_state(workdir / FILENAME, state, settings)
"""

from maxent_jax.controllers.persistence import (
    FILENAME,
    from_json,
    read_controller_state,
    resume_controller_state,
    to_json,
    write_controller_state,
)
from maxent_jax.controllers.settings import ControllerSettings, validate_controller_settings
from maxent_jax.controllers.state import ControllerInputs, ControllerState, init_controller_state
from maxent_jax.controllers.update import controller_metrics, update_controllers

__all__ = [
    "FILENAME",
    "ControllerInputs",
    "ControllerSettings",
    "ControllerState",
    "controller_metrics",
    "from_json",
    "init_controller_state",
    "read_controller_state",
    "resume_controller_state",
    "to_json",
    "update_controllers",
    "validate_controller_settings",
    "write_controller_state",
]
