"""LoRA adapter dropout, PEFT's: `y = x W + scale * (dropout(x) A) B`, only in the policy's training forward.

Dropout touches the adapter path's input only; the base product `x W` always sees the whole input.
It is switched on by a trace-time context, `active(rate, key)`, which `policy.rl_loss` enters around
the live policy's forward in the train step and nothing else enters: scoring the behaviour or
reference log-probs, the sampler, evaluation and the supervised warm-up (which trains the base, not
the adapters) run the same projections outside it and are never dropped. Outside the context a
`LoRAProjection` computes exactly what it computed before dropout existed.

The key comes from the train step (`parallel.train_step.STEP_KEY`): a function of the run's seed,
the train state's step, the micro-batch index and the `gradient_chunks` piece, so a resumed run
draws the same masks. Each projection folds its own index (`LoRAProjection.index`, fixed when the
adapters are applied) into that key, so its mask is independent of the others' and of the order in
which the decoder happens to call them (remat re-runs the traced program, never the Python).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp

# (rate, key) while the policy's training forward is being traced; None everywhere else.
_ACTIVE: contextvars.ContextVar[tuple[float, jax.Array] | None] = contextvars.ContextVar("adapter_dropout",
                                                                                          default=None)


@contextlib.contextmanager
def active(rate: float, key: jax.Array | None) -> Iterator[None]:
    """Drop adapter inputs at `rate` with masks drawn from `key` while tracing inside; `rate` 0 changes nothing."""
    if rate <= 0:
        yield
        return
    if key is None:
        raise ValueError("adapter dropout needs the train step's key: build the step with "
                         "make_train_step(..., rng_seed=...)")
    token = _ACTIVE.set((float(rate), key))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def dropped(x: jax.Array, index: int) -> jax.Array:
    """`x` with each element zeroed with probability `rate` and the rest scaled by 1 / (1 - rate) (so the
    adapter's expected input is `x`), or `x` itself outside `active`. `index`: the projection's own stream."""
    current = _ACTIVE.get()
    if current is None:
        return x
    rate, key = current
    keep = jax.random.bernoulli(jax.random.fold_in(key, index), 1.0 - rate, x.shape)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))
