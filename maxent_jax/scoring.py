"""Token layout of the score batch: prompts left-padded, completions right-padded, explicit positions.

    input_ids  [N, Tp + Tc]   pad.. prompt | completion ..pad
    positions  [N, Tp + Tc]   0..len_p-1 | len_p.. (pads 0): a completion's positions never depend
                              on how much padding its prompt got (the reference shifts them, Q7)
    completion_ids / completion_mask / behaviour_logp  [N, Tc]

Every row's completion starts at column Tp, so the log-prob of completion token j is read from
the hidden state at column Tp - 1 + j: scoring only touches the Tc completion columns of the
vocabulary projection. Tp and Tc are rounded up to buckets so a run compiles a handful of
programs, not one per step.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bucket(length: int, multiple: int, cap: int) -> int:
    """Round `length` up to a multiple of `multiple`, at most `cap` (and at least 1)."""
    return max(1, min(cap, -(-max(length, 1) // multiple) * multiple))


def build_score_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    prompt_len: int,
    completion_len: int,
    pad_id: int,
    behaviour_logps: Sequence[Sequence[float]] | None = None,
) -> dict[str, np.ndarray]:
    """One row per completion; `prompt_ids[i]` is row i's prompt (repeat a prompt G times for a group).

    Prompts longer than `prompt_len` keep their last tokens (the generation prompt must survive);
    completions longer than `completion_len` are clipped.
    """
    n = len(completion_ids)
    if len(prompt_ids) != n:
        raise ValueError(f"{len(prompt_ids)} prompts for {n} completions")
    total = prompt_len + completion_len
    input_ids = np.full((n, total), pad_id, np.int32)
    positions = np.zeros((n, total), np.int32)
    attention = np.zeros((n, total), bool)
    comp_mask = np.zeros((n, completion_len), bool)
    behaviour = np.zeros((n, completion_len), np.float32)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        p = list(p)[-prompt_len:]
        c = list(c)[:completion_len]
        lp, lc = len(p), len(c)
        input_ids[i, prompt_len - lp:prompt_len] = p
        input_ids[i, prompt_len:prompt_len + lc] = c
        attention[i, prompt_len - lp:prompt_len + lc] = True
        positions[i, prompt_len - lp:prompt_len + lc] = np.arange(lp + lc)
        comp_mask[i, :lc] = True
        if behaviour_logps is not None:
            behaviour[i, :lc] = np.asarray(behaviour_logps[i], np.float32)[:lc]
    batch = {
        "input_ids": input_ids,
        "positions": positions,
        "attention_mask": attention,
        "completion_ids": input_ids[:, prompt_len:].copy(),
        "completion_mask": comp_mask,
    }
    if behaviour_logps is not None:
        batch["behaviour_logp"] = behaviour
    return batch
