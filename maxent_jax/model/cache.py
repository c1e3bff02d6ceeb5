"""The key/value cache used for incremental decoding (prefill, then one-token steps).

A fixed-size pytree, so a decode loop compiles once and runs inside `jax.jit`/`lax.while_loop`:
slots `[0, max_len)` are filled left to right; `index` is the next slot to write. Each call of
the decoder with a cache writes its T new keys/values at `[index, index + T)` and marks those
slots valid where the call's attention mask is true, so padding (left-padded prompts, finished
rows) never becomes visible to later queries.

One array per layer (not one stacked array), in the layouts `model.attention` reads in place:
no slicing of a stacked array, no relayout of the cache on a decode step. A model with one kv head
(e.g. the default config's) stores its cache without that axis: with it, XLA:CPU lowers the attention
matmul on a rank-3 view of the updated cache and fuses each layer's cache update twice (once for that
view, once for the loop carry), copying every cache array on every decode step (16 copies per step
for the `tiny` bench preset; dropping the axis made its sampler about 1.6x faster).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys/values of every layer.

    k:     per layer, `[batch, kv_heads, head_dim, max_len]` (rotary embedding already applied);
           `[batch, head_dim, max_len]` when kv_heads == 1
    v:     per layer, `[batch, kv_heads, max_len, head_dim]`; `[batch, max_len, head_dim]` when kv_heads == 1
    valid: `[batch, max_len]` bool, true for slots holding a real (non-pad) token
    index: `[]` int32, the next slot to write
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    @classmethod
    def zeros(cls, *, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
              dtype: jnp.dtype) -> "KVCache":
        heads = (kv_heads,) if kv_heads > 1 else ()
        return cls(
            k=tuple(jnp.zeros((batch, *heads, head_dim, max_len), dtype) for _ in range(layers)),
            v=tuple(jnp.zeros((batch, *heads, max_len, head_dim), dtype) for _ in range(layers)),
            valid=jnp.zeros((batch, max_len), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
        )

    def map_rows(self, fn) -> "KVCache":
        """The cache with `fn` applied along the batch axis of every array (e.g. repeat each row n times)."""
        return self.replace(k=tuple(fn(x) for x in self.k), v=tuple(fn(x) for x in self.v), valid=fn(self.valid))
