"""`format`: 1.0 when the completion follows the `<think>...</think><answer>...</answer>` layout.

The same anchored, case-insensitive pattern as the training gate of `pure_accuracy_math`
(spec 4.2 step 1), as a reward of its own: use it alongside an answer reward that does not
gate (`math_verify`, `pure_accuracy_math_relaxed`) to reward the format separately.
"""

from __future__ import annotations

from maxent_jax.rewards.math_accuracy import passes_format_gate
from maxent_jax.rewards.registry import register_reward


@register_reward("format")
def format_reward(completion: str, answer: str, *, is_eval: bool = False) -> float:
    """1.0 iff the text matches the think/answer layout from its first character."""
    return 1.0 if passes_format_gate(completion) else 0.0
