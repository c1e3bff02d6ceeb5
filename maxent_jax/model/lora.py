"""LoRA: low-rank adapters on the decoder's projections, over a frozen base.

    y = x W (+ b) + (alpha / rank) * (x A) B,    A `[*in, rank]`, B `[rank, *out]`, B = 0 at start

A `LoRAProjection` is a `Projection` (same `kernel`/`bias` variables and paths, so HF loading,
export and the rules table see the base unchanged) with two `LoRAParam` variables. `LoRAParam` is a
subclass of `nnx.Param`, so one split, `nnx.split(model, LoRAParam, ...)`, gives the adapters as
the train state and leaves the base in the pass-through `rest`: the base is never differentiated
and the optimizer holds moments for the adapters only, with no change to the train step.

Training calls the projection unmerged (two thin matmuls beside the base one; merging would make
the gradient a full `[in, out]` matrix). The sampler's cached decode stacks k/v and gate/up kernels
into one GEMM per step (`Projection.weight`), and there the adapter is merged into that stacked
copy, which XLA hoists out of the decode loop: no memory beyond the copy it already made.

Because B starts at zero, the model with its initial adapters computes exactly what the base does
(`x W + 0`): the reference policy of a LoRA run is the base with a copy of the adapters as they
were when RL started (megabytes), never a second copy of the base weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from maxent_jax.errors import UserError
from maxent_jax.model import adapter_dropout
from maxent_jax.model.decoder import Decoder, Projection, dense

# HF module names, in the order PEFT and the HF layer list them.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES
ALL_LINEAR = "all-linear"


class LoRAParam(nnx.Param):
    """An adapter matrix: the only trainable variable of a LoRA run (a `nnx.Param` for everything else)."""


# The base's parameters: every `nnx.Param` that is not an adapter.
BASE = nnx.All(nnx.Param, nnx.Not(LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # HF module names, resolved (no 'all-linear')
    dropout: float = 0.0
    base_dtype: str = ""  # '' = model.param_dtype

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lora: ml_collections.ConfigDict) -> "LoRASettings":
        return cls(rank=lora.rank, alpha=float(lora.alpha), targets=resolve_targets(lora.target_modules),
                   dropout=float(lora.dropout), base_dtype=lora.base_dtype)


def resolve_targets(names: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """HF module names -> the projections they name, in model order; 'all-linear' names all seven.

    Like PEFT's 'all-linear', the output head is not included (it is tied to the embedding in most
    small Qwen models, and an adapter there trains the vocabulary, not the policy).
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise UserError(f"config field lora.target_modules=() is invalid: name some of {', '.join(TARGET_MODULES)} "
                        f"or {ALL_LINEAR!r}")
    for name in names:
        if name != ALL_LINEAR and name not in TARGET_MODULES:
            raise UserError(f"config field lora.target_modules entry {name!r} is invalid: one of "
                            f"{', '.join(TARGET_MODULES)} or {ALL_LINEAR!r}")
    if ALL_LINEAR in names:
        return TARGET_MODULES
    return tuple(m for m in TARGET_MODULES if m in names)


class LoRAProjection(Projection):
    """A base `Projection` (kernel and bias adopted, not copied) plus the adapter `scale * (x A) B`."""

    def __init__(self, base: Projection, rank: int, scale: float, *, adapter_dtype: jnp.dtype, key: jax.Array,
                 index: int = 0):
        self.in_dims = base.in_dims
        self.index = index  # this projection's place in the model: its own adapter-dropout stream
        self.kernel = base.kernel
        self.bias = base.bias
        names = tuple(base.kernel.get_metadata()["out_sharding"])
        shape = base.kernel.shape
        in_shape, out_shape = shape[:self.in_dims], shape[self.in_dims:]
        # PEFT's default: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)), B = 0.
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(key, (*in_shape, rank), jnp.float32, -bound, bound)
        self.lora_a = LoRAParam(a.astype(adapter_dtype), out_sharding=(*names[:self.in_dims], "lora_rank"),
                                eager_sharding=False)
        self.lora_b = LoRAParam(jnp.zeros((rank, *out_shape), adapter_dtype),
                                out_sharding=("lora_rank", *names[self.in_dims:]), eager_sharding=False)
        self.scale = scale

    def delta(self) -> jax.Array:
        """`scale * A B` in the kernel's layout `[*in, *out]` (float32 product)."""
        a, b = self.lora_a[...], self.lora_b[...]
        rank = a.shape[-1]
        product = jnp.dot(a.reshape(-1, rank), b.reshape(rank, -1), preferred_element_type=jnp.float32)
        return (self.scale * product).reshape(self.kernel.shape)

    def weight(self) -> jax.Array:
        kernel = self.kernel[...]
        return (kernel.astype(jnp.float32) + self.delta()).astype(jnp.promote_types(kernel.dtype, self.lora_a.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Dropout (PEFT's lora_dropout) on the adapter's input only, and only inside `adapter_dropout.active`.
        low = dense(adapter_dropout.dropped(x, self.index), self.lora_a[...].astype(x.dtype), self.in_dims)
        return super().__call__(x) + self.scale * dense(low, self.lora_b[...].astype(x.dtype), 1)


def projections(model: Decoder) -> Iterator[tuple[int, str, nnx.Module, str]]:
    """(layer, HF module name, parent module, attribute) of every projection of the decoder."""
    for i, block in enumerate(model.layers):
        for name in ATTENTION_MODULES:
            yield i, name, block.attn, name
        for name in MLP_MODULES:
            yield i, name, block.mlp, name


def apply_lora(model: Decoder, settings: LoRASettings, seed: int, adapter_dtype: str | None = None) -> Decoder:
    """Put adapters on `settings.targets` of `model` in place and cast the base to `settings.base_dtype`.

    Adapters take `adapter_dtype` (default: the model's parameter dtype), e.g. float32 adapters on a
    bfloat16 base. A target that this model family lacks is a one-line error.
    """
    present = {name for _, name, parent, attr in projections(model)
               if isinstance(getattr(parent, attr, None), Projection)}
    missing = [t for t in settings.targets if t not in present]
    if missing:
        raise UserError(f"config field lora.target_modules names {missing[0]!r}, which a {model.cfg.family} decoder "
                        f"lacks (it has {', '.join(m for m in TARGET_MODULES if m in present)})")
    adapter_dtype = jnp.dtype(adapter_dtype or model.cfg.param_dtype)
    if settings.base_dtype:
        base_dtype = jnp.dtype(settings.base_dtype)
        for _, var in nnx.iter_graph(model):
            if isinstance(var, nnx.Param) and not isinstance(var, LoRAParam) and var.dtype != base_dtype:
                var.set_value(var.get_value().astype(base_dtype))
    key = jax.random.key(seed)
    for index, (i, name, parent, attr) in enumerate(projections(model)):
        if name in settings.targets:
            base = getattr(parent, attr)
            setattr(parent, attr, LoRAProjection(base, settings.rank, settings.scale, adapter_dtype=adapter_dtype,
                                                 key=jax.random.fold_in(key, index), index=index))
    return model



def run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's config with `lora.learning_rate` (when > 0) in place of `optim.learning_rate` while
    LoRA is on: adapters want a rate 10-100x larger than full fine-tuning, and the default run
    (`--config.lora.enabled=True` alone) should learn without retuning `optim`."""
    if not config.lora.enabled or config.lora.learning_rate <= 0:
        return config
    out = config.copy_and_resolve_references()
    out.optim.learning_rate = config.lora.learning_rate
    return out


def write_base(rest: nnx.State, base: nnx.State) -> None:
    """Set the base weights held in `rest` (the pass-through state of a LoRA split) to `base`'s values, in place.

    In place because the train step, the scorer and the sampler all hold this same `rest`: the
    supervised warm-up trains the base (a LoRA run's adapters start on the warmed-up model) and a
    resumed run reloads the warmed-up base, and every holder must see the new weights.
    """
    held = dict(nnx.to_flat_state(rest))
    for path, var in nnx.to_flat_state(base):
        held[path].set_value(var.get_value() if isinstance(var, nnx.Variable) else var)
