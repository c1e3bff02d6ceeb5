"""The one table that maps logical axis names to mesh axes, and shardings derived from it.

Model parameters name their dimensions logically (`nnx.Param(..., out_sharding=('embed',
'mlp'))`); this module turns those names into `NamedSharding`s on the
('data', 'fsdp', 'tensor') mesh. Changing the parallelism means changing `mesh.shape`,
giving `mesh.rules` overrides in the config ('mlp=fsdp'), or editing `LOGICAL_AXIS_RULES` - never the
model. The optimizer state mirrors the parameters (optax keeps the same `nnx.Param`
wrappers and their metadata), so the same function shards it too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Any, Iterable, Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxent_jax.errors import UserError
from maxent_jax.parallel.mesh import MESH_AXES

log = logging.getLogger(__name__)

MeshAxes = tuple[str, ...]
Rules = tuple[tuple[str, MeshAxes], ...]

# logical name -> mesh axes it is split over (empty: replicated).
LOGICAL_AXIS_RULES: Rules = (
    ("batch", ("data", "fsdp")),  # examples of a batch (activations, inputs)
    ("embed", ("fsdp",)),  # model width of weights: FSDP / ZeRO-3 sharding
    ("vocab", ("tensor",)),  # embedding rows and LM-head columns
    ("heads", ("tensor",)),  # query heads (Megatron attention split)
    ("kv_heads", ("tensor",)),  # key/value heads (replicated if fewer than the tensor size)
    ("mlp", ("tensor",)),  # MLP intermediate width (Megatron MLP split)
    ("head_dim", ()),
    ("layers", ()),  # stacked-layer dimension of scanned blocks
    ("lora_rank", ()),  # the rank of LoRA adapters (model/lora.py): small, replicated
    ("seq", ()),
    ("act_embed", ()),  # model width of activations: whole on each device (weights' 'embed' is split)
)


def _parse_rule(entry: Any) -> tuple[str, MeshAxes]:
    """'vocab=tensor' -> ('vocab', ('tensor',)); 'batch=data+fsdp' -> two axes; 'embed=none' -> ()."""
    text = str(entry)
    name, sep, rhs = text.partition("=")
    name, rhs = name.strip(), rhs.strip()
    if not sep or not name or not rhs:
        raise UserError(
            f"mesh.rules: entry {text!r} is invalid; expected 'logical=mesh_axis' "
            f"(mesh_axis one of {MESH_AXES}, several joined by '+', or 'none')"
        )
    if rhs.lower() == "none":
        return name, ()
    axes = tuple(a.strip() for a in rhs.split("+"))
    for axis in axes:
        if axis not in MESH_AXES:
            raise UserError(
                f"mesh.rules: entry {text!r} names unknown mesh axis {axis!r}; "
                f"valid mesh axes are {MESH_AXES} or 'none'"
            )
    return name, axes


def resolve_rules(overrides: Iterable[str] = ()) -> Rules:
    """Return `LOGICAL_AXIS_RULES` with the config's `mesh.rules` overrides applied.

    Each override is a string 'logical=mesh_axis' ('mlp=fsdp', 'batch=data+fsdp',
    'embed=none'); it replaces the table entry of the same logical name or adds one.
    """
    table = dict(LOGICAL_AXIS_RULES)
    for entry in overrides:
        name, axes = _parse_rule(entry)
        table[name] = axes
    return tuple(table.items())


def logical_to_spec(
    logical: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    where: str = "array",
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions have the given logical names.

    A dimension whose size is not divisible by the product of its mesh axes' sizes is
    replicated (with a warning) instead of failing; so is a dimension whose mesh axes were
    already used by an earlier dimension of the same array. A name missing from the rules
    is an error: it would otherwise silently replicate a possibly huge weight.
    """
    if len(logical) != len(shape):
        raise ValueError(f"{where}: logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec: list[MeshAxes | None] = []
    for name, size in zip(logical, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise UserError(
                f"{where}: logical axis {name!r} has no sharding rule; add it to mesh.rules "
                f"(known: {sorted(table)})"
            )
        axes = tuple(a for a in table[name] if mesh.shape[a] > 1)
        parts = math.prod(mesh.shape[a] for a in axes)
        if not axes:
            spec.append(None)
        elif used.intersection(axes):
            _warn_once((name, size, axes, "reuse"), f"{where}: {name!r} reuses mesh axes {axes}; replicated")
            spec.append(None)
        elif size % parts:
            _warn_once(
                (name, size, axes, "indivisible"),
                f"{where}: dimension {name!r} of size {size} is not divisible by mesh axes {axes} "
                f"({parts} devices); replicated instead (same for every such dimension)",
            )
            spec.append(None)
        else:
            used.update(axes)
            spec.append(axes if len(axes) > 1 else axes[0])
    return PartitionSpec(*spec)


_WARNED: set[tuple] = set()


def _warn_once(key: tuple, message: str) -> None:
    """Log a replication fallback once per (name, size, axes): shardings are derived many times."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """A pytree of `NamedSharding`s with the structure of `tree`.

    `tree` may be an `nnx.State` of parameters, an optax state built from one, a train
    state holding both, or their abstract (`jax.eval_shape`) versions. Each `nnx.Variable`
    with `out_sharding` metadata (logical names) is sharded by the rules; other leaves
    (step counters, scalars, variables without names) are replicated.
    """

    def leaf_sharding(path: tuple, leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            logical = leaf.get_metadata().get("out_sharding")
            value = leaf.get_value()
            if logical:
                spec = logical_to_spec(logical, value.shape, mesh, rules, _path_name(path))
            else:
                spec = PartitionSpec()
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(
        leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def sharded_abstract(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """`tree`'s (abstract or real) arrays as `jax.ShapeDtypeStruct`s carrying `tree_shardings`' shardings:
    what the trainer would place, without allocating it."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                        tree_shardings(tree, mesh, rules))


def batch_spec(rules: Rules = LOGICAL_AXIS_RULES, micro_batched: bool = True) -> PartitionSpec:
    """Spec of a batch array: `[num_micro, micro_batch, ...]` (micro_batched) or `[batch, ...]`.

    The example dimension follows the 'batch' rule, ('data', 'fsdp') by default; the
    micro-batch dimension is scanned over inside the step and never split.
    """
    axes = dict(rules).get("batch", ())
    entry = None if not axes else (axes if len(axes) > 1 else axes[0])
    return PartitionSpec(None, entry) if micro_batched else PartitionSpec(entry)


def batch_divisor(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> int:
    """How many devices the example dimension is split over (batch sizes must divide by it)."""
    return math.prod(mesh.shape[a] for a in dict(rules).get("batch", ()))


_ACTIVE = threading.local()  # (mesh, rules) while a sharded program is being traced


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Within this context (entered inside a jitted function), `constrain_activation` applies."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, rules)
    try:
        yield
    finally:
        _ACTIVE.value = previous


def constrain_activation(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names, e.g. `(batch, seq, act_embed)`; else identity.

    Why: without it XLA's propagation meets batch-sharded inputs and `embed`-sharded weights
    on the same mesh axis (`fsdp`) and may resolve the conflict by gathering the whole batch's
    activations on every device. Pinning the residual stream to `P(('data', 'fsdp'))` makes
    FSDP gather weights instead. Outside `activation_sharding` (eager code, single-device
    tests, the sampler) this returns `x` unchanged.
    """
    active = getattr(_ACTIVE, "value", None)
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical, x.shape, mesh, rules, where="activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
