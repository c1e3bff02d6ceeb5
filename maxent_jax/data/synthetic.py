"""The offline task of the embedded default: small arithmetic problems with worked solutions.

Rows have the same columns as a real math dataset (`problem`, `answer`) plus `solution`, a
worked completion in the `<think>...</think><answer>...</answer>` format that the supervised
warm-up teaches. Generation is deterministic in the seed, needs no download, and the train and
eval splits never share a problem.
"""

from __future__ import annotations

import numpy as np

from maxent_jax.errors import UserError

OPERATORS = ("+", "-", "*")


def _solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def all_problems(max_operand: int, operators: str = "".join(OPERATORS)) -> list[tuple[int, str, int]]:
    unknown = set(operators) - set(OPERATORS)
    if unknown or not operators:
        raise UserError(f"config field data.synthetic.operators={operators!r} is invalid: use some of {''.join(OPERATORS)!r}")
    return [(a, op, b) for op in operators for a in range(max_operand + 1) for b in range(max_operand + 1)]


def make_row(a: int, op: str, b: int) -> dict[str, str]:
    value = _solve(a, op, b)
    return {
        "problem": f"Compute {a} {op} {b}.",
        "answer": str(value),
        "solution": f"<think>{a} {op} {b} = {value}</think><answer>{value}</answer>",
    }


def arithmetic_splits(num_train: int, num_eval: int, max_operand: int, seed: int,
                      operators: str = "".join(OPERATORS)) -> dict[str, list[dict[str, str]]]:
    """Disjoint train/eval rows. The train split cycles through its problems when num_train exceeds
    them (a dataset larger than the problem space is just more epochs)."""
    problems = all_problems(max_operand, operators)
    order = np.random.default_rng(seed).permutation(len(problems))
    n_eval = min(num_eval, len(problems) // 4)
    eval_ids, train_ids = order[:n_eval], order[n_eval:]
    train = [make_row(*problems[train_ids[i % len(train_ids)]]) for i in range(num_train)]
    evaluation = [make_row(*problems[i]) for i in eval_ids]
    return {"train": train, "test": evaluation}
