"""The per-step metrics of a batch of rollouts (rewards, completion lengths), host side."""

from __future__ import annotations

import numpy as np


def rollout_metrics(utilities: np.ndarray, lengths: np.ndarray, reward_parts: dict[str, np.ndarray],
                    max_completion_length: int, tokens_seen: int, seconds: float) -> dict[str, float]:
    """`train/reward*` of the `[P, G]` utilities and `train/completions/*` of the completion lengths;
    "terminated" completions are those shorter than `max_completion_length` (zeros when none is)."""
    u = utilities
    centred = u - u.mean(-1, keepdims=True)
    lengths = lengths.astype(np.float32)
    clipped = lengths >= max_completion_length
    terminated = lengths[~clipped] if (~clipped).any() else np.zeros(1, np.float32)
    out = {
        "train/reward": float(u.mean()),
        "train/reward_std": float(u.std()),
        "train/frac_reward_zero_std": float((np.abs(centred) < 1e-8).all(-1).mean()),
        "train/completions/mean_length_sampled": float(lengths.mean()),
        "train/completions/min_length_sampled": float(lengths.min()),
        "train/completions/max_length_sampled": float(lengths.max()),
        "train/completions/clipped_frac": float(clipped.mean()),
        "train/completions/mean_length_terminated": float(terminated.mean()),
        "train/completions/min_length_terminated": float(terminated.min()),
        "train/completions/max_length_terminated": float(terminated.max()),
        "train/num_tokens": float(tokens_seen),
        "train/rollout_seconds": seconds,
    }
    for name, values in reward_parts.items():
        out[f"train/rewards/{name}/mean"] = float(np.mean(values))
        out[f"train/rewards/{name}/std"] = float(np.std(values))
    return out
