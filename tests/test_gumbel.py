"""The sampler's unrolled Threefry equals jax's, and its Gumbel noise has the right distribution."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32
from scipy import stats

from maxent_jax.rollout.gumbel import gumbel_noise, row_keys, threefry2x32


def test_threefry_matches_jax_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(3):
        key = rng.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)
        x0, x1 = (rng.integers(0, 2**32, size=257, dtype=np.uint64).astype(np.uint32) for _ in range(2))
        y0, y1 = jax.jit(threefry2x32)(*map(jnp.asarray, (key[0], key[1], x0, x1)))
        want = np.asarray(threefry_2x32(jnp.asarray(key), jnp.asarray(np.concatenate([x0, x1]))))
        np.testing.assert_array_equal(np.concatenate([np.asarray(y0), np.asarray(y1)]), want)


def test_noise_is_standard_gumbel_and_differs_by_row_and_step():
    keys = row_keys(jax.random.key(3), 64)
    draws = jax.jit(gumbel_noise, static_argnums=2)
    a, b = np.asarray(draws(keys, jnp.int32(0), 1024)), np.asarray(draws(keys, jnp.int32(1), 1024))
    sample = a.ravel()
    assert np.isfinite(sample).all()
    assert stats.kstest(sample, stats.gumbel_r.cdf).pvalue > 1e-3
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02  # steps are independent streams
    assert abs(np.corrcoef(a[0], a[1])[0, 1]) < 0.15  # so are rows
    again = np.asarray(draws(row_keys(jax.random.key(3), 64), jnp.int32(0), 1024))
    np.testing.assert_array_equal(a, again)
    np.testing.assert_array_equal(a[:8], np.asarray(draws(row_keys(jax.random.key(3), 8), jnp.int32(0), 1024)))


def test_first_argmax_is_argmax_with_ties_to_the_first():
    from maxent_jax.rollout.sampler import first_argmax

    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 37)), jnp.float32)
    x = x.at[2, 5].set(9.0).at[2, 30].set(9.0)  # a tie: the first index wins, as jnp.argmax
    np.testing.assert_array_equal(np.asarray(first_argmax(x)), np.asarray(jnp.argmax(x, axis=-1)))
    assert int(first_argmax(jnp.full((1, 4), jnp.nan))[0]) == 3  # no maximum: still a valid index
