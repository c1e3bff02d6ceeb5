"""Will the run's checkpoints fit: the disk a run still needs, checked before training starts.

A run that fills its disk at step 900 loses the hours before its last save; counting the
checkpoints it keeps on disk at once (`checkpoint.save_total_limit`, every save when 0) against
the free space turns that into one line at start-up (docs/checkpoints.md).
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from maxent_jax.checkpoint_verify import CHECKPOINTS_DIR, list_steps
from maxent_jax.errors import UserError


def state_nbytes(tree: Any) -> int:
    """Global bytes of every array leaf (concrete or abstract) of `tree`; an upper bound on a save."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.eval_shape(jax.random.key_data, leaf)
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return total


def planned_saves(start_step: int, total_steps: int, save_steps: int) -> int:
    """Checkpoints a run from `start_step` to `total_steps` writes: one per `save_steps` multiple,
    plus one for the last step or a preemption (never fewer than one)."""
    periodic = (total_steps // save_steps - start_step // save_steps) if save_steps > 0 else 0
    return max(0, periodic) + 1


def preflight(workdir: str | os.PathLike, *, checkpoint_bytes: int, keep: int, extra_bytes: int = 0,
              saves: int | None = None) -> None:
    """Fail before training when the run could not write its checkpoints.

    The workdir must be creatable and writable, and its filesystem must have room for the most
    checkpoints on disk at once: with `keep` > 0, `keep` plus the one being written; with `keep`
    = 0 (keep all), every one of the run's `saves` (`planned_saves`; unknown = None counts 2, the
    least a run needs). Steps already on disk count against that, as does `extra_bytes` (the
    final export); 5% margin.
    """
    workdir = pathlib.Path(workdir)
    ckpt_dir = workdir / CHECKPOINTS_DIR
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write_probe_{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise UserError(f"--workdir={workdir} is not writable: {err.strerror or err}") from None
    existing = len(list_steps(ckpt_dir))
    slots = _slots(keep, existing, saves)
    needed = bytes_needed(checkpoint_bytes, keep=keep, existing=existing, saves=saves, extra_bytes=extra_bytes)
    free = shutil.disk_usage(ckpt_dir).free
    if free < needed:
        raise UserError(
            f"--workdir={workdir} has {format_bytes(free)} free but the run needs about {format_bytes(needed)} "
            f"({slots} more checkpoint(s) of {format_bytes(checkpoint_bytes)} with checkpoint.save_total_limit={keep}"
            f"{f', plus {format_bytes(extra_bytes)} for the final export' if extra_bytes else ''}): free space, "
            "keep fewer (checkpoint.save_total_limit) or save less often (checkpoint.save_steps)"
        )


def _slots(keep: int, existing: int, saves: int | None) -> int:
    if saves is None:
        at_once = keep + 1 if keep > 0 else 2
    else:
        at_once = min(keep + 1, existing + saves) if keep > 0 else existing + saves
    return max(1, at_once - existing)


def bytes_needed(checkpoint_bytes: int, *, keep: int, existing: int, saves: int | None = None,
                 extra_bytes: int = 0) -> int:
    """Disk a run still needs for its checkpoints (see `preflight` for how many are on disk at
    once) less those already there, plus `extra_bytes` (the final export), with a 5% margin."""
    return int((_slots(keep, existing, saves) * checkpoint_bytes + extra_bytes) * 1.05)


def format_bytes(n: float) -> str:
    """A size in the largest binary unit that keeps it >= 1 (`12.3 MiB`, not `0.01 GiB`)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
