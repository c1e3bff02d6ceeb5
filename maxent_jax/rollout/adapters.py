"""Adapter-only weight pushes: a LoRA policy's A and B matrices instead of the whole model.

A LoRA run changes only its adapters, megabytes where the model is gigabytes, so after the base
has reached the server once (a full push, or the model the server started on) each push sends the
adapters alone: `POST /weights?layout=lora&rank=R&alpha=A&targets=q_proj,v_proj&base=ID`. The
tensors are PEFT's (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` `[rank,
in]`, `...lora_B.weight` `[out, rank]`, float32): exactly an `adapter_model.safetensors`, so a
backend with PEFT-format LoRA loading (vLLM) takes them as they are.

`base` names the base the adapters belong to: the server gives every base it holds a fresh id
(at start and on every full push), reports it in `GET /info` and in a full push's reply, and
refuses (409) an adapter push naming another, so adapters never land on a base they were not
trained on (a restarted server, another trainer's full push); the pusher then pushes its base
in full and the adapters again.

This module must not import jax: the vLLM server environment has none.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from maxent_jax.rollout.protocol import LORA_LAYOUT, LORA_PARAMS, ProtocolError

ADAPTER_DTYPE = "float32"
# HF module names an adapter may target, in model order (model.lora.TARGET_MODULES, without jax).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model."
_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight")
_MAX_BASE_ID = 64


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What an adapter push carries: its rank, alpha (scale = alpha / rank), targets and base id."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    base: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def query(self) -> dict[str, str]:
        """The push's query parameters (with `layout`)."""
        return {"layout": LORA_LAYOUT, "rank": str(self.rank), "alpha": repr(float(self.alpha)),
                "targets": ",".join(self.targets), "base": self.base}

    def peft_config(self, base_model: str) -> dict:
        """An `adapter_config.json` for these adapters (what PEFT and vLLM read)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": 0.0, "target_modules": list(self.targets),
                "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True}


def parse_adapter_query(fields: Mapping[str, Sequence[str]]) -> AdapterSpec:
    """The AdapterSpec of an adapter push's query fields (`urllib.parse.parse_qs`); ProtocolError (400) names the bad one."""
    values = {}
    for name in LORA_PARAMS:
        given = fields.get(name, [])
        if len(given) != 1:
            raise ProtocolError(f"an adapter push (layout={LORA_LAYOUT!r}) needs query parameter {name!r} exactly once, "
                                f"got it {len(given)} times; it takes {', '.join(LORA_PARAMS)}")
        values[name] = given[0]
    if not re.fullmatch(r"[1-9]\d{0,5}", values["rank"]):
        raise ProtocolError(f"query parameter rank={values['rank']!r}: expected an integer >= 1")
    try:
        alpha = float(values["alpha"])
    except ValueError:
        alpha = float("nan")
    if not (0 < alpha < 1e6):
        raise ProtocolError(f"query parameter alpha={values['alpha']!r}: expected a number in (0, 1e6)")
    targets = tuple(values["targets"].split(","))
    unknown = [t for t in targets if t not in TARGET_MODULES]
    if unknown or len(set(targets)) != len(targets):
        raise ProtocolError(f"query parameter targets={values['targets']!r}: expected distinct comma-separated names "
                            f"from {', '.join(TARGET_MODULES)}")
    if not re.fullmatch(rf"[0-9a-f]{{1,{_MAX_BASE_ID}}}", values["base"]):
        raise ProtocolError(f"query parameter base={values['base'][:80]!r}: expected the base id of GET /info")
    return AdapterSpec(int(values["rank"]), alpha, tuple(t for t in TARGET_MODULES if t in targets), values["base"])


def adapted_modules(weights: Mapping[str, tuple[tuple[int, ...], str]],
                    targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """`{HF module name: (out, in)}` of every module of a model's HF weights (name -> (shape, dtype)) in `targets`."""
    out = {}
    for name, (shape, _) in weights.items():
        match = _MODULE.fullmatch(name)
        if match and match.group(3) in targets and len(shape) == 2:
            out[name[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return out


def expected_adapter(weights: Mapping[str, tuple[tuple[int, ...], str]],
                     spec: AdapterSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """PEFT tensor name -> (shape, dtype) of an adapter push for `spec` on a model with HF `weights`.

    A target the model lacks, or a rank above a module's smaller side (a low-rank update that is
    not low-rank, and the bound that keeps a push no larger than twice the model), is a ProtocolError.
    """
    modules = adapted_modules(weights, spec.targets)
    present = {name.rsplit(".", 1)[1] for name in modules}
    missing = [t for t in spec.targets if t not in present]
    if missing:
        raise ProtocolError(f"query parameter targets names {missing[0]!r}, which this model lacks")
    limit = min(min(dims) for dims in modules.values())
    if spec.rank > limit:
        raise ProtocolError(f"query parameter rank={spec.rank}: this model's adapted projections allow at most {limit}")
    expected = {}
    for module, (out_dim, in_dim) in modules.items():
        expected[f"{_PREFIX}{module}.lora_A.weight"] = ((spec.rank, in_dim), ADAPTER_DTYPE)
        expected[f"{_PREFIX}{module}.lora_B.weight"] = ((out_dim, spec.rank), ADAPTER_DTYPE)
    return expected


def module_pairs(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """`{HF weight name of the adapted module: (its lora_A name, its lora_B name)}` of an adapter push's tensor names."""
    pairs = {}
    for name in names:
        if name.endswith(".lora_A.weight"):
            module = name[len(_PREFIX): -len(".lora_A.weight")]
            pairs[f"{module}.weight"] = (name, f"{_PREFIX}{module}.lora_B.weight")
    return pairs
