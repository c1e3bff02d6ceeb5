"""Asynchronous rollouts: a producer thread that collects batches ahead of the update, and a
weight pusher that keeps the rollout server current without blocking training.

With `rollout.max_staleness = s >= 1` (backend 'server') generation overlaps the update: while
the trainer updates on batch k, the producer collects batches k+1..k+s from the server.
Two rules bound how old the sampling weights can be:

* the producer starts collecting batch b only once the server holds weights of version
  >= b - s (`WeightPusher.wait_for`), so a completion trained at step b is at most s steps
  stale (staleness is counted per completion from the version the server reports; anything
  older is dropped by `rollout.staleness`, never silently);
* the queue holds at most s ready batches, so the data stream never runs further ahead.

Every batch carries the data-stream position after its prompts were drawn: a checkpoint
records the position of the last batch an update was APPLIED to, so the prompts of batches
still in flight are drawn again after a resume (none lost, none repeated).

The producer's per-batch work is one callable, `collect(index) -> ReadyBatch` (the trainer's
`Trainer.collect`): a batch filter such as dynamic sampling wraps that callable and the
producer does not change.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Callable

import numpy as np

_POLL_S = 0.1  # how often a blocked thread looks at its stop flag


@dataclasses.dataclass
class Rollout:
    """One step's completions, host side: prompts x G rows, prompt-major."""

    batch: dict[str, np.ndarray]  # the score batch (maxent_jax.scoring), rows = P * G
    utilities: np.ndarray  # [P, G] float32
    reward_parts: dict[str, np.ndarray]  # reward name -> [P * G]
    texts: list[str]
    lengths: np.ndarray  # [P * G] completion tokens
    seconds: float
    versions: np.ndarray | None = None  # [P * G] the weight version that sampled each completion
    valid: np.ndarray | None = None  # [P, G] bool; None = all (dynamic sampling marks its filler groups invalid)


@dataclasses.dataclass
class ReadyBatch:
    """One step's collected rollouts, ready for the update."""

    rows: list[dict[str, Any]]  # the prompts' dataset rows
    rollout: Rollout  # completions, rewards, behaviour log-probs, weight versions
    stream_state: dict[str, int]  # the data stream's position after these prompts were drawn
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the collection's own (dynamic sampling)


class WeightPusher:
    """Pushes the newest submitted weights on a thread; the caller never waits for a push.

    `submit(params, version)` replaces any push still waiting (only the newest weights are
    worth sending), so a push in flight delays the next push, not training. `pushed` is the
    last version the server acknowledged; a push error is raised in the caller's thread at
    its next `submit` or `wait_for`.
    """

    def __init__(self, push: Callable[[Any, int], None], pushed: int):
        self._push = push
        self.pushed = pushed
        self._pending: tuple[Any, int] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="weight-pusher", daemon=True)
        self._thread.start()

    def submit(self, params: Any, version: int) -> None:
        with self._cond:
            self._raise()
            self._pending = (params, version)
            self._cond.notify_all()

    def wait_for(self, version: int, stop: threading.Event) -> bool:
        """Block until the server holds weights of `version` or newer; False when `stop` is set first."""
        with self._cond:
            while self.pushed < version:
                self._raise()
                if stop.is_set() or self._closed:
                    return False
                self._cond.wait(_POLL_S)
            return True

    def close(self) -> None:
        """Send nothing more; a push in flight finishes first."""
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()
        self._thread.join(timeout=60)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                (params, version), self._pending = self._pending, None
            try:
                self._push(params, version)
            except BaseException as err:  # noqa: BLE001 - handed to the trainer's thread
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return
            with self._cond:
                self.pushed = max(self.pushed, version)
                self._cond.notify_all()


class Producer:
    """Collects batches `start, ..., end - 1` on a thread, at most `max_staleness` ahead."""

    def __init__(self, collect: Callable[[int], ReadyBatch], start: int, max_staleness: int, pusher: WeightPusher,
                 *, end: int):
        self._collect = collect
        self._next_index = start
        self._end = end
        self._s = max_staleness
        self._pusher = pusher
        self._queue: queue.Queue = queue.Queue(maxsize=max_staleness)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rollout-producer", daemon=True)
        self._thread.start()

    def next(self) -> ReadyBatch:
        """The next batch in order; an error of the producer (or of a push) is raised here."""
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._thread.is_alive() or not self._queue.empty():
                    continue
                raise RuntimeError("the rollout producer stopped without a batch") from None
            if isinstance(item, BaseException):
                raise item
            return item

    def stop(self) -> None:
        """Collect no further batch; batches in flight are dropped (their prompts were not consumed)."""
        self._stop.set()

    def close(self) -> None:
        self.stop()
        self._thread.join(timeout=60)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _loop(self) -> None:
        try:
            while not self._stop.is_set() and self._next_index < self._end:
                index = self._next_index
                if not self._pusher.wait_for(index - self._s, self._stop):
                    return
                batch = self._collect(index)
                if not self._put(batch):
                    return
                self._next_index = index + 1
        except BaseException as err:  # noqa: BLE001 - handed to the trainer's thread
            self._put(err)


def shut_down(producer: Producer | None, pusher: WeightPusher | None, close_server: Callable[[], None]) -> None:
    """The end of a run, in the order that leaves nothing waiting on a dead server: the producer
    collects no more, a push in flight finishes (the server is still up), then the server stops,
    which ends at once a generation the producer still had in flight."""
    if producer is not None:
        producer.stop()
    if pusher is not None:
        pusher.close()
    close_server()
    if producer is not None:
        producer.close()
