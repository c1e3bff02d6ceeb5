"""`pair_sum`: the exact checker of the many-answer task (`maxent_jax.data.pair_sum`), and a reward.

1.0 when the first `<answer>` holds a pair `a + b` within the row's bounds that adds up to its
sum, whichever of the right pairs it is. Like `pure_accuracy_math`, training applies the strict
think/answer format gate and evaluation does not. `distinct_correct` counts the different
right pairs among a prompt's samples: the diversity the experiment measures.
"""

from __future__ import annotations

import re
from typing import Iterable

from maxent_jax.data.pair_sum import parse_spec
from maxent_jax.rewards.math_accuracy import extract_answer, passes_format_gate
from maxent_jax.rewards.registry import register_reward

_PAIR = re.compile(r"(\d+)\s*\+\s*(\d+)")


def correct_pair(completion: str, answer: str, *, strict_format: bool) -> tuple[int, int] | None:
    """The pair (a, b) of a correct completion, else None.

    Correct: (when strict) the think/answer format gate passes, and the first `<answer>` holds
    exactly `a + b` (whitespace free) with integers 0 <= a, b <= M and a + b = N. Leading zeros
    are accepted and canonicalised (`07 + 5` is the pair (7, 5)).
    """
    if strict_format and not passes_format_gate(completion):
        return None
    text = extract_answer(completion)
    match = None if text is None else _PAIR.fullmatch(text)
    if match is None:
        return None
    total, max_operand = parse_spec(answer)
    a, b = int(match.group(1)), int(match.group(2))
    return (a, b) if a <= max_operand and b <= max_operand and a + b == total else None


def distinct_correct(completions: Iterable[str], answer: str, *, strict_format: bool = False) -> int:
    """How many different pairs the correct completions among `completions` give (order matters:
    `3 + 4` and `4 + 3` are two answers)."""
    pairs = {correct_pair(text, answer, strict_format=strict_format) for text in completions}
    pairs.discard(None)
    return len(pairs)


@register_reward("pair_sum")
def pair_sum(completion: str, answer: str, *, is_eval: bool = False) -> float:
    """1.0 iff `correct_pair` finds a right pair (strict format gate in training only)."""
    return 0.0 if correct_pair(completion, answer, strict_format=not is_eval) is None else 1.0
