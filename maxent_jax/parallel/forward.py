"""Sharded, gradient-free forwards: per-token log-probs of completions under given parameters.

The same compiled function scores a batch under the reference parameters (the KL anchor) and
under the current/old policy parameters: both trees have the model's structure, so both get
the shardings the rules table gives the policy. The batch uses the score layout of
`maxent_jax.scoring` (prompts left-padded to Tp columns, completions right-padded to Tc):

    input_ids, positions, attention_mask  [N, Tp + Tc]
    completion_ids                        [N, Tc]
    -> logp                               [N, Tc] float32, logp[i, j] = log p(completion_ids[i, j] | prefix)

The completion token j is predicted by the hidden state at column Tp - 1 + j, so only Tc
columns reach the vocabulary projection (`maxent_jax.model.logprobs.token_logprobs`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from maxent_jax.errors import UserError
from maxent_jax.model.logprobs import token_logprobs
from maxent_jax.parallel.rules import (
    LOGICAL_AXIS_RULES,
    Rules,
    activation_sharding,
    batch_divisor,
    batch_spec,
    constrain_activation,
    tree_shardings,
)
from maxent_jax.parallel.train_step import check_batch, in_iteration

SCORE_KEYS = ("input_ids", "positions", "attention_mask", "completion_ids")


def completion_logprobs_and_hidden(
    model: nnx.Module, batch: dict[str, jax.Array], *, chunk_size: int, group: int = 1, return_entropy: bool = False
) -> tuple[jax.Array | tuple[jax.Array, jax.Array], jax.Array]:
    """(log p(completion_ids[i, j] | tokens before it) `[N, Tc]` float32, last hidden states `[N, Tp + Tc, D]`).

    Pure and differentiable: the building block of losses (the hidden states feed InfoSeed's
    pooled representations). `group` > 1: every `group` consecutive rows share their prompt, which
    is then computed once per group (`Decoder.score_groups`, `model.score_prompt_once`).
    `return_entropy`: the first element is (log-probs, entropy of each position's distribution `[N, Tc]`).
    """
    completion_len = batch["completion_ids"].shape[1]
    prompt_len = batch["input_ids"].shape[1] - completion_len
    tokens = (batch["input_ids"], batch["positions"], batch["attention_mask"])
    if group > 1:
        hidden = model.score_groups(*tokens, group=group, prompt_len=prompt_len)
    else:
        hidden, _ = model(*tokens)
    predicting = hidden[:, prompt_len - 1 : prompt_len - 1 + completion_len]
    predicting = constrain_activation(predicting, ("batch", "seq", "act_embed"))
    scores = token_logprobs(model, predicting, batch["completion_ids"], chunk_size=chunk_size,
                            return_entropy=return_entropy)
    return scores, hidden


def completion_logprobs(model: nnx.Module, batch: dict[str, jax.Array], *, chunk_size: int,
                        group: int = 1) -> jax.Array:
    """log p(completion_ids[i, j] | tokens before it) as `[N, Tc]` float32 (pure; differentiable)."""
    return completion_logprobs_and_hidden(model, batch, chunk_size=chunk_size, group=group)[0]


def _in_micro_batches(fn: Any, state: Any, batch: dict[str, jax.Array], micro_batches: int, group: int) -> jax.Array:
    """Apply `fn(state, slice)` to `micro_batches` strided slices of whole groups of rows, one after the other.

    Groups of `group` rows are split as [N/G] -> [N/(G m), m] (group i goes to slice i % m), which
    keeps each device's block of rows on that device, so no data moves; only one slice's
    activations are live. `state` (the parameters) travels as the loop's carry rather than by
    closure: an nnx model merged from closed-over arrays cannot be rematerialised inside the loop.
    """
    if micro_batches == 1:
        return fn(state, batch)

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // (group * micro_batches), micro_batches, group, *x.shape[1:]).swapaxes(0, 1)
        return x.reshape(micro_batches, -1, *x.shape[3:])

    # `in_iteration`: each slice gathers the FSDP weights itself (XLA hoisted the loop-invariant gathers).
    _, out = jax.lax.scan(lambda carry, b: (carry, fn(*in_iteration(carry, b))), state,
                          jax.tree.map(split, batch))  # [m, N/m, Tc]
    out = out.reshape(micro_batches, -1, group, *out.shape[2:]).swapaxes(0, 1)
    return out.reshape(-1, *out.shape[3:])


@dataclasses.dataclass(frozen=True)
class LogprobFn:
    """`logp = fn(params, batch)`: `[N, Tc]` float32 completion log-probs, sharded like the batch.

    `params` is any parameter tree with the model's structure (policy or reference). On CPU
    the call waits for its result (see `TrainStep`).
    """

    jitted: Any
    rest: nnx.State
    divisor: int  # N must be a multiple of this (the batch's devices)...
    groups_divisor: int  # ...and of this (whole groups in every forward micro-batch)
    blocking: bool

    def __call__(self, params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
        batch = {k: batch[k] for k in SCORE_KEYS}
        check_batch(batch, self.divisor, micro_batched=False)
        rows = batch["input_ids"].shape[0]
        if rows % self.groups_divisor:
            raise UserError(f"batch: {rows} rows are not whole groups; expected a multiple of {self.groups_divisor} "
                            "(rows per prompt group times forward micro-batches)")
        out = self.jitted(params, self.rest, batch)
        return jax.block_until_ready(out) if self.blocking else out


def make_logprob_fn(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    params: nnx.State,
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    chunk_size: int,
    micro_batches: int = 1,
    group: int = 1,
) -> LogprobFn:
    """Compile-on-first-use sharded forward for reference / old-policy log-probs.

    params: a (possibly abstract) parameter tree giving the structure and shardings.
    chunk_size: sequence positions per vocabulary-projection block.
    micro_batches: rows are processed in this many sequential slices to bound activation
        memory; N must be divisible by micro_batches x (devices of the batch axes).
    group: every `group` consecutive rows share their prompt, computed once per group
        (`completion_logprobs_and_hidden`); N must be divisible by micro_batches x group.
    """
    params_sh = tree_shardings(params, mesh, rules)
    rest_sh = tree_shardings(rest, mesh, rules)
    rows = NamedSharding(mesh, batch_spec(rules, micro_batched=False))

    def forward(params: nnx.State, rest: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
        def score(state: tuple[nnx.State, nnx.State], b: dict[str, jax.Array]) -> jax.Array:
            return completion_logprobs(nnx.merge(graphdef, *state), b, chunk_size=chunk_size, group=group)

        with activation_sharding(mesh, rules):
            return _in_micro_batches(score, (params, rest), batch, micro_batches, group).astype(jnp.float32)

    jitted = jax.jit(forward, in_shardings=(params_sh, rest_sh, rows), out_shardings=rows)
    blocking = mesh.devices.flat[0].platform == "cpu"
    return LogprobFn(jitted, rest, batch_divisor(mesh, rules) * micro_batches, group * micro_batches, blocking)
