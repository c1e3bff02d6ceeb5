"""What a checkpoint holds of a run, and how a run resumes from one (docs/checkpoints.md).

A checkpoint is two parts: the arrays (`checkpoint_state`: the train state, the reference
parameters, the controllers, the RNG key), sharded as in training, and the host state the loop
carries from step to step (`extras`, JSON). Both are read off the `Trainer` and put back on it,
so the list of what a resume needs is in one place.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import jax

from maxent_jax import disk_space
from maxent_jax.checkpoint_verify import ResumePoint
from maxent_jax.controllers.persistence import resume_controller_state, to_json
from maxent_jax.model import lora_io
from maxent_jax.rollout import stragglers

if TYPE_CHECKING:
    from maxent_jax.trainer import Trainer


def checkpoint_state(trainer: Trainer) -> dict[str, Any]:
    """The arrays of a checkpoint (also the target tree a restore fills, and the preflight's size)."""
    return {"train": trainer.state, "reference": trainer.reference_params, "controllers": trainer.controllers,
            "rng": jax.random.key_data(trainer.key)}


def check_space(trainer: Trainer) -> None:
    """Before any step: the checkpoints this run will write (and its final export) fit on the disk."""
    c, start = trainer.config, trainer.resume_point.step if trainer.resume_point else 0
    disk_space.preflight(
        trainer.workdir, checkpoint_bytes=disk_space.state_nbytes(checkpoint_state(trainer)) * 2,
        keep=c.checkpoint.save_total_limit,
        saves=disk_space.planned_saves(start, trainer.total_steps, c.checkpoint.save_steps),
        extra_bytes=disk_space.state_nbytes(trainer.state.params) if c.checkpoint.export_final else 0)


def extras(trainer: Trainer) -> dict[str, Any]:
    """The host state the loop carries from step to step (the arrays are in `checkpoint_state`).

    Every piece that decides a later step must be here for a resume to be exact: the data
    position, the InfoSeed seed-id generator, the non-finite streak and the metrics window
    not yet emitted (logging_steps > 1). Eval and save schedules follow from `step` alone.
    """
    return {"step": trainer.step, "stream": trainer.applied_stream, "tokens_seen": trainer.tokens_seen,
            "controller_state": to_json(trainer.controllers, trainer.controller_settings),
            # PCG64's state holds 128-bit integers: kept as a JSON string, not as numbers.
            "seed_rng": json.dumps(trainer.seed_rng.bit_generator.state),
            "consecutive_nonfinite": trainer.consecutive_nonfinite,
            "metrics_window": trainer.telemetry.window.state(),
            **({"lora_base": trainer.lora_base} if trainer.lora_base is not None else {})}


def restore(trainer: Trainer, point: ResumePoint) -> None:
    """Put the checkpoint at `point` back on `trainer`: arrays, host state, a LoRA run's base."""
    trainer.reference_params = trainer.state.params  # the target tree's shape and sharding
    state, saved = trainer.checkpoints.restore(point.path, checkpoint_state(trainer))
    trainer.state, trainer.reference_params = state["train"], state["reference"]
    trainer.key = jax.random.wrap_key_data(state["rng"])
    trainer.controllers = resume_controller_state(state["controllers"], trainer.controller_settings)
    trainer.step, trainer.tokens_seen = int(saved["step"]), int(saved["tokens_seen"])
    trainer.stream.restore(saved["stream"])
    applied = stragglers.applied_part(saved["stream"], trainer.config.rollout.straggler_groups)
    trainer.applied_stream = {**trainer.stream.state(), **applied}  # with straggler carry-over, prompts beyond it
    # Checkpoints written before these were saved resume without them (as before: not bit-exact).
    if "seed_rng" in saved:
        trainer.seed_rng.bit_generator.state = json.loads(saved["seed_rng"])
    trainer.consecutive_nonfinite = int(saved.get("consecutive_nonfinite", 0))
    if "metrics_window" in saved:
        trainer.telemetry.window.restore(saved["metrics_window"])
    if trainer.policy.lora is not None:  # (a full fine-tuning checkpoint already failed to match the state)
        trainer.lora_base = saved["lora_base"]
        lora_io.restore_base(trainer.policy.rest, trainer.lora_base, trainer.workdir,
                             trainer.config.lora.base_dtype or trainer.config.model.param_dtype)
    trainer.sft_done = True
