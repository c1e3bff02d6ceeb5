"""The sharded train step: one `jax.jit` that accumulates gradients, clips, updates, guards NaNs.

State and batch shardings come from the rules table (`maxent_jax.parallel.rules`); the step
is compiled once per batch shape with explicit `in_shardings`/`out_shardings`, and the train
state is donated so parameters and optimizer moments are updated in place.

Batch layout: a dict of arrays shaped `[num_micro, micro_batch, ...]`; the step scans over
the `num_micro` micro-batches (gradient accumulation inside the compiled program) and the
`micro_batch` dimension is split over the mesh axes of the 'batch' rule, ('data', 'fsdp').
With `gradient_chunks` > 1 each micro-batch's gradient is itself computed in that many pieces of
rows (each prompt's completions, or whole groups), one forward and backward at a time, and equals
the whole micro-batch's gradient (a `SplitLoss`; see `_chunked_value_and_grad`).
Per-step values shared by all rows (controller tau/beta, ...) travel as `scalars`: traced,
replicated arguments merged into every micro-batch dict, so changing them never recompiles.
Per-step randomness (the policy's adapter dropout) comes from `STEP_KEY`, a key the step derives from
a seed, its own state's step and the micro-batch and chunk indices: no key is passed in, and a resumed
run (whose restored state holds the step) draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxent_jax.errors import UserError
from maxent_jax.parallel.rules import (
    LOGICAL_AXIS_RULES,
    Rules,
    activation_sharding,
    batch_divisor,
    batch_spec,
    sharded_abstract,
    tree_shardings,
)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, Metrics]]
BUFFER_PREFIX = "buffer_"  # batch keys of packed token buffers `[.., buffers, ...]` (`maxent_jax.packing`)
# With `make_train_step(rng_seed=...)`: the micro-batch dict's PRNG key (raw uint32[2]) for randomness in the
# loss, fold_in(fold_in(fold_in(PRNGKey(rng_seed), state.step), micro-batch index), gradient-chunk piece).
STEP_KEY = "step_key"


@dataclasses.dataclass(frozen=True)
class SplitLoss:
    """A loss whose batch rows enter only through a per-row score: `objective(score(model, batch), batch)`.

    `score(model, batch)` maps the batch's rows to an array with the rows on its leading axis (the
    policy's completion log-probs); `objective(scores, batch) -> (loss, metrics)` must be separable
    over rows: the gradient with respect to one row's score depends on that row's score and on the
    batch (its masks, weights, counts) only, never on other rows' scores. The objectives of
    `maxent_jax.objectives` are: sums over rows and tokens divided by counts taken from masks.
    That is what lets `gradient_chunks` differentiate the rows in pieces and add the gradients.
    """

    score: Callable[[nnx.Module, Batch], jax.Array]
    objective: Callable[[jax.Array, Batch], tuple[jax.Array, Metrics]]

    def __call__(self, model: nnx.Module, batch: Batch) -> tuple[jax.Array, Metrics]:
        return self.objective(self.score(model, batch), batch)


class TrainState(NamedTuple):
    """Everything the optimizer step changes; donated to (and returned by) the train step."""

    params: nnx.State  # the model's nnx.Param variables
    opt_state: optax.OptState  # mirrors `params` (same nnx.Param wrappers, same metadata)
    step: jax.Array  # int32 [], number of applied (not skipped) updates


def abstract_train_state(params: nnx.State, optimizer: optax.GradientTransformation) -> TrainState:
    """Shapes/dtypes of the train state (no memory, no compute): used to derive shardings."""
    return jax.eval_shape(
        lambda p: TrainState(p, optimizer.init(p), jnp.zeros((), jnp.int32)), params
    )


def sharded_abstract_state(
    params: nnx.State,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> TrainState:
    """The train state as `jax.ShapeDtypeStruct`s carrying the rules' shardings on `mesh`.

    This is the restore target for a checkpoint written on any mesh
    (`CheckpointManager.restore(step, target)` reshards onto this one).
    """
    return sharded_abstract(abstract_train_state(params, optimizer), mesh, rules)


def init_sharded_model(
    make_model: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh, seed: int = 0, rules: Rules = LOGICAL_AXIS_RULES
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Randomly initialise a model with every parameter born sharded: `(graphdef, params, rest)`.

    The initialiser runs inside a jit whose `out_shardings` come from the rules, so a model
    larger than one device is never materialised whole (eager construction would put it all
    on the default device first). `make_model` is e.g. `lambda rngs: Decoder(cfg, rngs=rngs)`;
    the result equals `make_model(nnx.Rngs(seed))` built eagerly.

    The PRNG key is an argument of the jit, not a constant inside it, so XLA has no random draws
    to fold at compile time. Compiling is still slow on a GPU for big models (the Qwen2.5-1.5B shape
    took over a minute on an H100, eager construction 5-7 s): construct a model that fits one device
    eagerly and place it with `init_train_state`.
    """
    graphdef, abstract_params, abstract_rest = nnx.split(
        nnx.eval_shape(lambda: make_model(nnx.Rngs(seed))), nnx.Param, ...
    )

    def init(key: jax.Array) -> tuple[nnx.State, nnx.State]:
        _, params, rest = nnx.split(make_model(nnx.Rngs(key)), nnx.Param, ...)
        return params, rest

    out = (tree_shardings(abstract_params, mesh, rules), tree_shardings(abstract_rest, mesh, rules))
    params, rest = jax.jit(init, out_shardings=out)(jax.random.key(seed))
    return graphdef, params, rest


def init_train_state(
    params: nnx.State,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> TrainState:
    """Place `params` on the mesh by the rules and build the optimizer state there.

    The optimizer state is created inside a jit whose `out_shardings` come from the rules,
    so Adam moments are born sharded like their parameters.
    """
    shardings = tree_shardings(abstract_train_state(params, optimizer), mesh, rules)
    params = jax.device_put(params, shardings.params)
    init = jax.jit(
        lambda p: TrainState(p, optimizer.init(p), jnp.zeros((), jnp.int32)),
        in_shardings=(shardings.params,),
        out_shardings=shardings,
    )
    return init(params)


def _as_float32(loss: jax.Array, metrics: Metrics) -> tuple[jax.Array, Metrics]:
    return loss.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def split_axis(prompts: int, group: int, chunks: int, devices: int, packed: bool) -> int:
    """The axis of a micro-batch's grouped arrays `[prompts, group, ...]` that `gradient_chunks` splits,
    strided (piece c takes indices c, c + chunks, ...): 1, each prompt's completions, or 0, whole groups.
    The one rule of the train step and of the packer (`maxent_jax.packing`), which lays its buffers out
    by it. `devices`: the batch devices the prompts are split over, in contiguous shards.

    Padded: 1 whenever the group divides by `chunks` (one prompt per device still splits: a 7B recipe's
    16 completions of 6k tokens), else 0. Packed: 0 whenever each device's prompts divide by `chunks`
    (a strided split of the prompts then stays within every device's shard, and no piece needs a copy
    of another's prompt), else 1 when the group divides (each piece's buffers hold a copy of every
    prompt; the copies' gradients add up), else 0.
    """
    if packed and prompts % (devices * chunks) == 0:
        return 0
    return 1 if group > 0 and group % chunks == 0 else 0


def piece_axis(shapes: dict[str, tuple[int, ...]], chunks: int, devices: int = 1) -> int:
    """`split_axis` of a micro-batch from its arrays' shapes (`[prompts, group, ...]`, and packed token
    buffers `[buffers, ...]`, which are always split on their own axis 0: `piece`)."""
    packed = any(k.startswith(BUFFER_PREFIX) for k in shapes)
    grouped = [shape for k, shape in shapes.items() if not k.startswith(BUFFER_PREFIX)]
    groups = {shape[1] if len(shape) >= 2 else 0 for shape in grouped}
    group = min(groups) if len(groups) == 1 else 0
    return split_axis(grouped[0][0] if grouped else 0, group, chunks, devices, packed)


def strided(x: jax.Array, axis: int, chunks: int) -> jax.Array:
    """[..., n, ...] -> [..., n / chunks, chunks, ...] at `axis`: index i * chunks + c -> (i, c)."""
    return x.reshape(*x.shape[:axis], -1, chunks, *x.shape[axis + 1:])


def piece(batch: Batch, c: jax.Array | int, chunks: int, axis: int) -> Batch:
    """Piece `c` of a micro-batch: the grouped arrays' indices c, c + chunks, ... along `axis` (`piece_axis`),
    packed token buffers' along their axis 0 (the packer puts piece c's buffers there)."""
    return {k: jax.lax.dynamic_index_in_dim(strided(x, a, chunks), c, axis=a + 1, keepdims=False)
            for k, x in batch.items() for a in [0 if k.startswith(BUFFER_PREFIX) else axis]}


def _chunked_value_and_grad(graphdef: nnx.GraphDef, loss: SplitLoss, rest: nnx.State, chunks: int,
                            scalars: dict[str, jax.Array], devices: int = 1) -> Callable:
    """`value_and_grad` of a micro-batch's loss computed over `chunks` pieces of its rows in turn.

    Rows are split along `piece_axis`: piece c holds completions c, c + chunks, ... of every prompt
    (or groups c, c + chunks, ...), a strided split of an axis no device splits further, so every
    device keeps an equal share of each piece; packed token buffers are split along their own axis
    0, where the packer put each piece's (`piece`). Its gradient is that of the objective evaluated on
    all rows' scores with the piece's own scores live and every other row's held at a constant
    (zero): by `SplitLoss`'s separability that is exactly the piece's rows' share of the full
    gradient, so the pieces' gradients add up to the whole micro-batch's. The loss and metrics are
    then the objective of all pieces' scores together, as without chunks.

    Why: only one piece's activations are alive at a time. On a CPU a micro-batch whose
    activations overflow the last-level cache runs faster in pieces that fit (the `tiny` bench
    preset's update: about 50 -> 40 ms with two, docs/benchmarks.md); on a GPU it lowers peak memory.
    """

    def value_and_grad(params: nnx.State, micro_batch: Batch) -> tuple[tuple[jax.Array, Metrics], nnx.State]:
        micro_batch = dict(micro_batch)
        key = micro_batch.pop(STEP_KEY, None)  # each piece draws from its own fold of the micro-batch's key
        batch = {**micro_batch, **scalars}
        axis = piece_axis({k: x.shape for k, x in micro_batch.items()}, chunks, devices)

        def piece_of(c: jax.Array) -> Batch:
            keyed = {} if key is None else {STEP_KEY: jax.random.fold_in(key, c)}
            return {**piece(micro_batch, c, chunks, axis), **keyed, **scalars}

        def put(full: jax.Array, part: jax.Array, c: jax.Array) -> jax.Array:
            return jax.lax.dynamic_update_index_in_dim(strided(full, axis, chunks), part, c,
                                                       axis=axis + 1).reshape(full.shape)

        def piece_loss(p: nnx.State, c: jax.Array, held: jax.Array) -> tuple[jax.Array, jax.Array]:
            part = loss.score(nnx.merge(graphdef, p, rest), piece_of(c))
            value, _ = loss.objective(put(held, part, c), batch)
            return value.astype(jnp.float32), part

        part = jax.eval_shape(lambda p: loss.score(nnx.merge(graphdef, p, rest), piece_of(0)), params)
        held = jnp.zeros((*part.shape[:axis], part.shape[axis] * chunks, *part.shape[axis + 1:]), part.dtype)

        def body(grad_sum: nnx.State, c: jax.Array) -> tuple[nnx.State, jax.Array]:
            p, c = in_iteration(params, c)
            (_, part), grads = jax.value_and_grad(piece_loss, has_aux=True)(p, c, held)
            return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads), part

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        grads, parts = jax.lax.scan(body, zeros, jnp.arange(chunks))
        scores = jnp.moveaxis(parts, 0, axis + 1).reshape(held.shape)  # index i * chunks + c from piece c
        value = _as_float32(*loss.objective(jax.lax.stop_gradient(scores), batch))
        return value, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    return value_and_grad


def in_iteration(params: nnx.State, batch: Batch) -> tuple[nnx.State, Batch]:
    """`params` and `batch` tied together inside a loop's body, so the parameters' uses cannot leave the loop.

    Why: the parameters are the same in every iteration of the accumulation (or gradient-chunk) loop, so
    XLA's loop-invariant code motion hoisted each layer's FSDP all-gather out of it, and every layer's
    gathered weights stayed live for the whole loop: the unsharded model on every device (7B: 15 GB in
    bf16, 30 GB in XLA:CPU's float32 copies; docs/planning.md). Through an optimization barrier with the
    iteration's own batch slice they depend on the iteration, so each layer gathers its weights where it
    uses them and frees them after. The barrier computes nothing.
    """
    return jax.lax.optimization_barrier((params, batch))


def _accumulate(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    params: nnx.State,
    rest: nnx.State,
    batch: Batch,
    scalars: dict[str, jax.Array],
    param_shardings: Any,
    chunks: int = 1,
    key: jax.Array | None = None,
    devices: int = 1,
) -> tuple[jax.Array, Metrics, nnx.State]:
    """Mean loss, mean metrics and mean float32 gradient over the leading micro-batch axis.

    `key`: the step's key; micro-batch i then holds `STEP_KEY` = fold_in(key, i). `devices`: the batch
    devices (`piece_axis`)."""

    def micro_loss(p: nnx.State, micro_batch: Batch) -> tuple[jax.Array, Metrics]:
        return _as_float32(*loss_fn(nnx.merge(graphdef, p, rest), {**micro_batch, **scalars}))

    if chunks > 1:
        grad_fn = _chunked_value_and_grad(graphdef, loss_fn, rest, chunks, scalars, devices)
    else:
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    def keyed(micro_batch: Batch, index: jax.Array | int) -> Batch:
        return micro_batch if key is None else {**micro_batch, STEP_KEY: jax.random.fold_in(key, index)}

    first = keyed(jax.tree.map(lambda x: x[0], batch), 0)
    _, metrics_shape = jax.eval_shape(micro_loss, params, first)

    def body(carry, indexed):
        grad_sum, loss_sum, metric_sums = carry
        micro_batch, index = indexed
        (loss, metrics), grads = grad_fn(*in_iteration(params, keyed(micro_batch, index)))
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        grad_sum = jax.lax.with_sharding_constraint(grad_sum, param_shardings)
        metric_sums = jax.tree.map(jnp.add, metric_sums, metrics)
        return (grad_sum, loss_sum + loss, metric_sums), None

    init = (
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape),
    )
    num_micro = jax.tree.leaves(batch)[0].shape[0]
    (grad_sum, loss_sum, metric_sums), _ = jax.lax.scan(body, init, (batch, jnp.arange(num_micro)))
    grads = jax.tree.map(lambda g, p: (g / num_micro).astype(p.dtype), grad_sum, params)
    metrics = jax.tree.map(lambda m: m / num_micro, metric_sums)
    return loss_sum / num_micro, metrics, grads


def _guarded_update(
    optimizer: optax.GradientTransformation,
    state: TrainState,
    loss: jax.Array,
    grads: nnx.State,
) -> tuple[TrainState, jax.Array, jax.Array]:
    """Apply the optimizer unless loss or gradient norm is non-finite; return (state, norm, skipped).

    A `lax.cond`, not an elementwise `where(finite, new, old)`: the select keeps the old Adam
    moments alive next to the new ones, so XLA copied every donated moment buffer before updating
    it (a full copy of the optimizer state per step); the conditional updates them in place.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(state: TrainState) -> TrainState:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)

    new_state = jax.lax.cond(finite, apply, lambda unchanged: unchanged, state)
    return new_state, grad_norm, ~finite


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A compiled-on-first-use train step: `state, metrics = step(state, batch)`.

    `metrics` holds the loss_fn's metrics averaged over micro-batches plus `loss`,
    `grad_norm` (before clipping) and `skipped` (True when a non-finite loss or gradient
    norm left params and optimizer state untouched). On CPU the call waits for the result:
    several in-flight steps with collectives can deadlock XLA:CPU's rendezvous.
    """

    jitted: Any  # jax.jit(fn(state, rest, batch, scalars)) with shardings and donation
    rest: nnx.State  # non-parameter model variables, passed through unchanged
    divisor: int  # micro_batch must be a multiple of this (devices of the batch axes)...
    blocking: bool
    chunks: int = 1  # ...times this when `gradient_chunks` splits whole groups (`piece_axis` 0)

    def __call__(
        self, state: TrainState, batch: Batch, scalars: dict[str, Any] | None = None
    ) -> tuple[TrainState, Metrics]:
        """One optimizer step; `scalars` ({name: number}) are added to every micro-batch dict."""
        scalars = _check_scalars(batch, scalars)
        whole_groups = piece_axis({k: x.shape[1:] for k, x in batch.items()}, self.chunks, self.divisor) == 0
        check_batch(batch, self.divisor * (self.chunks if whole_groups else 1), micro_batched=True)
        out = self.jitted(state, self.rest, batch, scalars)
        return jax.block_until_ready(out) if self.blocking else out

    def lower(self, state: Any, batch: Any, scalars: dict[str, Any] | None = None) -> Any:
        """Lower (without running) for HLO / memory inspection."""
        return self.jitted.lower(state, self.rest, batch, _check_scalars(batch, scalars))


def _check_scalars(batch: Batch, scalars: dict[str, Any] | None) -> dict[str, jax.Array]:
    """Scalars as float32 0-d arrays (a stable signature: new values never recompile)."""
    scalars = dict(scalars or {})
    clash = sorted(set(scalars) & set(batch))
    if clash:
        raise ValueError(f"scalars {clash} clash with batch keys of the same name")
    return {k: jnp.asarray(v, jnp.float32) for k, v in scalars.items()}


def check_batch(batch: Batch, divisor: int, micro_batched: bool) -> None:
    """Fail with one line if the batch cannot be split over the batch mesh axes."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise UserError("batch: empty; expected a dict of arrays")
    dims = 2 if micro_batched else 1
    layout = "[num_micro, micro_batch, ...]" if micro_batched else "[batch, ...]"
    for path, x in leaves:
        if x.ndim < dims:
            raise UserError(f"batch{jax.tree_util.keystr(path)}: shape {x.shape}; expected {layout}")
    # Packed token buffers (`maxent_jax.packing`) lead with their own count of buffers, not of rows.
    buffers = {jax.tree_util.keystr(path): x for path, x in leaves
               if jax.tree_util.keystr(path).startswith(f"['{BUFFER_PREFIX}")}
    lead = next((x.shape[:dims] for path, x in leaves if jax.tree_util.keystr(path) not in buffers),
                next(iter(buffers.values())).shape[:dims] if buffers else None)
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        if x.shape[:dims] != lead and (name not in buffers or x.shape[:dims - 1] != lead[:dims - 1]):
            raise UserError(f"batch{name}: leading dims {x.shape[:dims]} differ from {lead}")
    buffer_counts = {x.shape[dims - 1] for x in buffers.values()}
    for rows in (lead[-1], *buffer_counts):
        if rows % divisor:
            raise UserError(
                f"batch: {rows} rows per (micro-)batch cannot be split evenly; use a multiple of "
                f"{divisor} (devices of the mesh axes of the 'batch' rule, times forward micro-batches or "
                "train.gradient_chunks)"
            )


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    state: TrainState,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn,
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    gradient_chunks: int = 1,
    rng_seed: int | None = None,
) -> TrainStep:
    """Build the jitted, sharded, donating train step.

    graphdef, rest: from `nnx.split(model, nnx.Param, ...)`; `rest` holds non-trainable
        variables (may be empty).
    state: the (possibly abstract) `TrainState` whose structure the step takes and returns.
    loss_fn: `loss_fn(model, micro_batch) -> (scalar loss, {name: scalar metric})`; the
        step averages loss, metrics and gradients over micro-batches, so a loss that is a
        mean over a micro-batch gives exactly the big-batch gradient when micro-batches
        have equal weight. `micro_batch` also holds the call's `scalars`.
    gradient_chunks: compute each micro-batch's gradient in this many pieces of rows (exactly the
        same gradient, less live activation memory); needs a `SplitLoss`, and groups that divide by
        it (each prompt's completions are split) or micro-batches whose prompts divide by it times
        the batch devices (whole groups are split; `split_axis`), packed or not.
    rng_seed: when given, every micro-batch dict (and each gradient-chunk piece) also holds `STEP_KEY`,
        drawn from this seed and `state.step` inside the step (the loss's per-step randomness:
        `policy.rl_loss`'s adapter dropout). None: no key, and the step is what it was without one.
    """
    if gradient_chunks > 1 and not isinstance(loss_fn, SplitLoss):
        raise ValueError(f"gradient_chunks={gradient_chunks} needs a SplitLoss (a per-row score and a "
                         "row-separable objective)")
    state_sh = tree_shardings(state, mesh, rules)
    rest_sh = tree_shardings(rest, mesh, rules)
    batch_sh = NamedSharding(mesh, batch_spec(rules, micro_batched=True))
    replicated = NamedSharding(mesh, PartitionSpec())
    devices = batch_divisor(mesh, rules)

    def step(
        state: TrainState, rest: nnx.State, batch: Batch, scalars: dict[str, jax.Array]
    ) -> tuple[TrainState, Metrics]:
        key = None if rng_seed is None else jax.random.fold_in(jax.random.PRNGKey(rng_seed), state.step)
        with activation_sharding(mesh, rules):
            loss, metrics, grads = _accumulate(
                graphdef, loss_fn, state.params, rest, batch, scalars, state_sh.params, gradient_chunks, key, devices
            )
        new_state, grad_norm, skipped = _guarded_update(optimizer, state, loss, grads)
        return new_state, {**metrics, "loss": loss, "grad_norm": grad_norm, "skipped": skipped}

    jitted = jax.jit(
        step,
        in_shardings=(state_sh, rest_sh, batch_sh, replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    blocking = mesh.devices.flat[0].platform == "cpu"
    return TrainStep(jitted, rest, devices, blocking, gradient_chunks)
