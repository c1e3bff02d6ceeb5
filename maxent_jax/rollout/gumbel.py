"""Gumbel noise for the sampler's decode loop, from Threefry-2x32 written out as plain uint32 ops.

Why not `jax.random` inside the loop: on XLA:CPU jax lowers its Threefry primitive as a rolled
5-trip while loop (to keep compile times down), and the loop then ran two of them per decode step
(a per-row `fold_in`, then the `[rows, vocab]` draw): about 15% of a decode step of the `small`
bench preset. The same cipher (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; 20 rounds, the rotation constants of Random123) unrolled here fuses into one elementwise
loop, and gives bit-for-bit the numbers of `jax.extend.random.threefry_2x32`.

Streams: one key pair per row, drawn once per generate call from the caller's jax key;
the noise of row r at decode step t for vocabulary entry v is

    bits = threefry2x32(row_key[r], (v, t))[0]
    u    = (bits >> 8 + 1/2) / 2^24          in (0, 1), never 0 or 1
    g    = -log(-log(u))                      standard Gumbel

so it depends only on (key, row, step, v): results do not change with batch padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block cipher (20 rounds) of counters (x0, x1) under key (k0, k1); uint32, broadcasting."""
    keys = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for group in range(5):
        for bits in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, bits) ^ x0
        x0 = x0 + keys[(group + 1) % 3]
        x1 = x1 + keys[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def row_keys(key: jax.Array, rows: int, first_row: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """One Threefry key pair per row, `([rows], [rows])` uint32, from a jax PRNG key (any implementation).

    The rows are `[first_row, first_row + rows)` of the call's batch, so a share of the batch decoded
    on its own draws exactly the noise it would draw in the whole batch.
    """
    root = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.asarray(first_row, jnp.uint32) + jnp.arange(rows, dtype=jnp.uint32)
    return threefry2x32(root[0], root[1], index, jnp.zeros_like(index))


def gumbel_noise(keys: tuple[jax.Array, jax.Array], step: jax.Array, vocab: int) -> jax.Array:
    """Standard Gumbel noise `[rows, vocab]` float32 for decode step `step` (a traced int32 scalar)."""
    k0, k1 = keys
    entries = jnp.arange(vocab, dtype=jnp.uint32)[None, :]
    bits, _ = threefry2x32(k0[:, None], k1[:, None], entries, step.astype(jnp.uint32))
    uniform = ((bits >> np.uint32(8)).astype(jnp.float32) + 0.5) * np.float32(2.0 ** -24)
    # Materialised on its own: fused into the consumer's argmax (a variadic reduce), XLA:CPU would
    # evaluate the cipher element by element instead of vectorised.
    return jax.lax.optimization_barrier(-jnp.log(-jnp.log(uniform)))
