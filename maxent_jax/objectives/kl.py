"""KL estimators between the policy and the reference (spec 7.3) and their diagnostics (7.5).

* `sequence_k3`: the reference's estimator: k3 on per-token MEAN log-probs of each
  sequence, averaged with token weights. Differentiable in the policy log-probs.
* `token_kl`: TRL-style per-token k1 / k2 / k3 of log(pi_theta / pi_ref), `[P, G, T]`.
* `kl_penalty`: the KL of the loss (estimator chosen by the settings) and the diagnostics.
* `kl_diagnostics`: the logged, non-loss statistics: unweighted `kl`, clip-region fractions
  of policy vs reference, KL by completion-length bucket.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxent_jax.objectives.aggregation import aggregate_tokens
from maxent_jax.objectives.groups import masked, masked_max, masked_mean, masked_min, sequence_logp, token_counts
from maxent_jax.objectives.settings import ObjectiveSettings

Array = jax.Array

_CLAMP = 60.0
LENGTH_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("0-32", 0, 32),
    ("33-64", 33, 64),
    ("65-128", 65, 128),
    ("129-256", 129, 256),
    ("257+", 257, float("inf")),
)


def _safe_clamp(x: Array) -> Array:
    """Clamp to +-60 with NaN (from -inf - -inf) mapped to 0."""
    return jnp.clip(jnp.where(jnp.isnan(x), 0.0, x), -_CLAMP, _CLAMP)


def sequence_k3(seq_logp: Array, ref_seq_mean: Array, lengths: Array, valid: Array) -> tuple[Array, Array]:
    """Token-weighted sequence-level k3 (spec 7.3).

    Args:
      seq_logp: S_theta `[P, G]`, summed policy log-probs (differentiable).
      ref_seq_mean: per-token mean reference log-prob S_ref / max(n, 1) `[P, G]`.
      lengths: token counts n `[P, G]`.
      valid: `[P, G]` bool.

    Returns (KL scalar, k `[P, G]`) with delta = clamp(ref_mean - S/max(n,1), +-60),
    k = e^delta - delta - 1, KL = sum k max(n,1) / max(1, sum max(n,1)) over valid members.
    """
    n1 = jnp.maximum(lengths.astype(jnp.float32), 1.0)
    delta = _safe_clamp(masked(ref_seq_mean.astype(jnp.float32) - seq_logp.astype(jnp.float32) / n1, valid))
    k = masked(jnp.exp(delta) - delta - 1.0, valid)
    tokens = jnp.sum(masked(n1, valid))
    return jnp.sum(k * masked(n1, valid)) / jnp.maximum(tokens, 1.0), k


def token_kl(token_logp: Array, ref_token_logp: Array, token_mask: Array, estimator: str) -> Array:
    """Per-token KL estimate `[P, G, T]` (0 off the mask) of d = log pi_theta - log pi_ref.

    k1 = d; k2 = d^2 / 2; k3 = exp(-d) + d - 1 (Schulman's estimators; k3 is TRL's).
    """
    d = _safe_clamp(masked(token_logp.astype(jnp.float32) - ref_token_logp.astype(jnp.float32), token_mask))
    if estimator == "k1":
        k = d
    elif estimator == "k2":
        k = 0.5 * d * d
    elif estimator == "k3":
        k = jnp.exp(-d) + d - 1.0
    else:
        raise ValueError(f"token_kl: unknown estimator {estimator!r}; use k1, k2 or k3")
    return masked(k, token_mask)


def kl_diagnostics(
    k: Array,
    seq_mean: Array,
    ref_seq_mean: Array,
    lengths: Array,
    valid: Array,
    eps_low: float,
    eps_high: float,
) -> dict[str, Array]:
    """Spec 7.5 diagnostics under the 12.4 metric names (all constants, not in the loss).

    Args:
      k: per-sequence k3 values `[P, G]` (from `sequence_k3`).
      seq_mean, ref_seq_mean: per-token mean log-probs of policy and reference `[P, G]`.
      lengths: token counts `[P, G]`; valid: `[P, G]` bool.
      eps_low, eps_high: the clip range bounds used for the region fractions.
    """
    k = jax.lax.stop_gradient(k)
    log_r = _safe_clamp(jax.lax.stop_gradient(seq_mean) - ref_seq_mean)
    low = (log_r < jnp.log(max(1.0 - eps_low, 1e-6))).astype(jnp.float32)
    high = (log_r > jnp.log1p(eps_high)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    out = {
        "kl": masked_mean(k, valid),
        "clip_ratio/low_mean": masked_mean(low, valid),
        "clip_ratio/low_min": masked_min(low, valid),
        "clip_ratio/high_mean": masked_mean(high, valid),
        "clip_ratio/high_max": masked_max(high, valid),
        "clip_ratio/region_mean": masked_mean(region, valid),
    }
    n1 = jnp.maximum(lengths.astype(jnp.float32), 1.0)
    for name, lo, hi in LENGTH_BUCKETS:
        inside = valid & (n1 >= lo) & (n1 <= hi)
        tokens = jnp.sum(masked(n1, inside))
        out[f"kl_per_token_bucket/{name}"] = jnp.sum(masked(k * n1, inside)) / jnp.maximum(tokens, 1.0)
        out[f"kl_per_token_bucket_tokens/{name}"] = tokens
    return out


def kl_penalty(
    token_logp: Array,
    ref_token_logp: Array,
    token_mask: Array,
    valid: Array,
    settings: ObjectiveSettings,
    token_normalizer: Array | None = None,
    importance_ratio: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The KL that enters the loss as beta * KL, plus the spec 7.5 diagnostics.

    Args:
      token_logp: policy log-probs `[P, G, T]` (differentiable).
      ref_token_logp: reference log-probs `[P, G, T]` (constant).
      token_mask: `[P, G, T]` bool, already including `valid`; valid: `[P, G]` bool.
      settings: `kl_estimator` picks `sequence_k3` (spec 7.3) or a token-level estimator
        aggregated like the policy loss (`loss_type`; `reference` -> token-weighted mean).
      importance_ratio: pi_theta / pi_old `[P, G, T|1]` (differentiable) when
        `settings.kl_bias_correction`: TRL's `use_bias_correction_kl`, the per-token KL times the
        ratio, so the penalty is an importance-sampled estimate under the current policy
        rather than under the sampler's (token-level estimators only).
    """
    ref_token_logp = jax.lax.stop_gradient(ref_token_logp)
    lengths = token_counts(token_mask, valid)
    n1 = jnp.maximum(lengths, 1.0)
    seq = sequence_logp(token_logp, token_mask, valid)
    ref_mean = sequence_logp(ref_token_logp, token_mask, valid) / n1
    kl_seq, k = sequence_k3(seq, ref_mean, lengths, valid)
    if settings.kl_estimator == "sequence_k3":
        kl = kl_seq
    else:
        per_token = token_kl(token_logp, ref_token_logp, token_mask, settings.kl_estimator)
        if importance_ratio is not None:
            per_token = masked(per_token * importance_ratio, token_mask)
        kl = aggregate_tokens(
            per_token, token_mask, valid, settings.loss_type, settings.max_completion_length, token_normalizer
        )
    diagnostics = kl_diagnostics(k, seq / n1, ref_mean, lengths, valid, settings.epsilon_low, settings.epsilon_high)
    return kl, diagnostics
