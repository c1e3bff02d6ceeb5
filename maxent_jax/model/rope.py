"""Rotary position embeddings (RoPE), with the optional Llama 3 frequency scaling.

Layout follows Hugging Face ("rotate half"): a head vector x of size d is split into halves
(x1, x2) and rotated pairwise as (x1 cos - x2 sin, x2 cos + x1 sin) with angle
position * inv_freq[i], inv_freq[i] = theta^(-2i/d). Checkpoints are stored for this layout, so no
permutation of q/k weights is needed when loading.

Llama 3 scaling keeps high frequencies, divides low ones by `factor`, and interpolates smoothly
in between (wavelength 2*pi/inv_freq compared with original_context / {low,high}_freq_factor).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> np.ndarray:
    """Per-pair rotation frequencies, `[head_dim // 2]` float32 (host constant, folded into the program)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of the rotation angles, each `[batch, seq, head_dim]` float32, from positions `[batch, seq]`.

    For more than one position per row (training, scoring, prefill) the two tables are written by a
    two-iteration loop, one head_dim half per iteration (both halves hold the same angles). The loop
    is only there to make XLA materialise the tables: computed plainly, XLA:CPU fused cos and sin into
    every consumer, so the transcendentals were re-evaluated for every head in every layer's q and k
    rotation, forward and backward (32 evaluations in the small preset's gradient program; passing the
    tables in precomputed made its forward 13% and its gradient 10% faster). A decode step (one
    position per row) keeps the plain form: its tables are tiny and a loop would only add overhead.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    if positions.shape[-1] == 1:
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles), jnp.sin(angles)

    def write_half(i: jax.Array, tables: jax.Array) -> jax.Array:  # tables [2 (cos, sin), batch, seq, 2, half]
        both = jnp.stack([jnp.cos(angles), jnp.sin(angles)])[:, :, :, None, :]
        return jax.lax.dynamic_update_slice_in_dim(tables, both, i, axis=3)

    tables = jax.lax.fori_loop(0, 2, write_half, jnp.zeros((2, *angles.shape[:2], 2, angles.shape[-1]), jnp.float32))
    tables = tables.reshape(2, *angles.shape[:2], 2 * angles.shape[-1])
    return tables[0], tables[1]


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate `x` `[batch, seq, heads, head_dim]` by angles `[batch, seq, head_dim]`; returns x's dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
