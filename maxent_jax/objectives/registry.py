"""Objectives by name: a new loss variant is a function plus a name (no if/else in the loop).

An objective is a pure, jit-able function

    objective(token_logp, batch, coefs, settings) -> (loss scalar, metrics dict)

* `token_logp` `[P, G, T]`: the policy's per-token log-probs of the completion tokens
  (differentiable; float32 recommended);
* `batch`: a mapping of arrays in the layout of `groups.py` (keys in docs/objectives.md:
  `token_mask`, `valid`, `ref_logp`, `weights` or `advantages`, optional `behaviour_logp`,
  `old_logp`, `token_normalizer`, InfoSeed keys). Entries computed inside the loss function
  from the parameters (e.g. `seed_hidden`) are differentiated through;
* `coefs`: traced scalars that change between steps without recompiling (`beta`);
* `settings`: the static `ObjectiveSettings` (close over it with functools.partial).

Metric names are those of spec 12.4 without the `train/` prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax

from maxent_jax.errors import UserError
from maxent_jax.objectives.settings import ObjectiveSettings

Array = jax.Array
ObjectiveFn = Callable[
    [Array, Mapping[str, Array], Mapping[str, Array], ObjectiveSettings], tuple[Array, dict[str, Array]]
]

_OBJECTIVES: dict[str, ObjectiveFn] = {}


def register_objective(name: str) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator: register `fn` under `name`; registering a taken name is an error."""

    def wrap(fn: ObjectiveFn) -> ObjectiveFn:
        if name in _OBJECTIVES and _OBJECTIVES[name] is not fn:
            raise ValueError(f"objective {name!r} is already registered")
        _OBJECTIVES[name] = fn
        return fn

    return wrap


def get_objective(name: str) -> ObjectiveFn:
    """The objective registered under `name`; an unknown name is a `UserError`."""
    if name not in _OBJECTIVES:
        raise UserError(f"objective {name!r} is not registered; choose one of {', '.join(available_objectives())}")
    return _OBJECTIVES[name]


def available_objectives() -> list[str]:
    """Registered objective names, sorted."""
    return sorted(_OBJECTIVES)
