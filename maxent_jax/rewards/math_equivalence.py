"""`math_verify`: mathematical equivalence of the first `<answer>` and the gold answer.

Uses the math-verify package (`\\frac12` == `0.5`, `x+1` == `1+x`). Its own time limit is
disabled (`parsing_timeout=None`, `timeout_seconds=None`): it relies on `signal.alarm`,
which fails outside the main thread; `scoring.py` bounds the time instead. A bare LaTeX
answer is tried inside `$...$` first (math-verify extracts LaTeX only from math mode).
No format gate: combine with the `format` reward for that. Canonical exact match
(`pure_accuracy_math`'s `canon_math`) also counts as correct.
"""

from __future__ import annotations

from math_verify import parse, verify

from maxent_jax.rewards.math_accuracy import canon_math, extract_answer
from maxent_jax.rewards.registry import register_reward


def _parse(text: str) -> list:
    """math-verify parse of `text`, trying math mode first for bare LaTeX."""
    if "$" not in text and "\\boxed" not in text:
        parsed = parse(f"${text}$", parsing_timeout=None)
        if parsed:
            return parsed
    return parse(text, parsing_timeout=None)


def equivalent(pred: str, gold: str) -> bool:
    """Whether `pred` and `gold` are equal after canonicalisation or mathematically."""
    if canon_math(pred) == canon_math(gold):
        return True
    gold_parsed, pred_parsed = _parse(gold), _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


@register_reward("math_verify")
def math_verify_reward(completion: str, answer: str, *, is_eval: bool = False) -> float:
    """1.0 iff the first `<answer>` is equivalent to the gold answer."""
    pred = extract_answer(completion)
    if pred is None or not pred.strip():
        return 0.0
    return 1.0 if equivalent(pred, answer) else 0.0
