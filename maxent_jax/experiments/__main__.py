"""Run a published experiment: `python -m maxent_jax.experiments diversity [--seeds 3] [--steps N] [--out DIR]`.

`diversity` trains every arm from one shared warm start for the same steps, evaluates diversity and pass@k
during training, and writes DIR/diversity.json, DIR/diversity_passk.png and
DIR/diversity_training.png (docs/experiments.md shows the published run).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Sequence

from maxent_jax.errors import UserError, exit_on_user_error

EXPERIMENTS = ("diversity",)
DESCRIPTION = ("diversity: GRPO-family and MaxEnt-GRPO arms from one warm start on a task with many right "
               "answers; pass@k and distinct right answers during training (docs/experiments.md).")
DEFAULT_ARMS = ("grpo", "dr_grpo", "dapo", "maxent_fixed_tau", "maxent_tau_controller")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from maxent_jax.experiments.arms import ARMS, MAX_OPERAND, WARMUP_STEPS

    parser = argparse.ArgumentParser(prog="python -m maxent_jax.experiments", description=DESCRIPTION)
    parser.add_argument("experiment", choices=EXPERIMENTS)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm: 0..N-1 (default: 3)")
    parser.add_argument("--steps", type=int, default=200, help="RL steps per run (default: 200)")
    parser.add_argument("--eval-every", type=int, default=25, help="evaluate every N steps, and at step 0 (default: 25)")
    parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS,
                        help=f"supervised steps of the shared warm start (default: {WARMUP_STEPS})")
    parser.add_argument("--max-operand", type=int, default=MAX_OPERAND,
                        help=f"the task's numbers run from 0 to this (default: {MAX_OPERAND})")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated arms, of {', '.join(ARMS)} (default: all)")
    parser.add_argument("--out", default="var/experiments/diversity", help="output directory "
                        "(default: var/experiments/diversity; an existing warm start there is reused)")
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "eval_every", "warmup_steps", "max_operand"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: an integer >= 1")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise UserError(f"--arms={args.arms!r} is invalid: choose from {', '.join(ARMS)}")
    args.arms = list(dict.fromkeys(arms))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from maxent_jax.experiments.diversity import run_experiment
    from maxent_jax.train import enable_compilation_cache

    enable_compilation_cache()  # every run after the first reuses the compiled programs
    return run_experiment(pathlib.Path(args.out), arms=args.arms, seeds=args.seeds, steps=args.steps,
                          eval_every=args.eval_every, warmup_steps=args.warmup_steps,
                          max_operand=args.max_operand)


if __name__ == "__main__":
    exit_on_user_error(main)
