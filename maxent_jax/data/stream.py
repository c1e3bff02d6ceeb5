"""A deterministic, resumable stream of prompt batches.

Each epoch is a permutation drawn from (seed, epoch); the position (epoch, offset) is all the
state there is, so a checkpoint stores two integers and a resumed run continues with exactly
the batches it would have seen (the reference restarts at epoch 0). With several host
processes every host walks the same global order and keeps its own slice of each global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

import numpy as np

from maxent_jax.errors import UserError

T = TypeVar("T")


@dataclasses.dataclass
class StreamPosition:
    epoch: int = 0
    offset: int = 0


class BatchStream:
    def __init__(self, rows: Sequence[T], batch_size: int, seed: int, *, process_index: int = 0,
                 process_count: int = 1, position: StreamPosition | None = None):
        if len(rows) < batch_size * process_count:
            raise UserError(
                f"the dataset has {len(rows)} rows, fewer than one global batch (train.per_device_train_batch_size="
                f"{batch_size} x {process_count} processes)"
            )
        self._rows = rows
        self._batch = batch_size
        self._seed = seed
        self._index = process_index
        self._count = process_count
        self.position = position or StreamPosition()

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, epoch]).permutation(len(self._rows))

    def next(self) -> list[T]:
        """This host's slice of the next global batch; a partial tail of an epoch is skipped."""
        global_batch = self._batch * self._count
        if self.position.offset + global_batch > len(self._rows):
            self.position = StreamPosition(self.position.epoch + 1, 0)
        order = self._order(self.position.epoch)
        start = self.position.offset + self._index * self._batch
        batch = [self._rows[i] for i in order[start:start + self._batch]]
        self.position = StreamPosition(self.position.epoch, self.position.offset + global_batch)
        return batch

    def state(self) -> dict[str, int]:
        return dataclasses.asdict(self.position)

    def restore(self, state: dict[str, int]) -> None:
        self.position = StreamPosition(int(state["epoch"]), int(state["offset"]))
