"""InfoSeed (spec 9): seed-augmented prompts and the auxiliary seed losses, fixed to train.

What differs from the reference (see docs/objectives.md):
* Q21: pooled hidden states are NOT detached: `pool_hidden` output flows into the InfoNCE
  / CE losses and their gradient reaches the policy parameters.
* Q22: seed ids are 0-based (0..num_seeds-1) and originals carry -1; the CE loss and the
  accuracy use only rows with an id >= 0.
* Q23: the alpha-entropy term normalises |w| (entropy of |w| / sum |w|), finite for signed
  GRPO advantages; identical to the reference whenever all weights are >= 0 (MaxEnt).
* Q20: seed ids come from an explicit `np.random.Generator` (seeded by the caller).

Layout: per-completion arrays `[P, G]` (group slots, `valid`), pooled states `[P, G, H]`,
seed-head logits `[P, G, S]`; flattened internally to N = P*G rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxent_jax.errors import UserError
from maxent_jax.objectives.groups import masked
from maxent_jax.objectives.settings import InfoSeedSettings

Array = jax.Array

_NEG = -1e9  # finite "minus infinity": keeps log-softmax and its gradient NaN-free


def render_seed_prompts(
    prompts: Sequence[str], num_seeds: int, template: str, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """Seed-augmented prompts (spec 9.1): `num_seeds` extra prompts per prompt.

    Each extra prompt gets a seed id drawn uniformly (with replacement, as the reference)
    from {0, ..., num_seeds-1} using `rng`. A template containing `{prompt}` is formatted
    with `prompt` and `seed`; otherwise the formatted template is appended to the (already
    chat-rendered) prompt.

    Returns (prompt-major list of P*num_seeds rendered prompts, seed ids `[P, num_seeds]`).
    """
    if num_seeds < 1:
        raise UserError(f"info_seed.num_seeds={num_seeds!r} is not valid for seed prompts; it must be >= 1")
    try:
        template.format(prompt="", seed=0)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(
            f"info_seed.prompt_template={template!r} is not valid ({err!r}); only {{prompt}} and {{seed}} may appear"
        ) from None
    ids = rng.integers(0, num_seeds, size=(len(prompts), num_seeds), dtype=np.int32)
    rendered = []
    for prompt, row in zip(prompts, ids):
        for seed in row:
            if "{prompt}" in template:
                rendered.append(template.format(prompt=prompt, seed=int(seed)))
            else:
                rendered.append(prompt + template.format(seed=int(seed)))
    return rendered, ids


def pool_hidden(hidden: Array, mask: Array, pooling: str) -> Array:
    """Pool hidden states `[..., L, H]` over the sequence axis with `mask[..., L]` -> `[..., H]`.

    `mean`: mean over masked positions (0 for an empty mask); `last`: the state at the last
    masked position (the reference takes the last column, which is padding for shorter
    rows of a right-padded batch). Differentiable: the result is NOT detached (Q21).
    """
    m = mask.astype(hidden.dtype)
    if pooling == "mean":
        total = jnp.sum(hidden * m[..., None], axis=-2)
        return total / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
    if pooling == "last":
        positions = jnp.arange(mask.shape[-1])
        last = jnp.max(jnp.where(mask, positions, -1), axis=-1)
        picked = jnp.take_along_axis(hidden, jnp.maximum(last, 0)[..., None, None], axis=-2)[..., 0, :]
        return jnp.where((last >= 0)[..., None], picked, 0.0)
    raise UserError(f"info_seed.pooling={pooling!r} is not valid; choose one of mean, last")


def infonce_loss(h: Array, seed_ids: Array, keep: Array, temperature: float) -> Array:
    """Supervised InfoNCE over pooled states `h[N, H]` (spec 9.2), 0 without positive pairs.

    Rows with `keep` and seed id >= 0 take part; M_ij = cos(h_i, h_j) / max(T, 1e-4) with
    the diagonal and non-participating columns excluded; positives are pairs i != j with
    equal ids; loss = -mean over positive pairs of log softmax_j(M_i.).
    """
    rows = keep & (seed_ids >= 0)
    h = h.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True))
    hn = h / jnp.maximum(norm, 1e-12)
    # HIGHEST: float32 similarities on GPUs too (the default may use TF32 / bf16 passes)
    sims = jnp.matmul(hn, hn.T, precision=jax.lax.Precision.HIGHEST) / max(float(temperature), 1e-4)
    n = h.shape[0]
    eye = jnp.eye(n, dtype=bool)
    cols = rows[None, :] & ~eye
    logp = jax.nn.log_softmax(jnp.where(cols, sims, _NEG), axis=-1)
    pos = cols & rows[:, None] & (seed_ids[:, None] == seed_ids[None, :])
    count = jnp.sum(pos)
    return -jnp.sum(masked(logp, pos)) / jnp.maximum(count, 1).astype(jnp.float32)


def seed_ce_loss(logits: Array, seed_ids: Array, keep: Array) -> Array:
    """Mean cross-entropy of seed-head `logits[N, S]` vs 0-based `seed_ids[N]` (Q22).

    Only rows with `keep` and an id >= 0 count (originals carry -1); 0 if there are none.
    """
    rows = keep & (seed_ids >= 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(seed_ids, 0)[:, None], axis=-1)[:, 0]
    return -jnp.sum(masked(picked, rows)) / jnp.maximum(jnp.sum(rows), 1).astype(jnp.float32)


def init_seed_head(key: Array, hidden_size: int, num_seeds: int) -> dict[str, Array]:
    """Parameters of the CE seed head, a `Linear(hidden_size, num_seeds)` (spec 9.2)."""
    scale = 1.0 / np.sqrt(hidden_size)
    kernel = jax.random.uniform(key, (hidden_size, num_seeds), jnp.float32, -scale, scale)
    return {"kernel": kernel, "bias": jnp.zeros((num_seeds,), jnp.float32)}


def seed_head_logits(params: Mapping[str, Array], h: Array) -> Array:
    """Seed-head logits `[..., S]` from pooled states `[..., H]`."""
    return h.astype(jnp.float32) @ params["kernel"] + params["bias"]


def subset_entropy(w: Array, mask: Array, mode: str = "abs") -> Array:
    """Entropy of a subset of flat loss weights (spec 9.2 alpha term); 0 for an empty subset.

    `abs` (default, Q23 fix): p = |w| / max(sum |w|, 1e-8); `reference_signed`: p = w /
    max(sum w, 1e-8) as the reference (NaN when signed advantages give negative p).
    H = -sum p log(p + 1e-12).
    """
    w = w.astype(jnp.float32)
    w = jnp.abs(w) if mode == "abs" else w
    p = masked(w, mask) / jnp.maximum(jnp.sum(masked(w, mask)), 1e-8)
    return -jnp.sum(masked(p * jnp.log(p + 1e-12), mask))


def seed_diversity_l2(h: Array, seed_ids: Array, keep: Array, num_seeds: int) -> Array:
    """Mean pairwise L2 distance between the per-seed mean pooled states (0 if < 2 seeds)."""
    rows = keep & (seed_ids >= 0)
    onehot = (jax.nn.one_hot(seed_ids, num_seeds) * rows[:, None]).astype(jnp.float32)
    counts = jnp.sum(onehot, axis=0)
    sums = jnp.matmul(onehot.T, h.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    present = counts > 0
    diff = means[:, None, :] - means[None, :, :]
    dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1) + 1e-30)
    pairs = present[:, None] & present[None, :] & ~jnp.eye(num_seeds, dtype=bool)
    return jnp.sum(masked(dist, pairs)) / jnp.maximum(jnp.sum(pairs), 1).astype(jnp.float32)


def infoseed_term(
    batch: Mapping[str, Array], loss_weights: Array, valid: Array, settings: InfoSeedSettings
) -> tuple[Array, dict[str, Array]]:
    """The InfoSeed additions to a micro-batch loss and the seed metrics (spec 7.4, 9.2, 9.3).

    Batch keys: `seed_ids[P, G]` (int, -1 for originals), `is_seed_aug[P, G]` (bool), and
    for the seed loss `seed_hidden[P, G, H]` (pooled, differentiable; InfoNCE) or
    `seed_logits[P, G, S]` (CE). `loss_weights[P, G]` are the MaxEnt weights or the GRPO
    advantages (constants). Returns (lambda * L_seed + alpha * (H_orig - H_seed), metrics).
    """
    ids = batch["seed_ids"].reshape(-1).astype(jnp.int32)
    aug = batch["is_seed_aug"].reshape(-1).astype(bool)
    keep = valid.reshape(-1)
    w = jax.lax.stop_gradient(loss_weights).reshape(-1)
    metrics: dict[str, Array] = {}
    loss = jnp.zeros((), jnp.float32)
    seed_loss = jnp.zeros((), jnp.float32)
    if settings.lambda_ > 0:
        if settings.loss_type == "infonce":
            h = batch["seed_hidden"].reshape(ids.shape[0], -1)
            seed_loss = infonce_loss(h, ids, keep, settings.temperature)
        else:
            logits = batch["seed_logits"].reshape(ids.shape[0], -1)
            seed_loss = seed_ce_loss(logits, ids, keep)
        loss = loss + settings.lambda_ * seed_loss
    h_orig = subset_entropy(w, keep & ~aug, settings.entropy_mode)
    h_seed = subset_entropy(w, keep & aug, settings.entropy_mode)
    alpha_term = settings.alpha_entropy * (h_orig - h_seed)
    if settings.alpha_entropy != 0:
        loss = loss + alpha_term
    metrics["loss/seed"] = seed_loss
    metrics["info_seed/entropy"] = alpha_term
    metrics["seed/entropy/orig"] = h_orig
    metrics["seed/entropy/seed_aug"] = h_seed
    metrics["seed/seed_aug_frac"] = jnp.sum(keep & aug) / jnp.maximum(jnp.sum(keep), 1).astype(jnp.float32)
    if "seed_logits" in batch:
        pred = jnp.argmax(batch["seed_logits"].reshape(ids.shape[0], -1), axis=-1)
        hit = (pred == ids).astype(jnp.float32)
        labelled = keep & (ids >= 0)
        metrics["seed/seed_pred_acc"] = jnp.sum(masked(hit, labelled)) / jnp.maximum(jnp.sum(labelled), 1)
        labelled_aug = labelled & aug
        metrics["seed/seed_pred_acc_aug"] = jnp.sum(masked(hit, labelled_aug)) / jnp.maximum(jnp.sum(labelled_aug), 1)
    if "seed_hidden" in batch and settings.num_seeds > 0:
        h = jax.lax.stop_gradient(batch["seed_hidden"]).reshape(ids.shape[0], -1)
        metrics["seed/seed_diversity_l2"] = seed_diversity_l2(h, ids, keep, settings.num_seeds)
    return loss, metrics
