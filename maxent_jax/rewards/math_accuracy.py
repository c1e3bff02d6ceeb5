"""`pure_accuracy_math`: binary exact match of the first `<answer>` (spec 4.2).

Training applies a strict format gate: the text must start (first character, no leading
whitespace) with `<think>...</think>...<answer>...</answer>` (case-insensitive, dot-all).
Evaluation is relaxed (no gate). `pure_accuracy_math_relaxed` never gates.
The comparison is `canon(pred) == canon(gold)` with the light LaTeX canonicalisation
`canon_math`; there is no numeric or symbolic equivalence (see `math_verify` for that).
"""

from __future__ import annotations

import re

from maxent_jax.rewards.registry import register_reward

FORMAT_GATE = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.IGNORECASE | re.DOTALL)
ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)

_UNICODE = {
    "π": r"\pi",
    "Π": r"\Pi",
    "τ": r"\tau",
    "θ": r"\theta",
    "Θ": r"\Theta",
    "φ": r"\phi",
    "Φ": r"\Phi",
    "∞": r"\infty",
}
_FRAC = re.compile(r"\\frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_SIMPLE_PARENS = re.compile(r"\(([A-Za-z0-9_\\]+)\)")
_WHOLE_BRACES = re.compile(r"^\{([^{}]*)\}$")
_WHOLE_PARENS = re.compile(r"^\(([^()]*)\)$")
_PAREN_NUMERIC = re.compile(r"^[\d.\-\\sqrt]+$")
_TRAILING_ZEROS = re.compile(r"-?\d+\.0+")


def canon_math(s: str | None) -> str:
    """The reference's `_canon_math`, steps 1-10 of spec 4.2, in order."""
    s = "" if s is None else s.strip()
    for symbol, latex in _UNICODE.items():
        s = s.replace(symbol, latex)
    s = _FRAC.sub(lambda m: f"({m.group(1).strip()})/({m.group(2).strip()})", s)
    for token in (r"\left", r"\right", "$", r"\,"):
        s = s.replace(token, "")
    s = _SIMPLE_PARENS.sub(r"\1", s)
    braces = _WHOLE_BRACES.match(s)
    if braces:
        s = braces.group(1)
    parens = _WHOLE_PARENS.match(s)
    if parens and _PAREN_NUMERIC.match(parens.group(1).strip()):
        s = parens.group(1)
    s = s.replace(" ", "")
    if s in ("-0", "+0"):
        s = "0"
    if _TRAILING_ZEROS.fullmatch(s):
        s = s.split(".", 1)[0]
    return s


def passes_format_gate(text: str) -> bool:
    """The strict training gate: `<think>..</think>..<answer>..</answer>` from character 0."""
    return FORMAT_GATE.match(text) is not None


def extract_answer(text: str) -> str | None:
    """Content of the first `<answer>` block (inner whitespace stripped), or None."""
    match = ANSWER.search(text)
    return None if match is None else match.group(1)


def exact_match_reward(completion: str, answer: str, *, strict_format: bool) -> float:
    """1.0 iff the gate passes (when strict) and canon(first answer) == canon(gold)."""
    if strict_format and not passes_format_gate(completion):
        return 0.0
    pred = extract_answer(completion)
    if pred is None:
        return 0.0
    return 1.0 if canon_math(pred) == canon_math(answer) else 0.0


@register_reward("pure_accuracy_math")
def pure_accuracy_math(completion: str, answer: str, *, is_eval: bool = False) -> float:
    """Spec 4.2: strict format gate in training, relaxed in evaluation."""
    return exact_match_reward(completion, answer, strict_format=not is_eval)


@register_reward("pure_accuracy_math_relaxed")
def pure_accuracy_math_relaxed(completion: str, answer: str, *, is_eval: bool = False) -> float:
    """Spec 4.2 without the format gate (the reference's `relaxed_format`)."""
    return exact_match_reward(completion, answer, strict_format=False)
