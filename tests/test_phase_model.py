"""The phase model of docs/rollout.md (maxent_jax/bench/phase_model.py): its arithmetic and that the
page shows exactly what the module computes from the docs/benchmarks.md figures."""

import pathlib

import pytest
from hypothesis import given, settings, strategies as st

from maxent_jax.bench import phase_model
from maxent_jax.bench.phase_model import Phases

ROLLOUT_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "rollout.md"


def test_synchronous_is_the_sum_and_overlapped_the_larger_side():
    p = Phases(generation=3.0, scoring=0.5, update=1.0, push=0.5)
    assert (p.rest, p.synchronous, p.overlapped, p.speedup) == (2.0, 5.0, 3.0, pytest.approx(5 / 3))
    slow_trainer = Phases(generation=1.0, scoring=1.0, update=2.0, push=1.0)
    assert slow_trainer.overlapped == 4.0 and slow_trainer.speedup == pytest.approx(5 / 4)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(*[st.floats(0.001, 100.0)] * 4)
def test_overlap_gains_between_1x_and_2x(generation, scoring, update, push):
    speedup = Phases(generation, scoring, update, push).speedup
    assert 1.0 <= speedup <= 2.0 + 1e-12


def test_qwen_figures_and_the_rollout_page_agree():
    fast = phase_model.qwen2_5_1_5b_h100(3.52)
    assert fast.push == pytest.approx(3.08 / 3.52) and fast.scoring == pytest.approx(0.0003 + 0.340 / 3)
    assert fast.speedup == pytest.approx((3.19 + 0.1136 + 0.340 + 0.875) / 3.19, rel=1e-3)
    assert phase_model.markdown_table() in ROLLOUT_DOC.read_text(), "run: python -m maxent_jax.bench.phase_model"
