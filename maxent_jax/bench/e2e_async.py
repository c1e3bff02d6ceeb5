"""`e2e --rollout server --max-staleness S`: synchronous against asynchronous rollouts, alternating.

Each run is the default config (configs/tiny.py) as `python -m maxent_jax.train` runs it with
`rollout.backend=server` and `rollout.spawn_server=jax` (a local jax rollout server the trainer
starts and stops), minus evaluation, checkpoints and the export: the supervised warm-up, then
`--max-steps` RL steps (default: the config's). Runs alternate s = 0 and s = S (`--repeats`
pairs, the order of each pair swapped from the last), so a change of the shared machine's load
hits both sides alike. Reported per side: RL steps/s over the RL phase, the first RL step whose
mean train reward is >= 0.8, the mean and max staleness; the ratio `async_vs_sync` is the
steps/s of s = S over s = 0.

On one machine the trainer and the server share the cores, so the overlap gains only what
one side leaves idle; on separate devices it hides generation behind the update (docs/rollout.md).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from maxent_jax.bench.e2e import TARGET_REWARD
from maxent_jax.bench.presets import default_config
from maxent_jax.bench.report import Figure, Report, load_average


def _one_run(max_staleness: int, max_steps: int | None) -> dict[str, float | None]:
    """One run: RL steps/s, the first step at the target reward, staleness mean and max."""
    import jax
    import jax.numpy as jnp

    from maxent_jax.trainer import Trainer

    config = default_config()
    if max_steps is not None:
        config.train.max_steps = max_steps
    config.rollout.backend, config.rollout.spawn_server = "server", "jax"
    config.rollout.max_staleness = max_staleness
    config.eval.do_eval, config.checkpoint.export_final, config.checkpoint.save_steps = False, False, 0
    config.logging.wandb, config.logging.progress = "disabled", False
    with tempfile.TemporaryDirectory(prefix="maxent-bench-") as tmp:
        trainer = Trainer(config, Path(tmp))
        try:
            trainer.supervised_warmup() if config.train.sft_warmup_steps else None
            trainer.reference_params = jax.tree.map(jnp.copy, trainer.state.params)
            trainer.start_producer()
            start, reached, stale = time.perf_counter(), None, []
            while trainer.step < trainer.total_steps:
                metrics = trainer.train_step()
                stale.append((metrics["train/rollout/staleness_mean"], metrics["train/rollout/staleness_max"]))
                if reached is None and metrics["train/reward"] >= TARGET_REWARD:
                    reached = trainer.step
            seconds = time.perf_counter() - start
        finally:
            trainer.close()
    return {"steps_per_s": len(stale) / seconds, "reached": reached,
            "staleness_mean": sum(m for m, _ in stale) / len(stale), "staleness_max": max(x for _, x in stale)}


def run_e2e_async(max_steps: int | None, max_staleness: int, repeats: int) -> Report:
    from maxent_jax.errors import UserError

    if max_staleness < 1:
        raise UserError(f"--max-staleness {max_staleness} is invalid; expected an integer >= 1 (s = 0 always runs)")
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps {max_steps} is invalid; expected an integer >= 1")
    sides = {0: "sync (s=0)", max_staleness: f"async (s={max_staleness})"}
    config = default_config()
    report = Report("e2e", "tiny (configs/tiny.py), spawned jax rollout server", repeats, {
        "target": f"train/reward >= {TARGET_REWARD}", "max_steps": max_steps or config.train.max_steps,
        "sft_warmup_steps": config.train.sft_warmup_steps, "G": config.rollout.num_generations,
        "prompts_per_step": config.train.per_device_train_batch_size, "order": "alternating pairs"})
    results: dict[int, list[dict]] = {0: [], max_staleness: []}
    loads: dict[int, list[float]] = {0: [], max_staleness: []}
    for pair in range(repeats):
        for s in ((0, max_staleness) if pair % 2 == 0 else (max_staleness, 0)):
            loads[s].append(load_average())
            results[s].append(_one_run(s, max_steps))
            loads[s].append(load_average())
    for s, label in sides.items():
        load = (min(loads[s]), max(loads[s]))
        report.add(Figure(f"{label} RL steps/s", "steps/s", [r["steps_per_s"] for r in results[s]], load))
        report.add(Figure(f"{label} staleness mean", "steps", [r["staleness_mean"] for r in results[s]], load))
        report.add(Figure(f"{label} staleness max", "steps", [r["staleness_max"] for r in results[s]], load))
        reached = [r["reached"] for r in results[s]]
        report.notes.append(f"{label}: first RL step with mean train reward >= {TARGET_REWARD}: {reached} "
                            "(None: not within the run)")
    report.ratio("async_vs_sync", f"{sides[max_staleness]} RL steps/s", f"{sides[0]} RL steps/s")
    return report
