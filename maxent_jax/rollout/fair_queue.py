"""The rollout server's engine turn: one caller at a time, taken in turn by client, a bounded wait.

The server lets one request at a time into its backend (that is what makes a weight push atomic
for generation). A plain lock lets whoever grabs it first go next, so one client sending
requests back to back can keep another waiting for as long as it likes. Here callers wait in one
queue per client and the turn passes round-robin between clients that are waiting: a request
waits for at most one request of each other waiting client before it runs (and the request
limits, `rollout/limits.py`, bound how long one request runs). The number of waiting callers is
bounded; one more is refused at once (HTTP 429) instead of holding a thread without limit.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Hashable, Iterator

from maxent_jax.rollout.protocol import ProtocolError


class FairQueue:
    """A lock whose waiters are served by client in turn; `hold(client)` is the critical section.

    Each waiting client has a place in the rotation: the number of turns granted when it
    arrived, or, when it is being served (or arrives while it is), half a turn later, behind
    everyone who arrives during that turn. The client with the earliest place goes next (its
    oldest request). So a client that keeps many requests queued gets one turn, then waits
    behind every client that arrived meanwhile, and a client that only just arrived cannot jump
    ahead of those already waiting (a flood of new client tags is served in arrival order, not
    before the clients it found waiting).
    """

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._busy = False
        self._turns = 0  # turns granted so far
        self._running: Hashable | None = None  # the client of the current (or last) turn
        self._place: dict[Hashable, float] = {}  # client -> its place in the rotation
        self._queues: dict[Hashable, collections.deque] = {}
        self._waiting = 0

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._waiting

    @contextlib.contextmanager
    def hold(self, client: Hashable, *, bounded: bool = True) -> Iterator[None]:
        """Wait for this client's turn, run the body, pass the turn on.

        `bounded=False` (weight pushes, already authenticated) waits even when the queue is full,
        so a flood of generate requests cannot lock the trainer out of its own server.
        """
        with self._cond:
            if self._busy or self._waiting:
                if bounded and self._waiting >= self.max_waiting:
                    raise ProtocolError(
                        f"server busy: {self._waiting} requests are already waiting for the engine "
                        f"(this server allows max_queued_requests={self.max_waiting} (--max-queued-requests)); retry later", 429)
                ticket = object()
                if client not in self._queues:
                    self._queues[client] = collections.deque()
                    self._place[client] = self._turns + (0.5 if client == self._running and self._busy else 0)
                self._queues[client].append(ticket)
                self._waiting += 1
                try:
                    self._cond.wait_for(lambda: not self._busy and self._head() is ticket)
                finally:
                    self._waiting -= 1
                    self._leave(client, ticket)
            self._turns += 1
            self._running = client
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _head(self) -> object | None:
        """The ticket whose turn is next: the oldest of the client with the earliest place."""
        if not self._queues:
            return None
        client = min(self._queues, key=self._place.__getitem__)  # dicts keep arrival order: ties go to the first
        return self._queues[client][0]

    def _leave(self, client: Hashable, ticket: object) -> None:
        """Take `ticket` out as its turn starts; the client's other requests go behind this turn's arrivals."""
        queue = self._queues[client]
        queue.remove(ticket)
        if queue:  # arrivals during the turn about to start get place _turns + 1
            self._place[client] = self._turns + 1.5
        else:
            del self._queues[client], self._place[client]
