"""Graceful stop on SIGTERM/SIGINT (Slurm preemption, Ctrl-C): save, then exit 0.

The first signal only sets a flag; the training loop checks `should_stop()` after each
optimizer step, saves a checkpoint and returns, so no step is left half-applied. A second
signal means "now": the process exits at once with status 128 + signal number.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import types
from typing import Callable

import jax
import numpy as np

_Handler = Callable[[int, types.FrameType | None], object] | int | None


class PreemptionGuard:
    """Context manager installing the two-stage SIGTERM/SIGINT handlers (main thread only)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self._received: signal.Signals | None = None
        self._previous: dict[signal.Signals, _Handler] = {}

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered on the main thread (signal handlers live there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self._received is not None:
            print(f"\nreceived {sig.name} again: exiting now without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self._received = sig
        print(
            f"\nreceived {sig.name}: finishing the current step, then saving a checkpoint and exiting "
            f"(send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def received(self) -> signal.Signals | None:
        """The first signal received on this process, if any."""
        return self._received

    def should_stop(self) -> bool:
        """True when any process received a stop signal; every process gets the same answer.

        With several processes the flag is all-gathered (a tiny collective per call), so all of
        them stop after the same step and the final checkpoint's collectives line up.
        """
        local = self._received is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(local))))
