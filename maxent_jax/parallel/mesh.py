"""The device mesh: three named axes ('data', 'fsdp', 'tensor') laid over all devices.

`data` replicates parameters and splits the batch, `fsdp` splits both the batch and the
parameters (ZeRO-3 style: a layer's weights are gathered when used), `tensor` splits
heads/MLP/vocabulary inside each matmul (Megatron style). Which parameter dimension goes
to which axis is decided by `maxent_jax.parallel.rules`, never by the model.

Axis types are `Auto` on purpose: recent JAX makes `jax.make_mesh` default to `Explicit`
axes, under which `with_sharding_constraint` and a sharded `nnx.Embed` lookup fail; the
classic "jit with in/out shardings, XLA propagates the rest" style needs `Auto`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

from maxent_jax.errors import UserError

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")


def resolve_mesh_shape(
    shape: Sequence[int], num_devices: int, axes: Sequence[str] = MESH_AXES
) -> tuple[int, ...]:
    """Return the concrete mesh shape, with a single `-1` replaced by the remaining devices.

    Raises UserError (one line, naming `mesh.shape`/`mesh.axes`) when the axes are not
    exactly `MESH_AXES`, the shape has the wrong length, a size is not positive, more than
    one `-1` is given, or the sizes do not multiply to `num_devices`.
    """
    axes = tuple(axes)
    if axes != MESH_AXES:
        unknown = [a for a in axes if a not in MESH_AXES]
        what = f"unknown axis {unknown[0]!r}" if unknown else f"axes {axes}"
        raise UserError(f"mesh.axes: {what}; the mesh axes are exactly {MESH_AXES}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise UserError(
            f"mesh.shape={shape} has {len(shape)} entries; give one size per axis {MESH_AXES}"
        )
    if sum(s == -1 for s in shape) > 1:
        raise UserError(f"mesh.shape={shape} has more than one -1; at most one axis may fill the rest")
    if any(s == 0 or s < -1 for s in shape):
        raise UserError(f"mesh.shape={shape}: sizes must be positive integers or a single -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise UserError(
                f"mesh.shape={shape}: {num_devices} devices are not divisible by the fixed sizes "
                f"(product {known}), so -1 cannot fill the rest"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    elif known != num_devices:
        raise UserError(
            f"mesh.shape={shape} multiplies to {known} but there are {num_devices} devices; "
            "make the product equal the device count or use -1 for one axis"
        )
    return shape


def make_mesh(
    shape: Sequence[int],
    devices: Sequence[jax.Device] | None = None,
    axes: Sequence[str] = MESH_AXES,
) -> Mesh:
    """Build the ('data', 'fsdp', 'tensor') mesh with Auto axis types.

    `shape` is e.g. (1, 8, 1), (2, 2, 2) or (1, -1, 1); `devices` defaults to all devices of
    all processes (`jax.devices()`), and JAX orders them so the last axis (`tensor`) sits on
    the most closely connected devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_mesh_shape(shape, len(devices), axes)
    return jax.make_mesh(
        resolved, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )
