"""pass@k against brute-force enumeration of k-subsets; summary and table."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from maxent_jax import eval_metrics as em


def _brute_force(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (c correct) holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 10).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_enumeration(nck):
    n, c, k = nck
    assert em.pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_hand_values_and_stability():
    assert em.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert em.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs contain the correct one
    assert em.pass_at_k(4, 0, 4) == 0.0 and em.pass_at_k(4, 4, 1) == 1.0
    assert em.pass_at_k(5, 3, 3) == 1.0  # n - c < k: every 3-subset has a correct sample
    # n = 1000 overflows float binomials C(1000, 500); the product form stays exact enough
    exact = 1 - math.comb(990, 500) / math.comb(1000, 500)
    assert em.pass_at_k(1000, 10, 500) == pytest.approx(exact, rel=1e-12)
    batch = em.pass_at_k(np.array([4, 4, 8]), np.array([0, 1, 8]), 2)
    np.testing.assert_allclose(batch, [0.0, 0.5, 1.0])


def test_pass_at_k_rejects_bad_inputs():
    with pytest.raises(ValueError, match="1 <= k <= num_samples"):
        em.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="num_correct"):
        em.pass_at_k(4, 5, 1)


def test_summary_and_table():
    results = [
        {"num_samples": 4, "num_correct": 1, "missing_answer": 1, "missing_format": 2},
        {"num_samples": 4, "num_correct": 4, "missing_answer": 0, "missing_format": 0},
    ]
    summary = em.summarize(results, ks=(1, 2, 8))
    assert summary == {
        "problems": 2, "samples": 8, "accuracy": pytest.approx(0.625),
        "format/missing_answer_frac": 0.125, "format/missing_format_frac": 0.25,
        "pass@1": pytest.approx(0.625), "pass@2": pytest.approx(0.75),
    }  # pass@8 is left out: k exceeds the 4 samples per problem
    table = em.format_table(summary, "math_500 @ ckpt")
    lines = table.splitlines()
    assert lines[0] == "math_500 @ ckpt"
    assert any(line.startswith("pass@2 ") and line.endswith("0.7500") for line in lines)
    assert len({len(line) for line in lines[1:]}) == 1  # aligned columns
    assert em.summarize([], ks=(1,)) == {"problems": 0}
