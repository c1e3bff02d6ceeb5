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
    """cos and sin of the rotation angles, each `[batch, seq, head_dim]` float32, from positions `[batch, seq]`."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate `x` `[batch, seq, heads, head_dim]` by angles `[batch, seq, head_dim]`; returns x's dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
