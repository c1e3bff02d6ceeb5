"""Objectives: GRPO family, MaxEnt weighting, KL estimators and InfoSeed as pure JAX functions.

Importing the package registers the built-in objectives `maxent` and `grpo` (see
`registry.py`); docs/objectives.md has the formulas, shapes and reference differences.
"""

from maxent_jax.objectives import grpo, maxent_loss  # noqa: F401  (registers the built-ins)
from maxent_jax.objectives.registry import available_objectives, get_objective, register_objective
from maxent_jax.objectives.settings import InfoSeedSettings, ObjectiveSettings, resolve_epsilons

__all__ = [
    "InfoSeedSettings",
    "ObjectiveSettings",
    "available_objectives",
    "get_objective",
    "register_objective",
    "resolve_epsilons",
]
