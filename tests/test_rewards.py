"""Rewards: spec 4.2 exact match (format gate, first <answer>, canon steps), format, math_verify."""

import pytest

from maxent_jax.errors import UserError
from maxent_jax.rewards import available_rewards, compute_rewards, get_reward
from maxent_jax.rewards.math_accuracy import canon_math, pure_accuracy_math, pure_accuracy_math_relaxed

GOOD = "<think>work</think>\n<answer>{}</answer>"


@pytest.mark.parametrize(
    "text, is_eval, expected",
    [
        (GOOD.format("5"), False, 1.0),
        ("<THINK>a</THINK> <Answer> 5 </ANSWER>", False, 1.0),  # case-insensitive, inner spaces
        (" " + GOOD.format("5"), False, 0.0),  # leading whitespace fails the gate
        (" " + GOOD.format("5"), True, 1.0),  # eval is relaxed
        ("<answer>5</answer>", False, 0.0),  # no <think> block in training
        ("<answer>5</answer>", True, 1.0),
        ("so <think>a</think><answer>5</answer>", False, 0.0),  # gate anchored at character 0
        ("<think>a</think><answer>4</answer><answer>5</answer>", False, 0.0),  # only the first counts
        ("<think>a</think>5", False, 0.0),
        ("<think>a</think><answer>\n  5\n</answer>", False, 1.0),
        ("<think>line\nbreaks</think>text\n<answer>5</answer> tail", False, 1.0),  # dot-all
    ],
)
def test_gate_and_extraction(text, is_eval, expected):
    assert pure_accuracy_math(text, "5", is_eval=is_eval) == expected


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        (r"\frac{1}{2}", "1/2", 1.0),
        (r"\frac { 1 } { 2 }", "1/2", 1.0),
        (r"\dfrac{1}{2}", "1/2", 0.0),  # \dfrac untouched
        (r"\frac12", "1/2", 0.0),  # \frac12 untouched
        (r"\frac{\sqrt{2}}{2}", r"(\sqrt{2})/(2)", 0.0),  # braces inside: untouched
        (r"$\left( 3 \right)$", "3", 1.0),
        ("π/2", r"\pi/2", 1.0),
        ("2∞", r"2\infty", 1.0),
        ("{5}", "5", 1.0),
        ("(x)", "x", 1.0),
        (r"( -\sqrt3 )", r"-\sqrt3", 1.0),
        ("(a, b)", "(a,b)", 1.0),
        ("(1, 2)", "1,2", 0.0),  # parentheses kept: the content has a comma and a space
        ("-0", "0", 1.0),
        ("+0", "0", 1.0),
        ("5.000", "5", 1.0),
        ("-3.0", "-3", 1.0),
        ("5.50", "5.5", 0.0),
        ("1,000", "1000", 0.0),
        (r"\sqrt{2}", r"\sqrt2", 0.0),
        ("x = 3", "x=3", 1.0),
        (r"3\,000", "3000", 1.0),
    ],
)
def test_canonicalisation(pred, gold, expected):
    assert pure_accuracy_math(GOOD.format(pred), gold) == expected


def test_canon_edge_cases():
    assert canon_math(None) == ""
    assert canon_math("  ") == ""
    assert canon_math(r"\frac{a}{b}+\frac{c}{d}") == "a/b+c/d"
    assert canon_math("((a))") == "(a)"  # one pass of step 5
    assert pure_accuracy_math_relaxed("<answer>7</answer>", "7", is_eval=False) == 1.0


def test_format_reward():
    fmt = get_reward("format")
    assert fmt(GOOD.format("1"), "", is_eval=False) == 1.0
    assert fmt("<answer>1</answer>", "", is_eval=False) == 0.0
    assert fmt(" " + GOOD.format("1"), "", is_eval=True) == 0.0


@pytest.mark.parametrize(
    "pred, gold, expected",
    [(r"\frac12", "0.5", 1.0), ("0.5", r"\frac{1}{2}", 1.0), ("1+x", "x+1", 1.0), ("3", "4", 0.0),
     (r"\boxed{3}", "3", 1.0), ("", "0", 0.0)],
)
def test_math_verify_equivalence(pred, gold, expected):
    assert get_reward("math_verify")(f"<answer>{pred}</answer>", gold, is_eval=False) == expected


def test_compute_rewards_weights_and_chat_completions():
    completions = [GOOD.format("2"), [{"role": "assistant", "content": GOOD.format("3")}], "<answer>2</answer>"]
    u, per = compute_rewards(["pure_accuracy_math", "format"], [2.0, 0.5], completions, ["2", "2", "2"], is_eval=False)
    assert per["pure_accuracy_math"].tolist() == [1.0, 0.0, 0.0]
    assert per["format"].tolist() == [1.0, 1.0, 0.0]
    assert u.tolist() == [2.5, 0.5, 0.0]
    u, _ = compute_rewards(["pure_accuracy_math"], [], completions, ["2", "2", "2"], is_eval=True)
    assert u.tolist() == [1.0, 0.0, 1.0]


def test_registry_and_weight_errors():
    assert {"pure_accuracy_math", "format", "math_verify"} <= set(available_rewards())
    with pytest.raises(UserError, match="'nope'"):
        get_reward("nope")
    with pytest.raises(UserError, match="reward_weights"):
        compute_rewards(["format"], [1.0, 2.0], ["x"], ["y"], is_eval=False)
