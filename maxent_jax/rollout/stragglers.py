"""Straggler-tolerant batches: the first complete groups fill a step's batch; a group still
generating joins a later batch, so one long completion never stalls a step.

With `rollout.max_staleness >= 1` and `rollout.straggler_groups = W >= 1` (backend 'server'),
each prompt group is generated on its own thread (one request to the server, so one weight
version per group), and `W` groups more than a batch are kept in flight. A batch of P groups is
formed from the first P groups that complete, in completion order; the others carry over to the
next batch with the version that sampled them, so their staleness is counted and the existing
drop rule (`rollout.staleness`) applies. A group is never split.

Prompts are then no longer trained in stream order, so the resume record is more than a stream
position: `floor` is the stream position of the batch holding the oldest prompt not yet
applied, and `applied` lists the prompts beyond it already applied (up to P more for each
batch the oldest straggler stays pending: few unless a group hangs). A resumed run restores the
stream to `floor` and skips the prompts in `applied`: every prompt is consumed exactly once
(`tests/test_async_stragglers.py`).
A prompt is identified by its ticket `(epoch, index in the epoch's order)`.

One host process only (the per-prompt order is the single host's stream order).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable

from maxent_jax.errors import UserError
from maxent_jax.data.stream import BatchStream, StreamPosition
from maxent_jax.rollout.dynamic_sampling import merge_rollouts
from maxent_jax.rollout.producer import ReadyBatch, Rollout

Ticket = tuple[int, int]  # (epoch, index in the epoch's permutation)
_POLL_S = 0.1


class PromptFeed:
    """The stream's prompts one at a time, each with its ticket, skipping prompts already applied."""

    def __init__(self, stream: BatchStream, record: dict[str, Any] | None = None):
        self._stream = stream
        self._batch = stream._batch  # prompts per stream batch (one host)
        self._buffer: collections.deque[tuple[Ticket, Any]] = collections.deque()
        self._skip: set[Ticket] = set()
        if record is not None:
            stream.restore(record)
            self._skip = {(int(e), int(j)) for e, j in record.get("applied", [])}

    def next(self) -> tuple[Ticket, Any]:
        while True:
            while not self._buffer:
                rows = self._stream.next()
                pos = self._stream.position  # after this batch: its first prompt is offset - len(rows)
                start = pos.offset - len(rows)
                self._buffer.extend(((pos.epoch, start + i), row) for i, row in enumerate(rows))
            ticket, row = self._buffer.popleft()
            if ticket not in self._skip:  # skipped prompts stay listed until the floor passes them
                return ticket, row

    def buffered(self) -> list[Ticket]:
        """Drawn from the stream, not yet handed out (nor applied before a resume)."""
        return [t for t, _ in self._buffer if t not in self._skip]

    def record(self, unapplied: list[Ticket], applied: set[Ticket]) -> dict[str, Any]:
        """The resume record once every prompt in `applied` is trained and those in `unapplied`
        (in flight, or drawn and not yet issued) are not: the floor position and the applied
        tickets beyond it, those a resume skips included (a second crash must skip them too)."""
        pending = unapplied + self.buffered()
        if pending:
            epoch, index = min(pending)
            floor = StreamPosition(epoch, index - index % self._batch)
        else:
            floor = self._stream.position
        self._skip = {t for t in self._skip if t >= (floor.epoch, floor.offset)}
        done = sorted(t for t in applied | self._skip if t >= (floor.epoch, floor.offset))
        return {"epoch": floor.epoch, "offset": floor.offset, "applied": [list(t) for t in done]}


class StragglerCollector:
    """`collect(index) -> ReadyBatch` for the producer: P groups per batch, from P + W in flight."""

    def __init__(self, feed: PromptFeed, sample: Callable[[list[dict[str, Any]], int], Rollout], *,
                 groups: int, extra: int, pad_id: int):
        self._feed = feed
        self._sample = sample  # (one prompt's row, batch index) -> its group's Rollout
        self._groups = groups
        self._extra = extra
        self._pad_id = pad_id
        self._cond = threading.Condition()
        self._in_flight: dict[Ticket, tuple[Any, int]] = {}  # ticket -> (row, batch index it was issued for)
        self._done: collections.deque[tuple[Ticket, Any, int, Rollout]] = collections.deque()  # completion order
        self._error: BaseException | None = None
        self._applied: set[Ticket] = set()  # taken into a batch (applied once that batch's update is)

    def collect(self, index: int) -> ReadyBatch:
        start = time.monotonic()
        with self._cond:
            while len(self._in_flight) + len(self._done) < self._groups + self._extra:
                ticket, row = self._feed.next()
                self._in_flight[ticket] = (row, index)
                threading.Thread(target=self._run, args=(ticket, row, index), daemon=True,
                                 name="rollout-group").start()
            while len(self._done) < self._groups:
                if self._error is not None:
                    raise self._error
                self._cond.wait(_POLL_S)
            taken = [self._done.popleft() for _ in range(self._groups)]
            self._applied.update(t for t, *_ in taken)
            generating = len(self._in_flight)
            unapplied = list(self._in_flight) + [t for t, *_ in self._done]
            record = self._feed.record(unapplied, self._applied)
            floor = (record["epoch"], record["offset"])
            self._applied = {t for t in self._applied if t >= floor}
        rollout = merge_rollouts([ro for *_, ro in taken], [(i, 0) for i in range(len(taken))], self._pad_id)
        rollout.seconds = time.monotonic() - start  # the wait for this batch (the groups generated concurrently)
        metrics = {"train/rollout/carried_groups": float(sum(issued < index for *_, issued, _ in taken)),
                   "train/rollout/groups_generating": float(generating)}
        return ReadyBatch(rows=[row for _, row, _, _ in taken], rollout=rollout, stream_state=record, metrics=metrics)

    def _run(self, ticket: Ticket, row: Any, index: int) -> None:
        try:
            ro = self._sample([row], index)
        except BaseException as err:  # noqa: BLE001 - raised in the producer's thread at its next collect
            with self._cond:
                self._error = err
                self._cond.notify_all()
            return
        with self._cond:
            del self._in_flight[ticket]
            self._done.append((ticket, row, index, ro))
            self._cond.notify_all()


def applied_part(record: dict[str, Any], straggler_groups: int) -> dict[str, Any]:
    """The applied prompts beyond the floor of a checkpoint's stream record ({} when it has none).
    Only a run with carry-over skips them: resumed without it, they would be trained again."""
    if record.get("applied") and not straggler_groups:
        raise UserError(f"the checkpoint lists {len(record['applied'])} prompts trained beyond its data-stream "
                        "position (a run with rollout.straggler_groups >= 1); resume it with "
                        "rollout.straggler_groups >= 1, or they are trained again")
    return {"applied": record["applied"]} if "applied" in record else {}


def collector_for(trainer: Any) -> Callable[[int], ReadyBatch]:
    """The trainer's collector: its stream from the last applied record, `Trainer._sampled` per group."""
    import jax

    if jax.process_count() != 1:
        raise UserError(f"rollout.straggler_groups={trainer.config.rollout.straggler_groups} runs on one host "
                        f"process (this run has {jax.process_count()}); set it to 0")
    return StragglerCollector(PromptFeed(trainer.stream, trainer.applied_stream), trainer._sampled,
                              groups=trainer.num_prompts, extra=trainer.config.rollout.straggler_groups,
                              pad_id=trainer.policy.pad_id).collect
