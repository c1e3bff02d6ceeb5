"""Lower and compile the trainer's own programs for a mesh of host devices, from abstract arrays.

Nothing here allocates a model: parameters are `jax.ShapeDtypeStruct`s carrying the rules
table's shardings (`sharded_abstract_state`), batches are abstract arrays of the shapes the
trainer feeds its jitted functions at the config's longest prompt and completion, and each
program is `jit(...).lower(...).compile()`d exactly as the trainer builds it:

| phase    | program                                                        | built by                        |
|----------|----------------------------------------------------------------|---------------------------------|
| update   | the sharded, donated train step (accumulation, chunks, remat)  | `parallel.train_step.make_train_step` with `policy.rl_loss` |
| score    | the reference/behaviour log-prob forward over the step's rows  | `parallel.forward.make_logprob_fn` |
| sample   | the in-process sampler: prefill + decode loop over the KV cache | `rollout.sampler._decode` (backend 'sampler' only) |

`compiled.memory_analysis()` of a partitioned program is per device. XLA's cost analysis counts
a loop body once (the accumulation scan, chunked log-probs, tiled attention), so the update's
FLOPs come from one more, loop-free program: one micro-batch's value-and-gradient with whole
logits and untiled attention, times the number of micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxent_jax import optimizer as optimizer_lib
from maxent_jax.model import decoder as decoder_lib
from maxent_jax.model.config import ModelConfig
from maxent_jax.model.decoder import Decoder
from maxent_jax.model.lora import LoRAParam, LoRASettings, apply_lora
from maxent_jax.objectives.registry import get_objective
from maxent_jax.parallel.forward import SCORE_KEYS, make_logprob_fn
from maxent_jax.parallel.rules import Rules, activation_sharding, batch_spec, tree_shardings
from maxent_jax.parallel.train_step import TrainState, make_train_step, sharded_abstract_state
from maxent_jax.plan.flash import tiled_prefix_causal_attention
from maxent_jax.policy import rl_loss


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The sizes of one RL step as the trainer lays it out (worst case: the longest buckets)."""

    prompts: int  # prompts per optimizer step (all micro-batches, all devices)
    group: int  # completions per prompt (num_generations + InfoSeed seeds)
    num_micro: int  # gradient_accumulation_steps
    prompt_len: int  # Tp: max_prompt_length (the prompt bucket's cap)
    completion_len: int  # Tc: max_completion_length

    @property
    def rows(self) -> int:
        return self.prompts * self.group

    @property
    def seq(self) -> int:
        return self.prompt_len + self.completion_len


def step_shapes(config: ml_collections.ConfigDict, mesh_shape: tuple[int, int, int]) -> StepShapes:
    c = config
    seeds = c.info_seed.num_seeds if c.info_seed.enabled else 0
    batch_devices = mesh_shape[0] * mesh_shape[1]
    return StepShapes(prompts=c.train.per_device_train_batch_size * batch_devices * c.train.gradient_accumulation_steps,
                      group=c.rollout.num_generations + seeds, num_micro=c.train.gradient_accumulation_steps,
                      prompt_len=c.rollout.max_prompt_length, completion_len=c.rollout.max_completion_length)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled program's per-device memory (bytes) and cost."""

    argument: int
    output: int
    alias: int
    temp: int
    flops: float
    seconds: float  # lower + compile wall time

    @property
    def peak(self) -> int:
        """Live bytes at the program's high-water mark: inputs, outputs not written in place, temporaries."""
        return self.argument + self.output - self.alias + self.temp


def _compile(lowered: Any, start: float) -> Compiled:
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return Compiled(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
                    alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
                    flops=float(cost.get("flops", 0.0)), seconds=time.monotonic() - start)


def per_device_bytes(tree: Any) -> int:
    """Bytes of the largest shard on any one device, summed over the tree's abstract (or real) arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def per_device_elements(tree: Any) -> int:
    """Elements of one device's shards (for the float32 gradient accumulator, sharded like the parameters)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) for leaf in jax.tree.leaves(tree))


@contextlib.contextmanager
def cudnn_stand_in(cfg: ModelConfig) -> Iterator[None]:
    """While lowering: `model.attention='cudnn'` computed by the tiled stand-in (`plan.flash`).

    The decoder calls `prefix_causal_attention` by name from its own module; the stand-in has its
    signature and numbers and the kernel's memory shape, and nothing else of the program changes.
    """
    if cfg.attention != "cudnn" or jax.devices()[0].platform == "gpu":
        yield
        return
    original = decoder_lib.prefix_causal_attention
    decoder_lib.prefix_causal_attention = tiled_prefix_causal_attention
    try:
        yield
    finally:
        decoder_lib.prefix_causal_attention = original


@dataclasses.dataclass
class Setup:
    """Everything the programs share: the model's abstract state on the mesh."""

    config: ml_collections.ConfigDict
    cfg: ModelConfig
    mesh: Mesh
    rules: Rules
    graphdef: nnx.GraphDef
    rest: nnx.State
    optimizer: Any
    state: TrainState  # abstract, sharded
    shapes: StepShapes


def abstract_split(config: ml_collections.ConfigDict, cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, trained params, rest)` of the run's model, abstract. With `lora.enabled`, as the
    trainer splits a LoRA run: the adapters are the trained parameters (with their optimizer state
    and reference copy) and the frozen base, in `lora.base_dtype`, is in `rest`."""
    lora = LoRASettings.from_config(config.lora) if config.lora.enabled else None

    def model() -> Decoder:
        decoder = Decoder(cfg, rngs=nnx.Rngs(0))
        return apply_lora(decoder, lora, 0, adapter_dtype=cfg.param_dtype) if lora else decoder

    return nnx.split(nnx.eval_shape(model), LoRAParam if lora else nnx.Param, ...)


def build_setup(config: ml_collections.ConfigDict, cfg: ModelConfig, mesh: Mesh, rules: Rules) -> Setup:
    graphdef, params, rest = abstract_split(config, cfg)
    optimizer, _ = optimizer_lib.make_optimizer(config.optim, max(1, config.train.max_steps))
    state = sharded_abstract_state(params, optimizer, mesh, rules)
    shape = tuple(mesh.shape[a] for a in mesh.axis_names)
    return Setup(config, cfg, mesh, rules, graphdef, rest, optimizer, state, step_shapes(config, shape))


def _abstract(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding | None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


def step_batch(setup: Setup, num_micro: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The RL step's batch as `Trainer.prepare` + `step_prep.micro_batched` build it: `[num_micro, P/num_micro, G, ...]`."""
    c, s = setup.config, setup.shapes
    m = s.num_micro if num_micro is None else num_micro
    lead = (m, s.prompts // s.num_micro, s.group)
    sh = NamedSharding(setup.mesh, batch_spec(setup.rules, micro_batched=True))
    batch = {
        "input_ids": _abstract((*lead, s.seq), jnp.int32, sh),
        "positions": _abstract((*lead, s.seq), jnp.int32, sh),
        "attention_mask": _abstract((*lead, s.seq), jnp.bool_, sh),
        "completion_ids": _abstract((*lead, s.completion_len), jnp.int32, sh),
        "completion_mask": _abstract((*lead, s.completion_len), jnp.bool_, sh),
        "seed_ids": _abstract(lead, jnp.int32, sh),
        "is_seed_aug": _abstract(lead, jnp.bool_, sh),
        "token_mask": _abstract((*lead, s.completion_len), jnp.bool_, sh),
        "valid": _abstract(lead, jnp.bool_, sh),
        "ref_logp": _abstract((*lead, s.completion_len), jnp.float32, sh),
        ("advantages" if c.objective.train_grpo_objective else "weights"): _abstract(lead, jnp.float32, sh),
    }
    if c.vllm.return_logprobs:
        batch["behaviour_logp"] = _abstract((*lead, s.completion_len), jnp.float32, sh)
    return batch


def _loss(setup: Setup, chunk_size: int | None = None):
    from maxent_jax.run_setup import objective_settings

    c = setup.config
    objective = get_objective("grpo" if c.objective.train_grpo_objective else "maxent")
    chunk = c.model.logprob_chunk_size if chunk_size is None else chunk_size
    return rl_loss(objective, objective_settings(c), chunk, c.info_seed.pooling, c.model.score_prompt_once)


def compile_update(setup: Setup) -> Compiled:
    """The train step exactly as `Trainer` builds it (`make_train_step` with `rl_loss`)."""
    start = time.monotonic()
    step = make_train_step(setup.graphdef, setup.rest, setup.state, setup.optimizer, _loss(setup), setup.mesh,
                           setup.rules, gradient_chunks=setup.config.train.gradient_chunks)
    with cudnn_stand_in(setup.cfg):
        lowered = step.lower(setup.state, step_batch(setup), {"beta": 0.0})
    return _compile(lowered, start)


def update_flops(setup: Setup) -> float:
    """FLOPs of one optimizer step's forwards and backwards, remat recomputation included.

    One micro-batch's value-and-gradient compiled without loops (whole logits, untiled attention),
    times the micro-batches: XLA's cost analysis would count each loop body once.
    """
    start = time.monotonic()
    cfg = setup.cfg
    if cfg.attention != "blocked":
        cfg = cfg.replace(attention="dot_product")
    graphdef = abstract_split(setup.config, cfg)[0]
    loss = _loss(setup, chunk_size=0)
    params_sh = tree_shardings(setup.state.params, setup.mesh, setup.rules)
    batch = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype,
                                     sharding=NamedSharding(setup.mesh, batch_spec(setup.rules, micro_batched=False)))
             for k, v in step_batch(setup, num_micro=1).items()}
    beta = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(setup.mesh, PartitionSpec()))

    def micro(params, rest, batch, beta):
        def value(p):
            return loss(nnx.merge(graphdef, p, rest), {**batch, "beta": beta})[0]
        with activation_sharding(setup.mesh, setup.rules):
            return jax.value_and_grad(value)(params)

    lowered = jax.jit(micro, in_shardings=(params_sh, tree_shardings(setup.rest, setup.mesh, setup.rules),
                                           batch[next(iter(batch))].sharding, beta.sharding)).lower(
        setup.state.params, setup.rest, batch, beta)
    return _compile(lowered, start).flops * setup.shapes.num_micro


def compile_score(setup: Setup) -> Compiled:
    """The reference (and behaviour) log-prob forward over all of a step's rows, as `Trainer.score`."""
    c, s = setup.config, setup.shapes
    start = time.monotonic()
    fn = make_logprob_fn(setup.graphdef, setup.rest, setup.state.params, setup.mesh, setup.rules,
                         chunk_size=c.model.logprob_chunk_size, micro_batches=s.num_micro,
                         group=s.group if c.model.score_prompt_once else 1)
    rows_sh = NamedSharding(setup.mesh, batch_spec(setup.rules, micro_batched=False))
    widths = {"input_ids": s.seq, "positions": s.seq, "attention_mask": s.seq, "completion_ids": s.completion_len}
    rows = {k: _abstract((s.rows, widths[k]), jnp.bool_ if k == "attention_mask" else jnp.int32, rows_sh)
            for k in SCORE_KEYS}
    with cudnn_stand_in(setup.cfg):
        lowered = fn.jitted.lower(setup.state.params, setup.rest, rows)
    return _compile(lowered, start)


def sample_shapes(setup: Setup) -> dict[str, int]:
    """The sampler's padded program shapes for one step's prompts (`Sampler._decode_share`, one stream)."""
    from maxent_jax.rollout.sampler import _MIN_LEN_BUCKET, _MIN_STOP_BUCKET, bucket

    c, s = setup.config, setup.shapes
    return {"prompts": bucket(s.prompts), "prompt_len": bucket(s.prompt_len, _MIN_LEN_BUCKET),
            "max_new": bucket(s.completion_len, _MIN_LEN_BUCKET), "stops": _MIN_STOP_BUCKET,
            "n": c.rollout.num_generations}


def kv_cache_bytes(setup: Setup) -> int:
    """The sampler's whole KV cache (all layers, every sample row): keys and values in compute dtype."""
    cfg, sh = setup.cfg, sample_shapes(setup)
    rows = sh["prompts"] * sh["n"]
    return (2 * cfg.num_layers * rows * cfg.num_kv_heads * cfg.head_dim * (sh["prompt_len"] + sh["max_new"])
            * jnp.dtype(cfg.compute_dtype).itemsize)


def compile_sample(setup: Setup) -> Compiled:
    """The in-process sampler's program (prefill, then the decode loop) on the live parameters."""
    from maxent_jax.rollout.sampler import _decode

    r, sh = setup.config.rollout, sample_shapes(setup)
    start = time.monotonic()
    p, t, rows = sh["prompts"], sh["prompt_len"], sh["prompts"] * sh["n"]
    scalar = lambda dtype: _abstract((), dtype, None)  # noqa: E731
    greedy = r.temperature == 0.0
    lowered = _decode.lower(
        setup.graphdef, (setup.state.params, setup.rest), _abstract((p, t), jnp.int32, None),
        _abstract((p, t), jnp.bool_, None), _abstract((rows,), jnp.bool_, None),
        _abstract((sh["stops"],), jnp.int32, None), jax.eval_shape(lambda: jax.random.key(0)),
        scalar(jnp.int32), scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32),
        num_samples=sh["n"], max_new=sh["max_new"], greedy=greedy,
        filtered=not greedy and (r.top_k > 0 or r.top_p < 1.0), pad_id=0)
    return _compile(lowered, start)
