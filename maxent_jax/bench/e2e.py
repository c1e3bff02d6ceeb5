"""`e2e` target: wall time for the default config (configs/tiny.py) to reach mean train reward 0.8.

Runs the real trainer exactly as `python -m maxent_jax.train` does (supervised warm-up, then
RL steps with the config's sampling, EOS honoured), minus evaluation, checkpoints and the
final export, and stops at the first RL step whose mean reward over its completions
(`train/reward`) is >= 0.8, or after `train.max_steps` (`--max-steps`) RL steps. Reports the
warm-up time, RL steps and seconds to the target, and completion tokens/s over the RL phase.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from maxent_jax.bench.presets import default_config
from maxent_jax.bench.report import Figure, Report, load_average

TARGET_REWARD = 0.8


def run_e2e(max_steps: int | None) -> Report:
    import jax
    import jax.numpy as jnp

    from maxent_jax.errors import UserError
    from maxent_jax.trainer import Trainer

    config = default_config()
    if max_steps is not None:
        if max_steps < 1:
            raise UserError(f"--max-steps {max_steps} is invalid; expected an integer >= 1")
        config.train.max_steps = max_steps
    config.eval.do_eval = False
    config.checkpoint.export_final = False
    config.logging.wandb = "disabled"
    report = Report("e2e", "tiny (configs/tiny.py)", 1, {
        "target": f"train/reward >= {TARGET_REWARD}", "max_steps": config.train.max_steps,
        "sft_warmup_steps": config.train.sft_warmup_steps, "G": config.rollout.num_generations,
        "prompts_per_step": config.train.per_device_train_batch_size, "max_completion_length":
        config.rollout.max_completion_length})
    before = load_average()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maxent-bench-") as tmp:
        trainer = Trainer(config, Path(tmp) / "run")
        try:
            setup = time.perf_counter() - start
            trainer.supervised_warmup() if config.train.sft_warmup_steps else None
            warm = time.perf_counter() - start - setup
            trainer.reference_params = jax.tree.map(jnp.copy, trainer.state.params)
            rl_start, tokens, rewards = time.perf_counter(), 0.0, []
            reached = None
            while trainer.step < config.train.max_steps:
                metrics = trainer.train_step()
                rewards.append(metrics["train/reward"])
                tokens += metrics["train/completions/mean_length_sampled"] * trainer.num_prompts * trainer.group
                if metrics["train/reward"] >= TARGET_REWARD:
                    reached = trainer.step
                    break
            rl = time.perf_counter() - rl_start
        finally:
            trainer.close()
    load = (before, load_average())
    total = time.perf_counter() - start
    report.add(Figure("setup (model, tokenizer, task, compile-free)", "s", [setup], load))
    report.add(Figure("supervised warm-up", "s", [warm], load))
    report.add(Figure("RL phase", "s", [rl], load))
    report.add(Figure("total wall time", "s", [total], load))
    report.add(Figure("RL completion tokens/s", "tokens/s", [tokens / rl], load))
    report.setup["rewards_per_step"] = [round(r, 3) for r in rewards]
    if reached is not None:
        report.notes.append(f"reached mean train reward {rewards[-1]:.3f} >= {TARGET_REWARD} at RL step {reached} "
                            f"after {total:.1f} s in all")
    else:
        report.notes.append(f"did not reach mean train reward {TARGET_REWARD} within {len(rewards)} RL steps "
                            f"(best {max(rewards):.3f})")
    return report
