"""The many-answer task: generated rows, the exact checker and the count of distinct right answers."""

import itertools

import pytest

from maxent_jax.config import get_base_config
from maxent_jax.data.pair_sum import num_solutions, pair_sum_splits, parse_spec, solution_counts, targets
from maxent_jax.data.sources import load_rows
from maxent_jax.errors import UserError
from maxent_jax.rewards import get_reward
from maxent_jax.rewards.pair_sum import correct_pair, distinct_correct

SPEC = "sum=7,max=9"


def done(pair: str, think: str = "7 - 3 = 4") -> str:
    return f"<think>{think}</think><answer>{pair}</answer>"


@pytest.mark.parametrize("max_operand", [1, 4, 9])
def test_num_solutions_counts_every_pair(max_operand):
    for total in range(0, 2 * max_operand + 3):
        brute = sum(a + b == total for a, b in itertools.product(range(max_operand + 1), repeat=2))
        assert num_solutions(total, max_operand) == brute
    assert all(num_solutions(t, max_operand) >= 2 for t in targets(max_operand))


def test_rows_are_deterministic_and_their_worked_solutions_are_right():
    splits = pair_sum_splits(num_train=200, num_eval=100, max_operand=9, seed=3)
    assert splits == pair_sum_splits(num_train=200, num_eval=100, max_operand=9, seed=3)
    assert [parse_spec(r["answer"])[0] for r in splits["test"]] == targets(9)  # one eval row per sum
    for row in splits["train"]:
        assert correct_pair(row["solution"], row["answer"], strict_format=True) is not None
        total, max_operand = parse_spec(row["answer"])
        assert row["problem"] == f"Write two numbers from 0 to {max_operand} that add up to {total}."
    # the warm-up sees many different right pairs for one sum, not one memorised answer
    sevens = {r["solution"] for r in splits["train"] if r["answer"] == SPEC}
    assert len(sevens) >= 5
    assert solution_counts([SPEC, "sum=1,max=9", "sum=17,max=9"]) == [8, 2, 2]


@pytest.mark.parametrize("completion, expected", [
    (done("3 + 4"), (3, 4)),
    (done("4+4"), None),  # wrong sum
    (done("7 + 0"), (7, 0)),
    (done("07 + 0"), (7, 0)),  # leading zero: the same pair
    (done("10 + -3"), None),
    (done("12 + 0", think="x"), None),
    (done("3 + 4 + 0"), None),
    (done("3 + 4."), None),
    (done("seven"), None),
    ("<think>x</think>no answer", None),
])
def test_checker(completion, expected):
    assert correct_pair(completion, SPEC, strict_format=True) == expected


def test_checker_bounds_come_from_the_row():
    assert correct_pair(done("12 + 0"), "sum=12,max=12", strict_format=False) == (12, 0)
    assert correct_pair(done("12 + 0"), "sum=12,max=9", strict_format=False) is None
    with pytest.raises(ValueError, match="sum=N,max=M"):
        correct_pair(done("3 + 4"), "7", strict_format=False)


def test_format_gate_only_in_training():
    loose = "  <answer>3 + 4</answer>"
    assert correct_pair(loose, SPEC, strict_format=True) is None
    assert correct_pair(loose, SPEC, strict_format=False) == (3, 4)
    reward = get_reward("pair_sum")
    assert reward(loose, SPEC, is_eval=False) == 0.0
    assert reward(loose, SPEC, is_eval=True) == 1.0
    assert reward(done("5 + 2"), SPEC) == 1.0


def test_distinct_correct_counts_different_right_pairs_in_order():
    samples = [done("3 + 4"), done("3+4"), done("4 + 3"), done("03 + 4"), done("1 + 6"), done("1 + 1"), "junk"]
    assert distinct_correct(samples, SPEC) == 3  # (3, 4), (4, 3), (1, 6)
    assert distinct_correct([], SPEC) == 0
    assert distinct_correct([done("2 + 2")] * 4, SPEC) == 0


def test_load_rows_builds_the_task_and_names_the_valid_tasks():
    config = get_base_config()
    config.data.dataset_name = "synthetic:pair_sum"
    config.data.synthetic.max_operand = 5
    rows = load_rows(config.data, seed=0)
    assert len(rows["eval"]) == len(targets(5)) and len(rows["train"]) == config.data.synthetic.num_train
    config.data.dataset_name = "synthetic:pairs"
    with pytest.raises(UserError, match="'synthetic:arithmetic', 'synthetic:pair_sum'"):
        load_rows(config.data, seed=0)
