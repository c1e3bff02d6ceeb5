"""The policy optimizer: AdamW with the reference's warm-up + decay schedule, counted in optimizer steps.

The schedule (spec 7.6) is evaluated at the step count *before* the update, so the first update
uses lr 0 when there is a warm-up. `total` is in optimizer steps: the reference counts
micro-batches there (Q15), which stretches its schedule by the accumulation factor.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def total_steps(max_steps: int, steps_per_epoch: int, epochs: int) -> int:
    """Optimizer steps of a run: max_steps, or fewer when num_train_epochs passes over the data
    first; max_steps -1 means the epochs alone (HF's max_steps <= 0), still in optimizer steps (Q15)."""
    epoch_steps = steps_per_epoch * epochs
    return epoch_steps if max_steps < 0 else min(max_steps, epoch_steps)


def warmup_steps(total: int, warmup_steps_cfg: int, warmup_ratio: float) -> int:
    steps = warmup_steps_cfg if warmup_steps_cfg > 0 else math.floor(warmup_ratio * total)
    return min(steps, total)


def learning_rate_schedule(lr: float, total: int, warmup: int, kind: str, min_lr_rate: float = 0.0) -> optax.Schedule:
    """lr(s) = lr*s/W during warm-up, then cosine / linear decay over the rest, or constant.

    `cosine_with_min_lr` is HF's schedule of that name: the cosine decays to min_lr_rate * lr.
    """
    decay = max(total - warmup, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = lr * s / max(warmup, 1)
        p = jnp.clip(s - warmup, 0, decay) / decay
        if kind in ("cosine", "cosine_with_min_lr"):
            floor = min_lr_rate if kind == "cosine_with_min_lr" else 0.0
            after = lr * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * p)))
        elif kind == "linear":
            after = lr * (1 - p)
        else:  # constant, constant_with_warmup
            after = jnp.full_like(s, lr)
        return jnp.where(s < warmup, warm, after)

    return schedule


def lr_scale(lr: float, base_lr: float) -> float:
    """lr(s) / max(lr0, 1e-12): scales the tau and meta-controller learning rates (spec 7.6)."""
    return lr / max(base_lr, 1e-12)


def _decay_mask(params):
    """Weight decay on matrices only: biases and norm scales (1-D) are exempt, as in the reference."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) > 1, params)


def make_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = optim_config
    warmup = warmup_steps(total_steps, o.warmup_steps, o.warmup_ratio)
    schedule = learning_rate_schedule(o.learning_rate, total_steps, warmup, o.lr_scheduler_type, o.min_lr_rate)
    chain = []
    if o.max_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(o.max_grad_norm))
    chain.append(
        optax.adamw(schedule, b1=o.adam_beta1, b2=o.adam_beta2, eps=o.adam_epsilon, weight_decay=o.weight_decay,
                    mask=_decay_mask)
    )
    return optax.chain(*chain), schedule
