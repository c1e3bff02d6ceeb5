"""The key/value cache used for incremental decoding (prefill, then one-token steps).

A fixed-size pytree, so a decode loop compiles once and runs inside `jax.jit`/`lax.while_loop`:
slots `[0, max_len)` are filled left to right; `index` is the next slot to write. Each call of
the decoder with a cache writes its T new keys/values at `[index, index + T)` and marks those
slots valid where the call's attention mask is true, so padding (left-padded prompts, finished
rows) never becomes visible to later queries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys/values of every layer.

    k, v:  `[layers, batch, max_len, kv_heads, head_dim]` (rotary embedding already applied to k)
    valid: `[batch, max_len]` bool, true for slots holding a real (non-pad) token
    index: `[]` int32, the next slot to write
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def zeros(cls, *, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
              dtype: jnp.dtype) -> "KVCache":
        shape = (layers, batch, max_len, kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
        )
