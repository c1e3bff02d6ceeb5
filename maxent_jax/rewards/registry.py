"""Reward functions by name (spec 4.1).

A reward function scores ONE completion: `fn(completion: str, answer: str, *, is_eval: bool)
-> float`. Scoring per completion (rather than per batch) is what lets `scoring.py` bound
the time of each call and score a failing completion 0 without losing the batch.
"""

from __future__ import annotations

from collections.abc import Callable

from maxent_jax.errors import UserError

RewardFn = Callable[..., float]

_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register a per-completion reward function under `name`."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REWARDS and _REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        _REWARDS[name] = fn
        return fn

    return wrap


def get_reward(name: str) -> RewardFn:
    """The reward registered under `name`; unknown names are a `UserError`."""
    if name not in _REWARDS:
        raise UserError(f"reward_funcs entry {name!r} is not a registered reward; choose from {', '.join(available_rewards())}")
    return _REWARDS[name]


def available_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REWARDS)
