"""Guarded scoring: a reward that raises, hangs or returns NaN on one completion scores it 0,
is logged, and the batch goes on, in-process and in spawned worker processes."""

import logging
import signal
import time

import pytest

from maxent_jax.rewards import RewardScorer, register_reward


@register_reward("test_fragile")
def fragile(completion: str, answer: str, *, is_eval: bool = False) -> float:
    """Scores 1, but raises on 'boom', sleeps on 'hang', blocks the timer on 'stuck', NaN on 'nan'."""
    if completion == "boom":
        raise RuntimeError("boom")
    if completion == "hang":
        time.sleep(60)
    if completion == "stuck":  # emulates C code that never returns to the interpreter
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(60)
    if completion == "nan":
        return float("nan")
    return 1.0


def test_in_process_failures_score_zero_and_are_logged(caplog):
    scorer = RewardScorer(["test_fragile", "format"], item_timeout_s=0.3)
    handler_before = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="maxent_jax.rewards.scoring"):
        u, per = scorer(["ok", "boom", "hang", "nan", "ok"], ["a"] * 5, is_eval=False)
    assert time.monotonic() - start < 5
    assert per["test_fragile"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert u.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert len(scorer.last_failures) == 3
    text = caplog.text
    assert "RuntimeError: boom" in text and "timed out after 0.3s" in text and "non-finite" in text
    assert signal.getsignal(signal.SIGALRM) == handler_before  # the caller's handler is restored


@pytest.mark.slow
def test_worker_pool_isolates_failures_and_recovers_from_stuck_workers(caplog):
    items = ["ok", "boom", "hang", "ok", "stuck", "ok", "ok", "nan"]
    with RewardScorer(["test_fragile"], num_workers=2, item_timeout_s=0.5, min_parallel_batch=4,
                      watchdog_grace_s=1.0) as scorer:
        with caplog.at_level(logging.WARNING, logger="maxent_jax.rewards.scoring"):
            u, _ = scorer(items, ["a"] * len(items), is_eval=False)
        assert u.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
        assert "no progress from the workers" in caplog.text
        # the stuck pool was replaced: the next batch is scored by fresh workers
        u, _ = scorer(["ok"] * 4 + ["boom"], ["a"] * 5, is_eval=False)
        assert u.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
