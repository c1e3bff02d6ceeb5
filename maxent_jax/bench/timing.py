"""Repeated, interleaved runs: ours, peer, ours, peer, ... so both see the same machine load.

The machine is shared with other jobs, so runs of the two sides are alternated rather than
done in two blocks; each side's first run (compilation, caches, thread pools) is not counted.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from maxent_jax.bench.report import Figure, load_average

Run = Callable[[], dict[str, float]]  # one timed run -> {figure name: value}


def alternate(runs: dict[str, Run], repeats: int, units: dict[str, str], warmup: int = 1) -> list[Figure]:
    """Call each run `warmup` times uncounted, then `repeats` rounds of all runs in turn.

    `runs` maps a side's name to a callable returning that run's figures; `units` gives each
    figure's unit. Returns one Figure per figure name, in first-seen order.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    before = load_average()
    samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        for run in runs.values():
            for name, value in run().items():
                samples.setdefault(name, []).append(float(value))
    after = load_average()
    return [Figure(name, units.get(name, ""), values, (before, after)) for name, values in samples.items()]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(wall seconds, result) of one call; `fn` must block until its work is done."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def progress(message: str, since: float | None = None) -> None:
    """One line on stderr for the slow set-up stages (large models compile for minutes on a GPU)."""
    took = f" ({time.perf_counter() - since:.1f} s)" if since is not None else ""
    print(f"bench: {message}{took}", file=sys.stderr, flush=True)
