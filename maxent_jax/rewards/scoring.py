"""Batch reward scoring (spec 4.1): weighted utilities, worker processes, failure isolation.

`compute_rewards(names, weights, completions, answers, is_eval=...)` returns the utilities
u_i = sum_r c_r R_r(y_i, a_i) `[N]` and the raw values of each reward, keyed by name.

Failure isolation: every call of a reward function on one completion is guarded. An
exception, a non-finite value, or a call running longer than `item_timeout_s` scores that
completion 0 for that reward and is logged (logger `maxent_jax.rewards.scoring`); the batch
goes on. Time is bounded by an interval timer (SIGALRM) around each call, which works in the
main thread of a process (the trainer's, or a worker's). In worker mode a watchdog also
covers code the timer cannot interrupt (a C extension stuck without returning to Python):
when no worker reports progress within one chunk's time budget, the unfinished completions
score 0, the workers are killed and a fresh pool is started on the next call.

Large batches (>= `min_parallel_batch`) are scored in `num_workers` spawned processes
(spawn, not fork: the trainer process runs JAX threads); `num_workers=0` (config
`rewards.num_workers`) picks `auto_workers()`, `num_workers=None` always scores in-process.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from maxent_jax.errors import UserError
from maxent_jax.rewards.registry import RewardFn, get_reward

log = logging.getLogger(__name__)

_POOL_STARTUP_S = 120.0  # a fresh spawned worker imports numpy, sympy, math-verify first


class _RewardTimeout(BaseException):
    """Raised by the interval timer; a BaseException so `except Exception` in a reward
    function cannot swallow it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _RewardTimeout()


def completion_text(completion: Any) -> str:
    """A completion as text: strings as is, a chat list -> its first message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)) and completion:
        return completion_text(completion[0])
    return ""


def auto_workers() -> int:
    """Worker count for `num_workers=0`: half the CPUs, between 1 and 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def resolve_weights(names: Sequence[str], weights: Sequence[float]) -> list[float]:
    """Reward weights: 1.0 each when `weights` is empty, else one finite weight per name."""
    if not weights:
        return [1.0] * len(names)
    if len(weights) != len(names):
        raise UserError(
            f"reward_weights={list(weights)!r} is not valid for reward_funcs={list(names)!r}; "
            "give one weight per reward, or none for 1.0 each"
        )
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w)):
            raise UserError(f"reward_weights entry {w!r} is not valid; weights must be finite numbers")
    return [float(w) for w in weights]


def score_one(fn: RewardFn, text: str, answer: str, is_eval: bool, timeout_s: float | None) -> tuple[float, str | None]:
    """One guarded call: (value, None) or (0.0, reason) on exception / timeout / non-finite.

    A `timeout_s` arms the interval timer, whose SIGALRM handler (`_on_alarm`) the caller has
    installed (`score_chunk`, once per chunk: installing it per call cost more than a cheap reward).
    """
    try:
        try:
            if timeout_s:
                signal.setitimer(signal.ITIMER_REAL, float(timeout_s))
            value = float(fn(text, answer, is_eval=is_eval))
        finally:
            if timeout_s:
                signal.setitimer(signal.ITIMER_REAL, 0.0)
    except _RewardTimeout:
        return 0.0, f"timed out after {timeout_s}s"
    except Exception as err:  # a reward must never kill the run: score 0 and report
        return 0.0, f"raised {type(err).__name__}: {err}"
    if not math.isfinite(value):
        return 0.0, f"returned non-finite {value}"
    return value, None


def score_chunk(
    fns: Sequence[RewardFn], texts: Sequence[str], answers: Sequence[str], is_eval: bool, timeout_s: float | None
) -> list[tuple[list[float], list[str | None]]]:
    """Score a chunk of completions with every reward: per item (values, failure reasons).

    Calls are timed only in a main thread (the only one that receives signals).
    """
    timed = bool(timeout_s) and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _on_alarm) if timed else None
    try:
        out = []
        for text, answer in zip(texts, answers):
            results = [score_one(fn, text, answer, is_eval, timeout_s if timed else None) for fn in fns]
            out.append(([v for v, _ in results], [e for _, e in results]))
        return out
    finally:
        if timed:
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)


class RewardScorer:
    """Scores batches with a fixed list of rewards; owns the worker pool (reuse it per run).

    Args:
      names: registered reward names (config `reward_funcs`).
      weights: one weight per name, or empty for 1.0 each (`reward_weights`).
      num_workers: worker processes for large batches (0: `auto_workers()`; None: in-process).
      item_timeout_s: time limit of one reward call on one completion (None: unlimited).
      min_parallel_batch: batches smaller than this are scored in-process.
      watchdog_grace_s: slack added to a chunk's time budget before the workers count as stuck.
    """

    def __init__(
        self,
        names: Sequence[str],
        weights: Sequence[float] = (),
        *,
        num_workers: int | None = 0,
        item_timeout_s: float | None = 30.0,
        min_parallel_batch: int = 64,
        watchdog_grace_s: float = 5.0,
    ) -> None:
        if not names:
            raise UserError("reward_funcs=[] is not valid; name at least one registered reward")
        if len(set(names)) != len(names):
            raise UserError(f"reward_funcs={list(names)!r} is not valid; a reward may appear only once")
        if num_workers is not None and num_workers < 0:
            raise UserError(f"rewards.num_workers={num_workers!r} is not valid; it must be >= 0")
        if item_timeout_s is not None and not item_timeout_s > 0:
            raise UserError(f"rewards.timeout_s={item_timeout_s!r} is not valid; it must be > 0 or None")
        self.names = list(names)
        self.weights = resolve_weights(names, weights)
        self._fns = [get_reward(n) for n in names]
        self.num_workers = 0 if num_workers is None else (num_workers or auto_workers())
        self.item_timeout_s = item_timeout_s
        self.min_parallel_batch = min_parallel_batch
        self.watchdog_grace_s = watchdog_grace_s
        self.last_failures: list[str] = []
        self._pool: Any = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __call__(
        self, completions: Sequence[Any], answers: Sequence[str], *, is_eval: bool
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(utilities `[N]` float32, {reward name: raw values `[N]` float32})."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        texts = [completion_text(c) for c in completions]
        answers = [str(a) for a in answers]
        if self.num_workers > 0 and len(texts) >= self.min_parallel_batch:
            rows = self._score_in_workers(texts, answers, is_eval)
        else:
            rows = score_chunk(self._fns, texts, answers, is_eval, self.item_timeout_s)
        values = np.zeros((len(texts), len(self._fns)), np.float64)
        self.last_failures = []
        for i, (row, errors) in enumerate(rows):
            values[i] = row
            for name, error in zip(self.names, errors):
                if error is not None:
                    message = f"reward {name!r} on completion {i} ({texts[i][:60]!r}...) {error}; scored 0"
                    self.last_failures.append(message)
                    log.warning(message)
        utilities = values @ np.asarray(self.weights, np.float64)
        per_reward = {name: values[:, r].astype(np.float32) for r, name in enumerate(self.names)}
        return utilities.astype(np.float32), per_reward

    def _score_in_workers(
        self, texts: list[str], answers: list[str], is_eval: bool
    ) -> list[tuple[list[float], list[str | None]]]:
        startup = 0.0
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
            startup = _POOL_STARTUP_S
        n = len(texts)
        size = max(1, math.ceil(n / (self.num_workers * 4)))
        starts = list(range(0, n, size))
        done: queue.Queue = queue.Queue()
        for chunk, start in enumerate(starts):
            self._pool.apply_async(
                score_chunk,
                (self._fns, texts[start : start + size], answers[start : start + size], is_eval, self.item_timeout_s),
                callback=lambda res, c=chunk: done.put((c, res, None)),
                error_callback=lambda err, c=chunk: done.put((c, None, err)),
            )
        budget = (self.item_timeout_s or 60.0) * len(self._fns) * size + self.watchdog_grace_s
        results: dict[int, Any] = {}
        while len(results) < len(starts):
            try:
                chunk, res, err = done.get(timeout=budget + (startup if not results else 0.0))
            except queue.Empty:
                break
            results[chunk] = res if err is None else f"worker failed: {type(err).__name__}: {err}"
        stuck = len(results) < len(starts)
        if stuck:
            self.close()
        rows: list[tuple[list[float], list[str | None]]] = []
        zeros = [0.0] * len(self._fns)
        for chunk, start in enumerate(starts):
            count = min(size, n - start)
            res = results.get(chunk, f"no progress from the workers within {budget:.0f}s (pool restarted)")
            if isinstance(res, str):
                rows.extend((list(zeros), [res] * len(self._fns)) for _ in range(count))
            else:
                rows.extend(res)
        return rows


def compute_rewards(
    names: Sequence[str],
    weights: Sequence[float],
    completions: Sequence[Any],
    answers: Sequence[str],
    *,
    is_eval: bool,
    num_workers: int | None = 0,
    item_timeout_s: float | None = 30.0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One-shot scoring; a training loop should keep a `RewardScorer` to reuse its workers."""
    with RewardScorer(names, weights, num_workers=num_workers, item_timeout_s=item_timeout_s) as scorer:
        return scorer(completions, answers, is_eval=is_eval)
