"""A plan: per-device memory of every phase of an RL step, FLOPs, the verdict, and fixes.

Phases and what is live on each device during them (the trainer keeps the policy's train state
and the frozen reference parameters resident for the whole run):

    update  the train step's program (its arguments: train state + batch; donated in place)
            + the reference parameters
    score   the reference log-prob forward (arguments: reference parameters + rows)
            + the train state
    sample  the in-process sampler (arguments: policy parameters + prompts; KV cache inside)
            + optimizer state + reference parameters        (rollout.backend 'sampler' only)

A phase's peak = its program's peak (arguments + outputs not written in place + temporaries,
per device, from `compiled.memory_analysis()`) + the resident buffers that are not its arguments.
The breakdown splits that peak into parameters, optimizer state, reference parameters,
gradients (the float32 accumulator of the update, sharded like the parameters), batch inputs,
KV cache and the rest of the temporaries (activations, logits blocks, collectives' buffers).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import ml_collections

from maxent_jax.config import set_fields
from maxent_jax.errors import UserError
from maxent_jax.model.config import ModelConfig
from maxent_jax.parallel.flops import decoder_matmul_params
from maxent_jax.parallel.mesh import make_mesh, resolve_mesh_shape
from maxent_jax.parallel.rules import resolve_rules, sharded_abstract
from maxent_jax.plan import programs
from maxent_jax.plan.architecture import divides, model_config

PHASES = ("update", "score", "sample")
ITEMS = ("params", "base", "optimizer", "reference", "gradients", "batch", "kv_cache", "temporaries")
ITEM_LABELS = {"params": "parameters", "base": "frozen base (LoRA)", "optimizer": "optimizer state",
               "reference": "reference params",
               "gradients": "gradients (f32)", "batch": "batch inputs", "kv_cache": "KV cache",
               "temporaries": "activations/temps"}


def parse_bytes(text: str, flag: str = "--device-memory") -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', '81559453696' -> bytes; a UserError otherwise."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not found:
        raise UserError(f"{flag}={text!r} is invalid; expected a size such as 80GB, 80GiB or 141GB")
    number, unit = float(found.group(1)), (found.group(2) or "B").upper()
    value = int(number * (1024 if "I" in unit else 1000) ** "BKMGT".index(unit[0]))
    if value <= 0:
        raise UserError(f"{flag}={text!r} is invalid; expected a positive size")
    return value


def gb(n: float) -> str:
    """Bytes in GB (10^9) with two decimals: the unit GPU memory is sold in."""
    return f"{n / 1e9:.2f}"


def _unit(largest: float) -> tuple[str, float]:
    """GB for real models, MB for the small shapes of tests and demos (whose GB would all read 0.00)."""
    return ("GB", 1e9) if largest >= 1e9 else ("MB", 1e6)


@dataclasses.dataclass
class Phase:
    name: str
    items: dict[str, int]
    peak_bytes: int
    compile_seconds: float
    flops: float | None = None  # compiled FLOPs per step, all devices (update only)
    model_flops: float | None = None  # analytic: 6 N T + attention (update), 2 N T + attention (score)


@dataclasses.dataclass
class Plan:
    config_name: str
    model: str
    mesh: tuple[int, int, int]
    device_memory: int
    phases: list[Phase]
    shapes: programs.StepShapes
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # phase -> why it is not planned
    fix: "Fix | None" = None
    extrapolated_from: tuple[int, int] | None = None  # compiled depths when extended to the real one
    fixes_searched: bool = False

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.peak_bytes)

    @property
    def fits(self) -> bool:
        return self.peak.peak_bytes <= self.device_memory

    @property
    def margin(self) -> int:
        return self.device_memory - self.peak.peak_bytes

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": self.config_name, "model": self.model, "mesh": list(self.mesh),
            "devices": math.prod(self.mesh), "device_memory_bytes": self.device_memory,
            "fits": self.fits, "peak_bytes": self.peak.peak_bytes, "peak_phase": self.peak.name,
            "margin_bytes": self.margin, "shapes": dataclasses.asdict(self.shapes),
            "phases": {p.name: {"peak_bytes": p.peak_bytes, **{f"{k}_bytes": v for k, v in p.items.items()},
                                "flops": p.flops, "model_flops": p.model_flops,
                                "compile_seconds": round(p.compile_seconds, 1)} for p in self.phases},
            "skipped": self.skipped, "extrapolated_from_layers": self.extrapolated_from,
        }
        if self.fix is not None:
            out["fix"] = self.fix.to_json()
        return out


def analytic_flops(cfg: ModelConfig, shapes: programs.StepShapes, *, training: bool,
                   score_prompt_once: bool = False) -> float:
    """Model FLOPs of one step over its rows (`parallel.flops` convention: matmuls only, attention over
    all S keys, remat not counted), with the vocabulary projection only where the trainer applies it:
    the Tc completion positions of each row."""
    head = cfg.hidden_size * cfg.vocab_size
    n_layers = decoder_matmul_params(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                     intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                                     num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                     head_dim=cfg.head_dim) - head
    s = shapes
    layer_tokens = (s.prompts * s.prompt_len + s.rows * s.completion_len) if score_prompt_once else s.rows * s.seq
    forward = (2.0 * n_layers * layer_tokens + 2.0 * head * s.rows * s.completion_len
               + 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * s.seq * layer_tokens)
    return 3.0 * forward if training else forward


def plan(config: ml_collections.ConfigDict, *, devices: int, device_memory: int, config_name: str = "",
         phases: Sequence[str] = PHASES, flops: bool = True, extrapolate: bool = False,
         num_layers: int | None = None) -> Plan:
    """Compile the step's programs for `config` on `devices` host devices and account their memory.

    `extrapolate`: compile the model at 2 and 3 layers and extend every byte and FLOP count linearly
    to its real depth (see `extrapolated`); `num_layers` overrides the depth (used by that).
    """
    if extrapolate:
        return extrapolated(config, devices=devices, device_memory=device_memory, config_name=config_name,
                            phases=phases, flops=flops)
    available = jax.devices()
    if len(available) < devices:
        raise UserError(f"--devices={devices}: only {len(available)} host devices here; set "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax starts")
    shape = resolve_mesh_shape(tuple(config.mesh.shape), devices)
    cfg = model_config(config)
    if num_layers is not None:
        cfg = cfg.replace(num_layers=num_layers)
    mesh = make_mesh(shape, available[:devices])
    rules = resolve_rules(tuple(config.mesh.rules))
    _check_divisible(config, cfg, shape)
    setup = programs.build_setup(config, cfg, mesh, rules)
    params = programs.per_device_bytes(setup.state.params)
    optimizer = programs.per_device_bytes(setup.state.opt_state) + programs.per_device_bytes(setup.state.step)
    reference = params  # the frozen copy of the policy the trainer keeps for the KL anchor (LoRA: of the adapters)
    base = programs.per_device_bytes(sharded_abstract(setup.rest, mesh, rules)) if config.lora.enabled else 0
    grads = 4 * programs.per_device_elements(setup.state.params)
    out: list[Phase] = []
    skipped: dict[str, str] = {}
    if "update" in phases:
        c = programs.compile_update(setup)
        batch = max(0, c.argument - params - optimizer - base)
        items = dict(params=params, base=base, optimizer=optimizer, reference=reference, gradients=min(grads, c.temp),
                     batch=batch, kv_cache=0, temporaries=max(0, c.temp - grads) + c.output - c.alias)
        phase = Phase("update", items, c.peak + reference, c.seconds,
                      model_flops=analytic_flops(cfg, setup.shapes, training=True,
                                                 score_prompt_once=config.model.score_prompt_once))
        if flops:
            phase.flops = programs.update_flops(setup) * devices
        out.append(phase)
    if "score" in phases:
        c = programs.compile_score(setup)
        items = dict(params=params, base=base, optimizer=optimizer, reference=reference, gradients=0,
                     batch=max(0, c.argument - reference - base), kv_cache=0, temporaries=c.temp + c.output - c.alias)
        out.append(Phase("score", items, c.peak + params + optimizer, c.seconds,
                         model_flops=analytic_flops(cfg, setup.shapes, training=False,
                                                    score_prompt_once=config.model.score_prompt_once)))
    if "sample" in phases:
        if config.rollout.backend != "sampler":
            skipped["sample"] = f"rollout.backend={config.rollout.backend!r}: sampled on the rollout server's GPUs"
        else:
            c = programs.compile_sample(setup)
            kv = min(programs.kv_cache_bytes(setup), c.temp)
            items = dict(params=params, base=base, optimizer=optimizer, reference=reference, gradients=0,
                         batch=max(0, c.argument - params - base), kv_cache=kv,
                         temporaries=c.temp - kv + c.output - c.alias)
            out.append(Phase("sample", items, c.peak + optimizer + reference, c.seconds))
    if config.train.packing and config.train.pack_length:
        skipped["packed update"] = (f"train.pack_length={config.train.pack_length} is fixed, so its buffers may outgrow "
                                    "the padded programs planned here; 0 (automatic) keeps every packed step within "
                                    "them (docs/packing.md)")
    name = config.model.name_or_path or "tiny (built-in)"
    return Plan(config_name, name, shape, device_memory, out, setup.shapes, skipped)


def extrapolated(config: ml_collections.ConfigDict, *, devices: int, device_memory: int, config_name: str,
                 phases: Sequence[str], flops: bool) -> Plan:
    """The plan of the model at its depth L from plans at 2 and 3 layers: x(L) = x(3) + (L - 3) (x(3) - x(2)).

    Why it is exact enough: every layer adds the same parameters, optimizer state, gradients, saved
    residuals (remat) and FLOPs, and with the memory-minimising schedule (`__main__.PLAN_XLA_FLAGS`)
    a layer's transient buffers are reused by the next, so each count is affine in the depth
    (tests/test_plan.py compares a 6-layer plan with its extrapolation). Compile time no longer grows
    with the depth: a 28-layer 7B recipe compiles as two small programs.
    """
    depth = model_config(config).num_layers
    two, three = (plan(config, devices=devices, device_memory=device_memory, config_name=config_name,
                       phases=phases, flops=flops, num_layers=n) for n in (2, 3))

    def at_depth(a: float | None, b: float | None) -> Any:
        if a is None or b is None:
            return None
        value = b + (depth - 3) * (b - a)
        return int(value) if isinstance(b, int) else float(value)

    phases_out = [Phase(p3.name, {k: at_depth(p2.items[k], p3.items[k]) for k in p3.items},
                        at_depth(p2.peak_bytes, p3.peak_bytes), p2.compile_seconds + p3.compile_seconds,
                        at_depth(p2.flops, p3.flops), at_depth(p2.model_flops, p3.model_flops))
                  for p2, p3 in zip(two.phases, three.phases)]
    return Plan(config_name, three.model, three.mesh, device_memory, phases_out, three.shapes, three.skipped,
                extrapolated_from=(2, 3))


def _check_divisible(config: ml_collections.ConfigDict, cfg: ModelConfig, shape: tuple[int, int, int]) -> None:
    """A mesh whose fsdp/tensor sizes do not divide the model's sharded dims would silently replicate
    those weights (`parallel.rules` falls back with a warning): refuse it in a plan, naming the dim."""
    _, fsdp, tensor = shape
    dims = {"embed (hidden_size)": (cfg.hidden_size, fsdp), "vocab (vocab_size)": (cfg.vocab_size, tensor),
            "heads (num_attention_heads)": (cfg.num_heads, tensor),
            "mlp (intermediate_size)": (cfg.intermediate_size, tensor)}
    for name, (size, parts) in dims.items():
        if parts > 1 and size % parts:
            raise UserError(f"mesh.shape={shape}: the model's {name}={size} is not divisible by {parts} devices, so "
                            f"those weights would be replicated; use a mesh whose fsdp/tensor sizes divide it, "
                            f"e.g. {suggest_mesh(cfg, math.prod(shape))}")


def suggest_mesh(cfg: ModelConfig, devices: int) -> str:
    """The mesh with the most FSDP that divides the model on `devices` (data takes the rest)."""
    for fsdp in range(devices, 0, -1):
        if devices % fsdp == 0 and cfg.hidden_size % fsdp == 0:
            return f"{devices // fsdp},{fsdp},1"
    return f"{devices},1,1"


# -- fixes ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Fix:
    what: str
    overrides: dict[str, Any]
    plan: Plan

    def flags(self) -> str:
        return " ".join(f"--config.{k}={_flag_value(v)}" for k, v in self.overrides.items())

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in self.overrides.items()},
                "peak_bytes": self.plan.peak.peak_bytes, "fits": self.plan.fits}


def _flag_value(v: Any) -> str:
    return f"'({','.join(map(str, v))})'" if isinstance(v, tuple) else str(v)


def candidate_fixes(config: ml_collections.ConfigDict, devices: int) -> list[tuple[str, dict[str, Any]]]:
    """Changes that lower per-device memory, cheapest in step time first: more FSDP (communication
    only), full remat (one more forward), gradient chunks and smaller micro-batches (less parallel
    work per program), tensor parallelism (more communication per layer)."""
    t, m = config.train, config.model
    d, f, tp = resolve_mesh_shape(tuple(config.mesh.shape), devices)
    out: list[tuple[str, dict[str, Any]]] = []
    if d > 1:
        out.append((f"FSDP over the data axis too: mesh ({1},{d * f},{tp})", {"mesh.shape": (1, d * f, tp)}))
    if not m.remat:
        out.append(("rematerialise each layer in the backward", {"model.remat": True}))
    elif m.remat_policy != "full":
        out.append(("full remat (keep no matmul outputs)", {"model.remat_policy": "full"}))
    info_seed = config.info_seed.enabled and config.info_seed.lambda_ > 0
    group = config.rollout.num_generations + (config.info_seed.num_seeds if config.info_seed.enabled else 0)

    def splits(prompts: int, chunks: int) -> bool:  # `gradient_chunks` takes whole groups or a group's rows
        return prompts % chunks == 0 or group % chunks == 0

    for chunks in (2, 4, 8):
        if not info_seed and splits(t.per_device_train_batch_size, t.gradient_chunks * chunks):
            out.append((f"gradient in {t.gradient_chunks * chunks} chunks of rows",
                        {"train.gradient_chunks": t.gradient_chunks * chunks}))
    for factor in (2, 4, 8):
        per = t.per_device_train_batch_size // factor
        if t.per_device_train_batch_size % factor == 0 and splits(per, t.gradient_chunks):
            out.append((f"micro-batch {per} prompts x {t.gradient_accumulation_steps * factor} accumulation steps",
                        {"train.per_device_train_batch_size": per,
                         "train.gradient_accumulation_steps": t.gradient_accumulation_steps * factor}))
    for tensor in (2, 4, 8):
        if f % tensor == 0 and tp == 1:
            out.append((f"tensor parallelism {tensor}: mesh ({d},{f // tensor},{tensor})",
                        {"mesh.shape": (d, f // tensor, tensor)}))
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    out = copy.deepcopy(config)
    set_fields(out, overrides)
    return out


def find_fix(config: ml_collections.ConfigDict, base: Plan, *, devices: int, limit: int = 6,
             extrapolate: bool = False) -> Fix | None:
    """The first candidate (cheapest first) whose plan fits; only the phases that did not fit are
    recompiled, and at most `limit` candidates are tried."""
    failing = [p.name for p in base.phases if p.peak_bytes > base.device_memory]
    cfg = model_config(config)
    tried = 0
    for what, overrides in candidate_fixes(config, devices):
        changed = apply_overrides(config, overrides)
        if not divides(cfg, resolve_mesh_shape(tuple(changed.mesh.shape), devices)):
            continue
        tried += 1
        if tried > limit:
            break
        candidate = plan(changed, devices=devices, device_memory=base.device_memory, config_name=base.config_name,
                         phases=failing, flops=False, extrapolate=extrapolate)
        if candidate.fits:
            return Fix(what, overrides, candidate)
    return None


# -- rendering --------------------------------------------------------------------------------------


def table(p: Plan) -> str:
    """The per-device table (GB = 10^9 bytes), one column per planned phase, and the verdict."""
    s = p.shapes
    lines = [f"plan: {p.config_name or 'config'} | model {p.model} | mesh (data,fsdp,tensor)={p.mesh} on "
             f"{math.prod(p.mesh)} devices of {gb(p.device_memory)} GB",
             f"step: {s.prompts} prompts x {s.group} completions, {s.num_micro} micro-batches, "
             f"{s.prompt_len}+{s.completion_len} tokens per row", ""]
    if p.extrapolated_from:
        lines.insert(2, f"(compiled at {p.extrapolated_from[0]} and {p.extrapolated_from[1]} layers, extended "
                        "linearly to the model's depth: --extrapolate)")
    unit, scale = _unit(max(ph.peak_bytes for ph in p.phases))
    header = [f"per device ({unit})"] + [p_.name for p_ in p.phases]
    rows = [[ITEM_LABELS[k]] + [f"{ph.items[k] / scale:.2f}" for ph in p.phases] for k in ITEMS
            if any(ph.items[k] for ph in p.phases)]
    rows.append(["peak"] + [f"{ph.peak_bytes / scale:.2f}" for ph in p.phases])
    rows.append(["compile (s)"] + [f"{ph.compile_seconds:.0f}" for ph in p.phases])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    for name, why in p.skipped.items():
        lines.append(f"{name}: not planned ({why})")
    for ph in p.phases:
        if ph.flops:
            lines.append(f"FLOPs per step ({ph.name}, all devices): compiled {ph.flops:.3e} (remat recomputation "
                         f"included) | model {ph.model_flops:.3e} (6 N T + attention)")
        elif ph.model_flops and ph.name == "score":
            lines.append(f"FLOPs per step ({ph.name}): model {ph.model_flops:.3e} (2 N T + attention)")
    peak = p.peak
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"verdict: {verdict}: peak {peak.peak_bytes / scale:.2f} {unit} in '{peak.name}' of "
                 f"{gb(p.device_memory)} GB per device (margin {gb(p.margin)} GB)")
    if not p.fits and p.fixes_searched:
        if p.fix is None:
            lines.append("no single change tried (more fsdp, remat, gradient_chunks, smaller micro-batch, tensor "
                         "parallelism) fits; use more devices")
        else:
            lines.append(f"cheapest fix that fits: {p.fix.what} -> peak {gb(p.fix.plan.peak.peak_bytes)} GB: "
                         f"{p.fix.flags()}")
    return "\n".join(lines)
