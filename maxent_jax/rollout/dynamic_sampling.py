"""Dynamic sampling (DAPO's group filter): train on the groups whose rewards differ.

A group whose G rewards are all equal carries no reward signal: its GRPO advantages are all
exactly 0, and its MaxEnt listwise target q is exactly uniform (1/K), so the MaxEnt weights keep
only the reference term (beta/d * r, the KL-style pull, which the KL penalty also provides) and
with beta = 0 are exactly uniform - a weighted likelihood whose gradient is zero in expectation,
only sampling noise. "Rewards not all equal" is therefore the one criterion for both objectives.
As the policy improves, more groups are all-correct (or all-wrong), so a fixed batch carries ever
fewer informative groups; DAPO keeps the batch informative by drawing more prompts.

`fill_batch` does that: it keeps the informative groups of each round (a fresh batch of prompts
from the data stream, rolled out), draws another round while the batch lacks groups, at most
`max_rounds` rounds, then trains on what it has. The train step's batch shape is fixed (one
compiled program), so a batch still short after the last round is completed with groups that
were dropped this step, marked invalid (`valid[P, G] = False`): every objective, normaliser and
statistic skips invalid members and empty groups (`objectives/groups.py`), so they change no
loss, gradient or weight of a micro-batch (`tests/test_dynamic_sampling.py` checks this for
each objective and loss type). No group is ever duplicated or split.

Host code only: arrays are numpy, rows are prompt-major (`[P * K, ...]`, a group's K rows
contiguous; K = G + InfoSeed's seed completions).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # the producer's Rollout is only named here
    from maxent_jax.rollout.producer import Rollout

# Rewards closer than this are equal (float rewards from sums of weighted parts); the same
# threshold as the `train/frac_reward_zero_std` metric, so filter and metric agree.
EQUAL_REWARD_TOL = 1e-8
# Token-id arrays right-padded with the pad id when rounds of different completion buckets meet;
# every other array with a completion axis (masks, positions, log-probs) is padded with zeros.
_ID_KEYS = ("input_ids", "completion_ids")


def informative_groups(utilities: np.ndarray) -> np.ndarray:
    """`[P, K]` rewards -> `[P]` bool: the group's rewards are not all equal (within 1e-8)."""
    u = np.asarray(utilities, np.float64)
    return (u.max(axis=-1) - u.min(axis=-1)) > EQUAL_REWARD_TOL


def spread_slots(num_real: int, num_slots: int, micro_batches: int) -> np.ndarray:
    """Slot indices `[num_real]` for the real groups of a batch of `num_slots` groups.

    The trainer cuts the batch into `micro_batches` contiguous micro-batches and each
    micro-batch's loss is a mean over its own valid groups; real groups go round-robin over the
    micro-batches so each holds as many as possible (counts differ by at most one), rather than
    leaving the last micro-batches empty, where their equal share of the accumulated gradient
    would be zero.
    """
    if num_slots % micro_batches or not 0 <= num_real <= num_slots:
        raise ValueError(f"spread_slots: {num_real} groups in {num_slots} slots of {micro_batches} micro-batches")
    per = num_slots // micro_batches
    j = np.arange(num_real)
    return (j % micro_batches) * per + j // micro_batches


def _pad_right(x: np.ndarray, width: int, fill: Any) -> np.ndarray:
    if x.ndim < 2 or x.shape[-1] == width:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])]
    return np.pad(x, pad, constant_values=fill)


def merge_rollouts(rollouts: Sequence[Rollout], groups: Sequence[tuple[int, int]], pad_id: int) -> Rollout:
    """One Rollout of the groups `(round, group index)` in the given order.

    Rounds may have bucketed their completions to different widths: every array with a
    completion axis is right-padded to the widest round's (completions are right-padded, the
    prompt columns are the same in every round), so only padding is added.
    """
    k = rollouts[0].utilities.shape[1]
    rows = [(r, np.arange(g * k, (g + 1) * k)) for r, g in groups]
    batch = {}
    for key in rollouts[0].batch:
        width = max(ro.batch[key].shape[-1] for ro in rollouts)
        fill = pad_id if key in _ID_KEYS else 0
        batch[key] = np.concatenate([_pad_right(rollouts[r].batch[key], width, fill)[i] for r, i in rows])
    texts = [rollouts[r].texts[j] for r, i in rows for j in i]
    return dataclasses.replace(
        rollouts[0],
        batch=batch,
        utilities=np.stack([rollouts[r].utilities[g] for r, g in groups]),
        reward_parts={name: np.concatenate([np.asarray(rollouts[r].reward_parts[name])[i] for r, i in rows])
                      for name in rollouts[0].reward_parts},
        texts=texts,
        lengths=np.concatenate([rollouts[r].lengths[i] for r, i in rows]),
        versions=(None if rollouts[0].versions is None
                  else np.concatenate([rollouts[r].versions[i] for r, i in rows])),
        seconds=float(sum(ro.seconds for ro in rollouts)),
    )


def _any_process(flag: bool) -> bool:
    """True on every host when it is True on any: all hosts draw the same number of rounds (the
    in-process sampler is one program over the global mesh, so hosts must generate together)."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def fill_batch(
    first: tuple[list[dict[str, Any]], Rollout],
    next_rows: Callable[[], list[dict[str, Any]]],
    rollout: Callable[[list[dict[str, Any]]], Rollout],
    *,
    max_rounds: int,
    micro_batches: int,
    pad_id: int,
    any_process: Callable[[bool], bool] = _any_process,
) -> tuple[list[dict[str, Any]], Rollout, dict[str, float]]:
    """The step's batch of informative groups: (rows, Rollout with `valid`, metrics).

    `first` is the step's first round (rows and their rollout); each further round is
    `rollout(next_rows())`, so the data stream advances by one batch of prompts per round (a
    checkpoint after the step records that position, as for any step). Informative groups are
    kept in draw order up to the batch's size (the surplus of the last round is discarded);
    after `max_rounds` rounds a short batch is completed with dropped groups marked invalid.
    """
    rows, ro = first
    num_groups = ro.utilities.shape[0]
    rounds_rows, rounds = [rows], [ro]
    kept: list[tuple[int, int]] = []
    dropped: list[tuple[int, int]] = []
    while True:
        r = len(rounds) - 1
        informative = informative_groups(rounds[r].utilities)
        kept += [(r, g) for g in np.flatnonzero(informative)]
        dropped += [(r, g) for g in np.flatnonzero(~informative)]
        if len(rounds) >= max_rounds or not any_process(len(kept) < num_groups):
            break
        rows = next_rows()
        rounds_rows.append(rows)
        rounds.append(rollout(rows))
        if rounds[-1].utilities.shape[0] != num_groups:
            raise ValueError(f"round {len(rounds)} drew {rounds[-1].utilities.shape[0]} groups, "
                             f"the first drew {num_groups}")
    chosen = kept[:num_groups]
    short = num_groups - len(chosen)
    slots = np.full(num_groups, -1)
    slots[spread_slots(len(chosen), num_groups, micro_batches)] = np.arange(len(chosen))
    filler = iter(dropped)  # enough: rounds x P - kept >= P - kept = short
    groups = [chosen[s] if s >= 0 else next(filler) for s in slots]
    merged = merge_rollouts(rounds, groups, pad_id)
    valid = np.repeat((slots >= 0)[:, None], merged.utilities.shape[1], axis=1)
    merged = dataclasses.replace(merged, valid=valid)
    drawn = len(rounds) * num_groups
    metrics = {
        "train/dynamic_sampling/rounds": float(len(rounds)),
        "train/dynamic_sampling/groups_dropped": float(len(dropped)),
        "train/dynamic_sampling/groups_short": float(short),
        "train/dynamic_sampling/informative_frac": len(kept) / drawn,
        "train/dynamic_sampling/sampled_reward": float(np.mean([x.utilities.mean() for x in rounds])),
    }
    return [rounds_rows[r][g] for r, g in groups], merged, metrics
