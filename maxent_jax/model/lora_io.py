"""LoRA in and out: the PEFT adapter directory, the merged model, and the frozen base's identity.

PEFT layout (what `peft.PeftModel.from_pretrained` reads): `adapter_config.json` and
`adapter_model.safetensors` with, per adapted projection,

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [rank, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, rank]

where `in`/`out` are the HF `nn.Linear` sizes. Ours are A `[*in, rank]`, B `[rank, *out]` with the
multi-axis layouts of `model.mapping` (heads and head_dim flattened row-major, as HF flattens
them), so the conversion is a reshape and a transpose: exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from maxent_jax.model.config import ModelConfig
from maxent_jax.model.hf_io import export_hf_checkpoint
from maxent_jax.model.lora import ATTENTION_MODULES, LoRAParam, LoRAProjection, LoRASettings, projections

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _hf_module(layer: int, name: str) -> str:
    kind = "self_attn" if name in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{kind}.{name}"


def peft_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """`{PEFT tensor name: float32 host array in HF layout}` of every adapter of `model` (a LoRA decoder)."""
    out = {}
    for layer, name, parent, attr in projections(model):
        proj = getattr(parent, attr)
        if not isinstance(proj, LoRAProjection):
            continue
        a, b = np.asarray(proj.lora_a[...], np.float32), np.asarray(proj.lora_b[...], np.float32)
        rank = a.shape[-1]
        prefix = f"base_model.model.{_hf_module(layer, name)}"
        out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
        out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
    return out


def write_peft_adapter(model: nnx.Module, settings: LoRASettings, out_dir: str | os.PathLike, *,
                       base_model: str, revision: str | None = None) -> pathlib.Path:
    """Write a PEFT LoRA adapter directory for `model`'s adapters on the base at `base_model`.

    Written beside `out_dir` and renamed into place (a reader never sees half of it); an existing
    directory's other files (a tokenizer, a base copy) are kept.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": revision,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": list(settings.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    tensors = peft_tensors(model)
    if jax.process_index() != 0:
        return out_dir
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        save_file(tensors, os.path.join(work, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        pathlib.Path(work, ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            os.replace(os.path.join(work, name), out_dir / name)
    return out_dir


def base_state(model: nnx.Module) -> nnx.State:
    """The frozen base's parameters of a LoRA decoder (a plain decoder's state: no adapters, nothing merged)."""
    return nnx.state(model, lambda _, var: isinstance(var, nnx.Param) and not isinstance(var, LoRAParam))


def merged_state(model: nnx.Module) -> nnx.State:
    """The base parameters with every adapter folded in (`W + scale * A B`, in the base's dtype)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for layer, name, parent, attr in projections(model):
        proj = getattr(parent, attr)
        if isinstance(proj, LoRAProjection):
            path = ("layers", layer, "attn" if name in ATTENTION_MODULES else "mlp", name, "kernel")
            flat[path] = flat[path].replace(proj.weight().astype(proj.kernel.dtype))
    return nnx.from_flat_state([(p, v) for p, v in flat.items() if p[-1] not in ("lora_a", "lora_b")])


def export_merged(model: nnx.Module, cfg: ModelConfig, out_dir: str | os.PathLike, *,
                  tokenizer_dir: str | os.PathLike | None) -> pathlib.Path:
    """An HF checkpoint of the merged model: loads in transformers (and vLLM) with no PEFT at all."""
    return export_hf_checkpoint(merged_state(model), cfg, out_dir, tokenizer_dir=tokenizer_dir)


@jax.jit
def _digests(leaves: list[jax.Array]) -> jax.Array:
    """Two uint32 position-weighted checksums of each leaf's bits (on device: no gather, no transfer)."""
    out = []
    for x in leaves:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        out.append(jnp.stack([jnp.sum(bits * weights, dtype=jnp.uint32),
                              jnp.sum(bits ^ (bits >> 13), dtype=jnp.uint32)]))
    return jnp.stack(out)


def base_identity(base: nnx.State, *, path: str, revision: str) -> dict[str, Any]:
    """The frozen base a LoRA run trains on: where it came from and a hash of its weights' bits.

    The hash covers every base parameter's name, shape, dtype and contents (checksums taken on
    device, so a sharded 7B base is never gathered). A resumed run's adapters are only meaningful on
    the very base they were trained on: `check_base_identity` compares it.
    """
    flat = [(p, v) for p, v in nnx.to_flat_state(base) if isinstance(v, nnx.Param)]
    digests = np.asarray(jax.device_get(_digests([v.get_value() for _, v in flat])))
    h = hashlib.sha256()
    for (p, v), d in zip(flat, digests):
        h.update(f"{'.'.join(map(str, p))}:{v.shape}:{v.dtype}:{int(d[0])}:{int(d[1])};".encode())
    return {"path": path, "revision": revision, "sha256": h.hexdigest()}



BASE_DIR = "base_hf"  # WORKDIR/base_hf: a LoRA run's base when it exists nowhere else


def settle_base(rest: nnx.State, cfg: ModelConfig, workdir: str | os.PathLike, *, name_or_path: str, revision: str,
                tokenizer_dir: str | None, changed: bool) -> dict[str, Any]:
    """The identity of the base a LoRA run's RL starts from, writing it to WORKDIR/base_hf first when no
    checkpoint on disk holds it: the built-in tiny model, or any base the supervised warm-up trained
    (`changed`). A PEFT adapter and a resumed run both need the base by path."""
    if changed or not name_or_path:
        out = export_hf_checkpoint(rest, cfg, pathlib.Path(workdir) / BASE_DIR, tokenizer_dir=tokenizer_dir)
        name_or_path, revision = str(out.resolve()), None
    return base_identity(rest, path=name_or_path, revision=revision)


def restore_base(rest: nnx.State, saved: dict[str, Any], workdir: str | os.PathLike, dtype: str) -> None:
    """Check that `rest` holds the base `saved` (a checkpoint's identity) names, first reloading a base this
    run wrote to WORKDIR/base_hf; a different base is a one-line error (adapters mean nothing on it)."""
    from maxent_jax.errors import UserError
    from maxent_jax.model.hf_io import load_hf_checkpoint
    from maxent_jax.model.lora import write_base

    own = pathlib.Path(workdir) / BASE_DIR
    if saved["path"] == str(own.resolve()):
        if not own.is_dir():
            raise UserError(f"checkpoint's LoRA base {str(own)!r} is missing: it was written by this run's warm-up "
                            "and is needed to resume; restore it or start afresh with --config.checkpoint.resume=none")
        _, model = load_hf_checkpoint(own, dtype=dtype)
        write_base(rest, nnx.state(model, nnx.Param))
    current = base_identity(rest, path=saved["path"], revision=saved["revision"])
    if current["sha256"] != saved["sha256"]:
        raise UserError(f"checkpoint's LoRA adapters were trained on base {saved['path']!r} (sha256 "
                        f"{saved['sha256'][:12]}), but this run's base has sha256 {current['sha256'][:12]}: resume "
                        "on the same base (model.name_or_path, model.revision, lora.base_dtype) or with "
                        "--config.checkpoint.resume=none")
