"""A synthetic task with many right answers: "Write two numbers from 0 to M that add up to N."

Every ordered pair (a, b) with 0 <= a, b <= M and a + b = N is correct, so a prompt has
`num_solutions(N, M)` distinct right answers (up to M + 1). A policy that collapses onto one
pair keeps its pass@1 but loses pass@k and the count of distinct right answers among its
samples: the experiment in `maxent_jax.experiments` measures exactly that.

Rows have the usual columns: `problem`, `answer` (the constraint, `"sum=N,max=M"`, which the
exact checker `maxent_jax.rewards.pair_sum` parses: there is no gold string to match) and `solution`, a worked completion with a pair
drawn uniformly from the right ones (`<think>N - a = b</think><answer>a + b</answer>`), so the
supervised warm-up starts RL from a diverse policy. Generation is offline and deterministic in
the seed. Train and eval rows share their prompts: the question is how many different right
answers the policy finds for a prompt, not whether it generalises to new ones.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from maxent_jax.errors import UserError

_SPEC = re.compile(r"sum=(\d+),max=(\d+)")


def num_solutions(total: int, max_operand: int) -> int:
    """Ordered pairs (a, b) in [0, max_operand]^2 with a + b = total."""
    return max(0, min(total, max_operand) - max(0, total - max_operand) + 1)


def targets(max_operand: int) -> list[int]:
    """The sums asked about: every N with at least two right answers (1 .. 2M - 1)."""
    return list(range(1, 2 * max_operand))


def parse_spec(answer: str) -> tuple[int, int]:
    """`"sum=N,max=M"` -> (N, M); the row's `answer` column."""
    match = _SPEC.fullmatch(answer.strip())
    if match is None:
        raise ValueError(f"not a pair_sum answer spec: {answer!r} (expected 'sum=N,max=M')")
    return int(match.group(1)), int(match.group(2))


def make_row(total: int, max_operand: int, rng: np.random.Generator) -> dict[str, str]:
    a = int(rng.integers(max(0, total - max_operand), min(total, max_operand) + 1))
    b = total - a
    return {
        "problem": f"Write two numbers from 0 to {max_operand} that add up to {total}.",
        "answer": f"sum={total},max={max_operand}",
        "solution": f"<think>{total} - {a} = {b}</think><answer>{a} + {b}</answer>",
    }


def pair_sum_splits(num_train: int, num_eval: int, max_operand: int, seed: int) -> dict[str, list[dict[str, str]]]:
    """`num_train` rows cycling through the sums (each with its own random worked pair), and one
    eval row per sum (at most `num_eval`)."""
    if max_operand < 1:
        raise UserError(f"config field data.synthetic.max_operand={max_operand} is invalid: the pair_sum task needs >= 1")
    sums = targets(max_operand)
    rng = np.random.default_rng(seed)
    train = [make_row(sums[i % len(sums)], max_operand, rng) for i in range(num_train)]
    evaluation = [make_row(total, max_operand, rng) for total in sums[:num_eval]]
    return {"train": train, "test": evaluation}


def solution_counts(answers: Sequence[str]) -> list[int]:
    """The number of right answers of each row (from its `answer` spec)."""
    return [num_solutions(*parse_spec(answer)) for answer in answers]
