"""Evaluation: the in-training eval (spec 10) and the standalone accuracy / pass@k entry point.

In training, `evaluate_policy` runs every `eval.eval_steps` optimizer steps: one completion per
eval prompt, scored with the eval reward in relaxed mode, giving `eval/mean_reward` and the
format-failure fractions `eval/format/missing_answer_frac` (no `<answer>...</answer>`) and
`eval/format/missing_format_frac` (the strict `<think>..</think>..<answer>..</answer>` gate fails).

For the standalone evaluation, n samples per problem give accuracy
and unbiased pass@k (`maxent_jax.eval_metrics`); every finished problem is appended to a JSONL
file at once, so a rerun with the same settings skips the problems already done.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from maxent_jax.errors import UserError
from maxent_jax.rewards.math_accuracy import extract_answer, passes_format_gate

GenerateFn = Callable[[Sequence[Mapping[str, Any]]], Sequence[str]]
"""eval rows (with `prompt`, and `prompt_ids` when tokenised) -> one completion text per row."""
SampleFn = Callable[[Sequence[Mapping[str, Any]], int], Sequence[Sequence[str]]]
"""(rows, n) -> n completion texts per row."""
RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
"""(completions, answers) -> the eval reward of each completion (relaxed format)."""


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def format_failures(completions: Sequence[str]) -> tuple[int, int]:
    """(completions without an `<answer>` block, completions failing the strict format gate)."""
    missing_answer = sum(extract_answer(text) is None for text in completions)
    missing_format = sum(not passes_format_gate(text) for text in completions)
    return missing_answer, missing_format


# ---------------------------------------------------------------------------------------
# In-training evaluation


def evaluate_policy(
    generate_fn: GenerateFn,
    rows: Sequence[Mapping[str, Any]],
    reward_fn: RewardFn,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, float]:
    """Spec 10: one completion per eval row (`{'prompt', 'answer', ...}`), global means over all processes.

    Each process takes rows[process_index::process_count] in batches of `batch_size` prompts
    (`per_device_eval_batch_size`); sums are all-gathered, so every process returns the same dict.
    `generate_fn` must run on every process the same number of times when it holds collectives:
    shards differ by at most one row, so the caller pads if its generator needs equal batches.
    """
    shard = list(rows[process_index::process_count])
    totals = np.zeros(4, dtype=np.float64)  # reward sum, count, missing answer, missing format
    for batch in _batches(shard, batch_size):
        completions = list(generate_fn(batch))
        if len(completions) != len(batch):
            raise ValueError(f"generate_fn returned {len(completions)} completions for {len(batch)} prompts")
        rewards = np.asarray(reward_fn(completions, [row["answer"] for row in batch]), dtype=np.float64)
        missing_answer, missing_format = format_failures(completions)
        totals += (rewards.sum(), len(batch), missing_answer, missing_format)
    if process_count > 1:
        from jax.experimental import multihost_utils

        totals = np.asarray(multihost_utils.process_allgather(totals)).reshape(process_count, 4).sum(axis=0)
    count = max(totals[1], 1.0)
    return {
        "eval/mean_reward": float(totals[0] / count),
        "eval/format/missing_answer_frac": float(totals[2] / count),
        "eval/format/missing_format_frac": float(totals[3] / count),
    }


# ---------------------------------------------------------------------------------------
# Standalone evaluation: resumable per-problem results


def problem_key(index: int, problem: str) -> str:
    """Row position plus a hash of its text: a rerun on another dataset cannot match old rows."""
    return f"{index}:{hashlib.sha1(problem.encode('utf-8')).hexdigest()[:12]}"


class ResultsFile:
    """Per-problem results as JSONL: a settings line, then one record per finished problem.

    Opening an existing file resumes it: its records count as done, provided it was written
    with the same settings (checkpoint, dataset, samples, sampling); otherwise UserError.
    A line torn by a crash is dropped.
    """

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any]):
        self.path = pathlib.Path(path)
        self.settings = json.loads(json.dumps(dict(settings)))
        self.records: dict[str, dict] = {}
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except ValueError:
                continue
        if parsed:
            previous = parsed[0].get("settings")
            if previous != self.settings:
                changed = sorted(k for k in set(previous or {}) | set(self.settings)
                                 if (previous or {}).get(k) != self.settings.get(k))
                raise UserError(
                    f"--output={self.path} holds results for other settings (differs in {', '.join(changed)}): "
                    "pass another --output or delete the file"
                )
            self.records = {r["key"]: r for r in parsed[1:] if "key" in r}
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [{"settings": self.settings}, *self.records.values()]),
                       encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, record: Mapping[str, Any]) -> None:
        self.records[record["key"]] = dict(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def evaluate_problems(
    rows: Sequence[Mapping[str, Any]],
    sample_fn: SampleFn,
    reward_fn: RewardFn,
    *,
    num_samples: int,
    batch_size: int,
    results: ResultsFile,
    correct_at: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Sample `num_samples` completions for every row not yet in `results`, score, record.

    A sample is correct when its eval reward is >= `correct_at` (1.0: the binary accuracy
    reward's full mark). Returns the records of all rows, in row order.
    """
    keyed = [(problem_key(i, row["problem"]), row) for i, row in enumerate(rows)]
    pending = [(key, row) for key, row in keyed if key not in results.records]
    done = len(keyed) - len(pending)
    for batch in _batches(pending, batch_size):
        samples = sample_fn([row for _, row in batch], num_samples)
        for (key, row), completions in zip(batch, samples, strict=True):
            completions = list(completions)
            rewards = [float(r) for r in reward_fn(completions, [row["answer"]] * len(completions))]
            missing_answer, missing_format = format_failures(completions)
            results.add({
                "key": key,
                "problem": row["problem"],
                "answer": row["answer"],
                "num_samples": len(completions),
                "num_correct": sum(r >= correct_at for r in rewards),
                "missing_answer": missing_answer,
                "missing_format": missing_format,
                "rewards": rewards,
                "completions": completions,
            })
        done += len(batch)
        if progress is not None:
            progress(done, len(keyed))
    return [results.records[key] for key, _ in keyed]
