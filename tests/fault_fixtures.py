"""Shared pieces of the resume and fault-injection tests: tiny in-process runs that can be cut short.

A "kill" here stops a run from inside at a chosen point (after its checkpoint of some step is
committed, part-way through a later step), which leaves the workdir as a SIGKILL at that moment
would: committed checkpoints, metrics of the steps already logged, nothing else. The real
SIGKILL / SIGTERM paths of the entry point are exercised by subprocess tests that use the same
configs (`tiny_overrides`, `cli_flags`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import jax
import numpy as np

from configs.tiny import get_config
from maxent_jax.config import set_fields
from maxent_jax.trainer import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]

# The smallest run of the tiny default that still exercises every phase: eight prompts per step
# (one prompt per device of the 8 host CPU devices), four completions of at most 8 tokens, no eval/export.
TINY = {
    "train.max_steps": 4,
    "train.sft_warmup_steps": 0,
    "train.per_device_train_batch_size": 1,
    "train.gradient_chunks": 1,
    "rollout.num_generations": 4,
    "rollout.max_completion_length": 8,
    "data.synthetic.num_train": 64,
    "data.synthetic.num_eval": 8,
    "eval.do_eval": False,
    "checkpoint.save_steps": 1,
    "checkpoint.save_total_limit": 0,
    "checkpoint.export_final": False,
    "checkpoint.async_save": False,
    "logging.progress": False,
    # Controllers that move every step, so a controller state lost on resume shows in the metrics.
    "controllers.kl_target": 0.01,
    "controllers.kl_horizon": 10,
    "controllers.kl_ctl_step_size": 0.1,
}

# One entry per objective / controller path that carries its own state across steps.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "maxent": {"maxent.target_weight_entropy": 1.0, "maxent.tau_lr": 0.05, "maxent.tau_max": 1.0},
    "grpo": {"objective.train_grpo_objective": True},
    # rollout.dynamic_sampling: 3 rounds of prompts per step, the stream position and keys after them must
    # resume exactly. The untrained tiny policy scores 0 on every completion here, so each step's batch is
    # all masked filler (tests/test_dynamic_sampling.py trains on a mixed batch)
    "grpo_dynamic_sampling": {"objective.train_grpo_objective": True, "rollout.dynamic_sampling": True,
                              "rollout.dynamic_sampling_max_rounds": 3},
    "infoseed": {"info_seed.enabled": True, "info_seed.num_seeds": 2, "info_seed.lambda_": 0.01},
    "meta_analytic": {"controller_meta.enabled": True, "controller_meta.method": "analytic",
                      "controller_meta.lr": 0.01, "maxent.target_weight_entropy": 1.0},
    "meta_first_order": {"controller_meta.enabled": True, "controller_meta.method": "first_order",
                         "controller_meta.lr": 0.01, "maxent.target_weight_entropy": 1.0},
    "meta_truncated_backprop": {"controller_meta.enabled": True, "controller_meta.method": "truncated_backprop",
                                "controller_meta.lr": 0.01, "maxent.target_weight_entropy": 1.0},
}

TIMING_KEYS = ("time", "time/step_s", "train/rollout_seconds")


def tiny_config(**overrides: Any):
    """The tiny default with `TINY` and `overrides` ({'a.b': value}) applied."""
    config = get_config()
    set_fields(config, {**TINY, **overrides})
    return config


def cli_flags(**overrides: Any) -> list[str]:
    """The same settings as `--config.a.b=v` flags of `python -m maxent_jax.train`."""
    def text(value: Any) -> str:
        return ",".join(map(str, value)).join("()") if isinstance(value, tuple) else str(value)

    return [f"--config.{k}={text(v)}" for k, v in {**TINY, **overrides}.items()]


class Killed(Exception):
    """Raised inside a run to stop it the way a SIGKILL would (no save, no clean-up of its own)."""


def run(config, workdir: pathlib.Path, *, kill_after: int | None = None,
        patch: Callable[[Trainer], None] | None = None) -> Trainer:
    """Train in-process; with `kill_after=k`, stop as soon as step k+1 has started (its checkpoint of
    step k committed, nothing of step k+1 applied). Returns the (closed) trainer."""
    trainer = Trainer(config, workdir)
    if kill_after is not None:
        step = trainer.train_step

        def train_step() -> dict[str, float]:
            if trainer.step == kill_after:
                trainer.checkpoints.wait()
                raise Killed(f"killed during step {kill_after + 1}")
            return step()

        trainer.train_step = train_step
    if patch is not None:
        patch(trainer)
    try:
        trainer.run()
    except Killed:
        pass
    finally:
        trainer.close()
    return trainer


def metrics(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl without wall-clock timings."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and "latency" not in k} for r in rows]


def params_equal(a: Trainer, b: Trainer) -> bool:
    """Bitwise equality of two trainers' policy parameters."""
    left, right = jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)
    return len(left) == len(right) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(left, right))
