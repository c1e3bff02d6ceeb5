"""Bounded staleness: how many optimizer steps old each completion's weights are, and which to drop.

A completion sampled with weight version v (the server reports the version it served; the
trainer pushes the step count as the version) and trained on at step k (k updates applied
before this one) is `k - v` steps stale. With `rollout.max_staleness = s` the trainer never
trains on a completion more than s steps stale. A group is never split: a group holding one
too-stale completion is dropped whole (its rows stay in the batch, marked invalid, so the
update's shapes do not change), and the count is reported, never silent.
"""

from __future__ import annotations

import numpy as np


def staleness(versions: np.ndarray, step: int) -> np.ndarray:
    """Steps between the weights that sampled each completion and the update about to use it."""
    return step - np.asarray(versions, np.int64)


def groups_to_keep(stale: np.ndarray, group: int, max_staleness: int) -> np.ndarray:
    """`[P]` bool: the prompt groups (rows `[P * group]`, prompt-major) whose every completion is
    at most `max_staleness` steps stale."""
    return (np.asarray(stale).reshape(-1, group) <= max_staleness).all(-1)


def staleness_metrics(stale: np.ndarray, keep: np.ndarray, group: int) -> dict[str, float]:
    """`rollout/staleness_mean`, `rollout/staleness_max` over all sampled completions, and
    `rollout/dropped_stale`: completions dropped (whole groups) for being too stale."""
    stale = np.asarray(stale, np.float64)
    return {"rollout/staleness_mean": float(stale.mean()), "rollout/staleness_max": float(stale.max()),
            "rollout/dropped_stale": float((~np.asarray(keep)).sum() * group)}
