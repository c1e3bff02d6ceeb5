"""What MaxEnt buys: GRPO-family and MaxEnt arms on a task with many right answers.

One supervised warm start on diverse worked solutions is trained once and exported; every
(arm, seed) run then starts from it (`model.name_or_path`), with the same steps and batch, in
the ordinary `Trainer` loop. `DiversityTrainer` only replaces two of its hooks:

- `evaluate` (called by the loop every `eval.eval_steps`): 16 samples per eval prompt ->
  unbiased pass@k for k = 1..16, distinct right answers per prompt, token entropy;
- `measure_initial_reward` (called once before RL): the same evaluation at step 0, i.e. of
  the warm start.

Eval samples are drawn with a key of their own (seed, step), so evaluating never changes the
training's random draws, and at a given seed and step every arm is scored on the same draw of
the sampler's noise.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from maxent_jax import export as export_lib
from maxent_jax.data.pair_sum import solution_counts
from maxent_jax.eval_metrics import pass_at_k
from maxent_jax.experiments import arms as arms_lib
from maxent_jax.rewards.pair_sum import correct_pair
from maxent_jax.rollout import groups
from maxent_jax.trainer import Trainer

TRAIN_KEYS = ("train/reward", "train/weight_entropy", "train/tau", "train/kl")
GRPO_TRAIN_KEYS = ("train/reward", "train/kl")  # GRPO has no weights and no tau
WARM_START_DIR = "warm_start"


def score_samples(samples: Sequence[Sequence[str]], answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(correct, distinct correct) per prompt, `[prompts]` each, from each prompt's sample texts
    (relaxed format, as every evaluation here)."""
    correct, distinct = [], []
    for texts, answer in zip(samples, answers, strict=True):
        pairs = [correct_pair(text, answer, strict_format=False) for text in texts]
        right = [p for p in pairs if p is not None]
        correct.append(len(right))
        distinct.append(len(set(right)))
    return np.array(correct, np.int64), np.array(distinct, np.int64)


def diversity_metrics(correct: np.ndarray, distinct: np.ndarray, solutions: np.ndarray, num_samples: int,
                      token_nll: float, num_tokens: int) -> dict[str, float]:
    """The eval record: pass@k (k = 1..num_samples, unbiased), distinct right answers per prompt
    (and as a fraction of the most `num_samples` samples could find, min(solutions, n)), and the
    mean token entropy estimated by the sampled tokens' mean negative log-probability."""
    out = {f"eval/pass@{k}": float(np.mean(pass_at_k(num_samples, correct, k))) for k in range(1, num_samples + 1)}
    out["eval/distinct_correct"] = float(np.mean(distinct))
    out["eval/distinct_correct_frac"] = float(np.mean(distinct / np.minimum(solutions, num_samples)))
    out["eval/token_entropy"] = token_nll / max(num_tokens, 1)
    return out


class DiversityTrainer(Trainer):
    """The ordinary trainer with the diversity evaluation, which it also runs at step 0."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, label: str):
        super().__init__(config, workdir)
        self.label = label
        self.started = time.monotonic()
        self.eval_key = jax.random.key(config.seed + 1_000_003)
        self.eval_history: list[dict[str, float]] = []
        self.train_history: list[dict[str, float]] = []

    def measure_initial_reward(self) -> None:
        self.telemetry.log_eval(0, self.evaluate())

    def train_step(self) -> dict[str, float]:
        metrics = super().train_step()
        keys = TRAIN_KEYS if not self.config.objective.train_grpo_objective else GRPO_TRAIN_KEYS
        self.train_history.append({"step": self.step, **{k: metrics[k] for k in keys if k in metrics}})
        return metrics

    def evaluate(self) -> dict[str, float]:
        rows = self.task.eval
        n = arms_lib.NUM_SAMPLES
        params = groups.sampling_params(self.config.rollout, n)
        ids, logps, _ = self.policy.generate(self.state.params, [row["prompt_ids"] for row in rows], params,
                                             jax.random.fold_in(self.eval_key, self.step))
        texts = self.policy.decode(ids)
        answers = [row["answer"] for row in rows]
        correct, distinct = score_samples([texts[i * n:(i + 1) * n] for i in range(len(rows))], answers)
        metrics = diversity_metrics(correct, distinct, np.array(solution_counts(answers)), n,
                                    -float(sum(map(sum, logps))), sum(map(len, logps)))
        self.eval_history.append({"step": self.step, **metrics})
        elapsed = time.monotonic() - self.started
        self.say(f"  {self.label} step {self.step}/{self.total_steps}: pass@1 {metrics['eval/pass@1']:.3f}  "
                 f"pass@16 {metrics['eval/pass@16']:.3f}  distinct {metrics['eval/distinct_correct']:.2f}  "
                 f"token entropy {metrics['eval/token_entropy']:.3f}  ({elapsed:.0f} s)")
        return metrics


def warm_start(out: pathlib.Path, warmup_steps: int, max_operand: int, say: Callable[[str], None]) -> pathlib.Path:
    """The shared warm-start checkpoint (an HF directory): trained once, reused while its
    settings are the same (`warm_start.json` beside it)."""
    directory = out / WARM_START_DIR
    settings = {"warmup_steps": warmup_steps, "config": arms_lib.base_config(max_operand).to_json(sort_keys=True)}
    stamp = directory / "warm_start.json"
    exported = directory / export_lib.FINAL_EXPORT_DIR
    if exported.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        say(f"warm start: reusing {exported}")
        return exported
    config = arms_lib.base_config(max_operand)
    config.train.sft_warmup_steps = warmup_steps
    config.checkpoint.export_final = True
    config.logging.progress = False
    started = time.monotonic()
    trainer = Trainer(config, directory)
    try:
        trainer.supervised_warmup()
        trainer.export_final()
    finally:
        trainer.close()
    stamp.write_text(json.dumps(settings) + "\n")
    say(f"warm start: {warmup_steps} supervised steps in {time.monotonic() - started:.0f} s -> {exported}")
    return exported


def run_arm(arm: str, seed: int, *, steps: int, eval_every: int, max_operand: int, warm: pathlib.Path,
            out: pathlib.Path, label: str) -> dict[str, Any]:
    """One training run of `arm` from the warm start; its eval and train histories."""
    from maxent_jax import cli

    config = arms_lib.arm_config(arm, seed=seed, steps=steps, eval_every=eval_every, warm_start=str(warm),
                                 max_operand=max_operand)
    config.logging.progress = sys.stdout.isatty()  # the live line on a terminal; in a log, the eval lines only
    cli.validated(config)
    started = time.monotonic()
    trainer = DiversityTrainer(config, out / "runs" / f"{arm}-seed{seed}", label=label)
    try:
        trainer.run()
    finally:
        trainer.close()
    return {"arm": arm, "seed": seed, "seconds": time.monotonic() - started,
            "eval": trainer.eval_history, "train": trainer.train_history}


def run_experiment(out: pathlib.Path, *, arms: Sequence[str], seeds: int, steps: int, eval_every: int,
                   warmup_steps: int, max_operand: int = arms_lib.MAX_OPERAND, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every (seed, arm) run, seeds outermost so a partial result compares all arms; the JSON is
    rewritten after each run, so an interrupted experiment keeps what it finished."""
    from maxent_jax.experiments import report

    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    warm = warm_start(out, warmup_steps, max_operand, say)
    settings = {"arms": list(arms), "seeds": list(range(seeds)), "steps": steps, "eval_every": eval_every,
                "warmup_steps": warmup_steps, "num_samples": arms_lib.NUM_SAMPLES,
                "max_operand": max_operand, "target_weight_entropy": arms_lib.TARGET_WEIGHT_ENTROPY,
                "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}
    runs: list[dict[str, Any]] = []
    total = seeds * len(arms)
    for seed in range(seeds):
        for arm in arms:
            done = len(runs)
            eta = "" if not done else f", about {(time.monotonic() - started) / done * (total - done) / 60:.0f} min left"
            say(f"[run {done + 1}/{total}] {arm} seed {seed}{eta}")
            runs.append(run_arm(arm, seed, steps=steps, eval_every=eval_every, max_operand=max_operand, warm=warm,
                                out=out, label=f"{arm} seed {seed}"))
            result = {"settings": settings, "wall_seconds": time.monotonic() - started, "runs": runs}
            result["summary"] = report.summarize(runs)
            (out / "diversity.json").write_text(json.dumps(result, indent=1) + "\n")
    report.write_plots(result, out)
    say(report.markdown_table(result["summary"]))
    say(f"wrote {out / 'diversity.json'}, {', '.join(str(out / p) for p in report.PLOTS)}; "
        f"{result['wall_seconds'] / 60:.1f} min in all")
    return result


