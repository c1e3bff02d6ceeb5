"""Static (compile-time) settings of the objectives, validated once, before any compute.

The values that change from step to step (beta, tau) are NOT here: they are traced scalars
passed in the `coefs` mapping, so a controller update never triggers a recompilation. The
settings are frozen and hashable, so they can close over a jitted step.

Each field names the config field the training loop maps it from; a bad value raises a
one-line `UserError` naming that config field.
"""

from __future__ import annotations

import dataclasses
import math

from maxent_jax.errors import UserError

LOSS_TYPES = ("reference", "grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("sequence_sum", "sequence", "token")
NEGATIVE_ADV_RULES = ("standard_min", "reference_max")
KL_ESTIMATORS = ("sequence_k3", "k1", "k2", "k3")
SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SEED_LOSS_TYPES = ("infonce", "ce")
SEED_ENTROPY_MODES = ("abs", "reference_signed")


def _choice(field: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UserError(f"{field}={value!r} is not valid; choose one of {', '.join(valid)}")


def _non_negative(field: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise UserError(f"{field}={value!r} is not valid; it must be a finite number >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InfoSeedSettings:
    """InfoSeed auxiliary-loss settings (spec 9.2); inactive when `lambda_ == alpha_entropy == 0`.

    Fields (config `info_seed.*`): `num_seeds` (seed classes, ids 0..num_seeds-1), `lambda_`
    (weight of the seed loss), `temperature` (InfoNCE temperature, floored at 1e-4),
    `alpha_entropy` (weight of alpha*(H(w_orig) - H(w_seed))), `loss_type` (`infonce` on
    pooled hidden states or `ce` on seed-head logits), `entropy_mode` (`abs`: entropy of
    |w|/sum|w|, NaN-free for signed GRPO advantages; `reference_signed`: the reference's
    w/sum(w), which is NaN for mixed-sign advantages, Q23).
    """

    num_seeds: int = 0
    lambda_: float = 0.0
    temperature: float = 0.1
    alpha_entropy: float = 0.0
    loss_type: str = "infonce"
    entropy_mode: str = "abs"

    def __post_init__(self) -> None:
        if not isinstance(self.num_seeds, int) or self.num_seeds < 0:
            raise UserError(f"info_seed.num_seeds={self.num_seeds!r} is not valid; it must be an integer >= 0")
        _non_negative("info_seed.lambda_", self.lambda_)
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise UserError(f"info_seed.temperature={self.temperature!r} is not valid; it must be > 0")
        if not (isinstance(self.alpha_entropy, (int, float)) and math.isfinite(self.alpha_entropy)):
            raise UserError(f"info_seed.alpha_entropy={self.alpha_entropy!r} is not valid; it must be a finite number")
        _choice("info_seed.loss_type", self.loss_type, SEED_LOSS_TYPES)
        _choice("info_seed.entropy_mode", self.entropy_mode, SEED_ENTROPY_MODES)
        if self.lambda_ > 0 and self.loss_type == "ce" and self.num_seeds < 1:
            raise UserError("info_seed.num_seeds=0 is not valid with info_seed.loss_type='ce'; it must be >= 1")

    @property
    def active(self) -> bool:
        """Whether any InfoSeed term enters the loss."""
        return self.lambda_ > 0 or self.alpha_entropy != 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveSettings:
    """Everything static an objective needs; defaults reproduce the reference (spec 7, 13.2).

    Fields and their config names:
    * `loss_type` (objective.loss_type): `reference` = the reference's per-sequence sum over a
      group, mean over groups (spec 7.2); `grpo`, `bnpo`, `dr_grpo`, `dapo` = TRL's token
      aggregations. Used by the GRPO objective; the MaxEnt policy term is always spec 7.1.
    * `importance_sampling_level` (objective.importance_sampling_level): `sequence_sum` =
      reference ratio exp(S_theta - S_old) of summed log-probs; `sequence` = GSPO, exp of the
      token-mean log-ratio; `token` = TRL per-token ratios (TRL loss types only).
    * `epsilon_low`, `epsilon_high` (objective.epsilon_low/high, default objective.clip_range):
      ratio clipped to [1 - epsilon_low, 1 + epsilon_high]; see `resolve_epsilons`.
    * `negative_adv_rule` (objective.negative_adv_rule): `standard_min` = PPO's min for every
      advantage; `reference_max` = the reference's max for negative advantages (Q12).
    * `use_clip_objective`, `clip_objective_coef`, `clip_adv_baseline` (maxent.*): the clipped
      surrogate term of spec 7.1/7.2 is on iff `use_clip_objective` and a positive epsilon.
      The reference ignores its flag and is on iff clip_range > 0 (Q11); the default True
      reproduces that, False really turns the term off.
    * `kl_estimator` (objective.kl_estimator): `sequence_k3` = spec 7.3; `k1`/`k2`/`k3` =
      token-level estimators aggregated like the policy loss.
    * `kl_bias_correction` (objective.kl_bias_correction): TRL's `use_bias_correction_kl`, the
      per-token KL multiplied by the importance ratio before beta x KL (token-level
      estimators); off = the reference's formula.
    * `max_completion_length`: the constant denominator of `dr_grpo`.
    * `sampler_correction`, `sampler_correction_max`, `sampler_correction_min`: truncated /
      masked importance-sampling correction between the trainer's old log-probs and the
      sampler's (TRL `vllm_importance_sampling_*`); `none` uses the sampler's log-probs
      directly as the ratio denominator.
    """

    loss_type: str = "reference"
    importance_sampling_level: str = "sequence_sum"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    negative_adv_rule: str = "standard_min"
    use_clip_objective: bool = True
    clip_objective_coef: float = 1.0
    clip_adv_baseline: float | None = None
    kl_estimator: str = "sequence_k3"
    kl_bias_correction: bool = False
    max_completion_length: int = 256
    sampler_correction: str = "none"
    sampler_correction_max: float = 3.0
    sampler_correction_min: float = 0.0
    info_seed: InfoSeedSettings = dataclasses.field(default_factory=InfoSeedSettings)

    def __post_init__(self) -> None:
        _choice("objective.loss_type", self.loss_type, LOSS_TYPES)
        _choice("objective.importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        _choice("objective.negative_adv_rule", self.negative_adv_rule, NEGATIVE_ADV_RULES)
        _choice("objective.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("objective.sampler_correction", self.sampler_correction, SAMPLER_CORRECTIONS)
        _non_negative("objective.epsilon_low", self.epsilon_low)
        _non_negative("objective.epsilon_high", self.epsilon_high)
        _non_negative("maxent.clip_objective_coef", self.clip_objective_coef)
        if self.clip_adv_baseline is not None and not math.isfinite(self.clip_adv_baseline):
            raise UserError(f"maxent.clip_adv_baseline={self.clip_adv_baseline!r} is not valid; use a finite number or None")
        if not isinstance(self.max_completion_length, int) or self.max_completion_length < 1:
            raise UserError(
                f"max_completion_length={self.max_completion_length!r} is not valid; it must be an integer >= 1"
            )
        _non_negative("objective.sampler_correction_min", self.sampler_correction_min)
        if not self.sampler_correction_max > self.sampler_correction_min:
            raise UserError(
                f"objective.sampler_correction_max={self.sampler_correction_max!r} is not valid; "
                f"it must be > objective.sampler_correction_min={self.sampler_correction_min!r}"
            )
        if self.kl_bias_correction and self.kl_estimator == "sequence_k3":
            raise UserError(
                "objective.kl_bias_correction=True is not valid with objective.kl_estimator='sequence_k3' "
                "(the correction weights per-token KL); use k1, k2 or k3 (TRL's estimator is k3)"
            )
        if self.loss_type == "reference" and self.importance_sampling_level == "token":
            raise UserError(
                "objective.importance_sampling_level='token' is not valid with objective.loss_type='reference' "
                "(a per-sequence aggregation); use sequence_sum or sequence, or a TRL loss type"
            )

    @property
    def clip_enabled(self) -> bool:
        """Whether the reference-style clipped surrogate term is active (spec 7.1, Q11)."""
        return bool(self.use_clip_objective) and max(self.epsilon_low, self.epsilon_high) > 0


def resolve_epsilons(
    clip_range: float, epsilon_low: float | None = None, epsilon_high: float | None = None
) -> tuple[float, float]:
    """Clip bounds from the config: `clip_range` (sanitised to [0, 1] as the reference does)
    unless `epsilon_low` / `epsilon_high` are set (TRL semantics: high defaults to low).
    """
    if not (isinstance(clip_range, (int, float)) and math.isfinite(clip_range)):
        raise UserError(f"objective.clip_range={clip_range!r} is not valid; it must be a finite number")
    base = min(max(float(clip_range), 0.0), 1.0)
    low = base if epsilon_low is None else float(epsilon_low)
    high = low if epsilon_high is None else float(epsilon_high)
    return low, high
