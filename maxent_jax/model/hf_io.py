"""Hugging Face checkpoints in and out: `config.json` + safetensors (single file or sharded with an index).

Loading builds the decoder abstractly (`nnx.eval_shape`, no random init), then reads one tensor at
a time, converts it to our layout (`mapping.py`) and places it: with shardings, straight onto its
devices via `jax.make_array_from_callback`, each device receiving only its slice, so no host ever
holds more than one full tensor beyond the safetensors memory map. Export streams tensors the
other way through `iter_hf_tensors`, which is also what the rollout weight push sends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from maxent_jax.errors import UserError
from maxent_jax.model.config import DTYPES, ModelConfig
from maxent_jax.model.decoder import Decoder
from maxent_jax.model.mapping import ignorable_hf_tensor, tensor_maps

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# A sharding rule: either a pytree shaped like the param state with a Sharding per leaf, or a
# function from a parameter's logical axis names (e.g. ('embed', 'mlp')) to its Sharding.
Shardings = Any | Callable[[tuple[str, ...]], jax.sharding.Sharding]


def resolve_checkpoint(path_or_id: str | os.PathLike, revision: str = "main") -> Path:
    """A local directory as is; otherwise a hub id at `revision` fetched with huggingface_hub (config,
    weights, tokenizer)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"checkpoint {str(path)!r} is a file; expected a directory with config.json")
        return path
    name = str(path_or_id)
    if not _HUB_ID.match(name):
        raise UserError(f"checkpoint {name!r} does not exist; "
                        "expected a local directory or a hub id like 'Qwen/Qwen2.5-0.5B'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as err:  # network, auth, or missing repo: one line for the user
        raise UserError(f"checkpoint {name!r} is not a local directory and could not be downloaded from the hub "
                        f"({type(err).__name__}); expected a local directory or a reachable hub id") from None


def read_hf_config(ckpt_dir: Path) -> dict[str, Any]:
    config_path = ckpt_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"checkpoint {str(ckpt_dir)!r} has no config.json; expected a Hugging Face model directory")
    return json.loads(config_path.read_text())


def _weight_files(ckpt_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: ckpt_dir / file for name, file in weight_map.items()}
    single = ckpt_dir / SINGLE_FILE
    if not single.is_file():
        raise UserError(f"checkpoint {str(ckpt_dir)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def _sharding_for(shardings: Shardings | None, mesh: jax.sharding.Mesh | None,
                  flat_shardings: dict | None, path: tuple, names: tuple[str, ...]) -> jax.sharding.Sharding | None:
    if shardings is None:
        return None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if callable(shardings):
        return shardings(names)
    leaf = flat_shardings[path]
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _flatten_shardings(shardings: Shardings | None) -> dict | None:
    if shardings is None or callable(shardings):
        return None
    is_leaf = lambda x: isinstance(x, (jax.sharding.Sharding, nnx.Variable))  # noqa: E731
    flat, _ = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_leaf)
    return {tuple(_key(k) for k in keys): leaf for keys, leaf in flat}


def _key(entry: Any) -> str | int:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def _place(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def load_hf_checkpoint(path_or_id: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                       shardings: Shardings | None = None, dtype: str | None = None,
                       **config_overrides: Any) -> tuple[ModelConfig, Decoder]:
    """(config, decoder) from an HF checkpoint directory (or hub id).

    dtype: parameter dtype ('float32' or 'bfloat16'; default float32, whatever the checkpoint stores).
    shardings: per-parameter placement (see `Shardings`); with only `mesh`, parameters are replicated
    over it; with neither, they land on the default device. `config_overrides` set other
    ModelConfig fields (compute_dtype, remat).
    """
    ckpt_dir = resolve_checkpoint(path_or_id)
    param_dtype = dtype or config_overrides.pop("param_dtype", "float32")
    if param_dtype not in DTYPES:
        raise UserError(f"dtype={param_dtype!r} is invalid; expected one of {', '.join(DTYPES)}")
    cfg = ModelConfig.from_hf_config(read_hf_config(ckpt_dir), param_dtype=param_dtype, **config_overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    variables = dict(nnx.to_flat_state(abstract))
    files = _weight_files(ckpt_dir)
    maps = tensor_maps(cfg)
    known = {m.hf_name for m in maps}
    unknown = sorted(n for n in files if n not in known and not ignorable_hf_tensor(n, cfg))
    if unknown:
        raise UserError(f"checkpoint {str(ckpt_dir)!r} has tensor {unknown[0]!r} (and {len(unknown) - 1} more) that "
                        f"a {cfg.family} decoder with this config.json does not use")
    flat_shardings = _flatten_shardings(shardings)
    loaded = []
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="numpy")) for file in set(files.values())}
        for m in maps:
            if m.hf_name not in files:
                raise UserError(f"checkpoint {str(ckpt_dir)!r} lacks tensor {m.hf_name!r} required by its config.json")
            var = variables[m.path]
            host = m.from_hf(handles[files[m.hf_name]].get_tensor(m.hf_name)).astype(var.dtype, copy=False)
            if host.shape != var.shape:
                raise UserError(f"checkpoint tensor {m.hf_name!r} has shape {host.shape} in our layout; "
                                f"config.json implies {var.shape}")
            sharding = _sharding_for(shardings, mesh, flat_shardings, m.path, var.get_metadata()["out_sharding"])
            loaded.append((m.path, var.replace(_place(host, sharding))))
            del host
    return cfg, nnx.merge(graphdef, nnx.from_flat_state(loaded))


def iter_hf_tensors(params: nnx.State | Decoder, cfg: ModelConfig, dtype: str | jnp.dtype | None = None, *,
                    native: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, host array in HF layout) one tensor at a time, in checkpoint order.

    The layout change and the cast run on device before the transfer, so the host holds one
    tensor at a time. Sharded parameters are gathered per tensor (across processes when needed).
    `native=True` keeps our own layout (the parameter's shape; a weight push to a server that
    holds our model): no relayout, and on CPU, without a cast, the host array is a view of the
    live parameter's buffer, not a copy.
    """
    state = nnx.state(params, nnx.Param) if isinstance(params, nnx.Module) else params
    flat = dict(nnx.to_flat_state(state))
    for m in tensor_maps(cfg):
        value = flat[m.path]
        value = value.get_value() if isinstance(value, nnx.Variable) else value
        if native:
            tensor = value if dtype is None or jnp.dtype(dtype) == value.dtype else value.astype(dtype)
        else:
            tensor = m.to_hf(value)
            if dtype is not None:
                tensor = tensor.astype(dtype)
        if isinstance(tensor, jax.Array) and not tensor.is_fully_addressable:
            tensor = multihost_utils.process_allgather(tensor, tiled=True)
        yield m.hf_name, np.ascontiguousarray(jax.device_get(tensor))


def export_hf_checkpoint(params: nnx.State | Decoder, cfg: ModelConfig, out_dir: str | os.PathLike, *,
                         tokenizer_dir: str | os.PathLike | None = None, dtype: str | None = None,
                         max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `config.json`, safetensors shards (+ index when more than one) and tokenizer files.

    The directory loads with `transformers.AutoModelForCausalLM.from_pretrained` and with
    `load_hf_checkpoint`. It is written next to `out_dir` and renamed into place, so a reader never
    sees a half-written checkpoint. dtype defaults to the parameters' own dtype.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        out_dtype = dtype or cfg.param_dtype
        _write_shards(iter_hf_tensors(params, cfg, out_dtype), work, max_shard_bytes)
        hf_config = {**cfg.to_hf_config(), "torch_dtype": str(jnp.dtype(out_dtype)), "dtype": str(jnp.dtype(out_dtype))}
        (work / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                source = Path(tokenizer_dir) / name
                if source.is_file():
                    shutil.copyfile(source, work / name)
        _swap_into_place(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out_dir


def _write_shards(tensors: Iterator[tuple[str, np.ndarray]], work: Path, max_shard_bytes: int) -> None:
    """Group tensors into files of at most `max_shard_bytes` (one tensor may exceed it alone)."""
    groups: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    pending_bytes, total_bytes = 0, 0
    temp_names: list[str] = []

    def flush() -> None:
        name = f"shard-{len(temp_names):05d}.tmp"
        save_file(pending, str(work / name), metadata={"format": "pt"})
        temp_names.append(name)
        groups.append(list(pending))
        pending.clear()

    for name, tensor in tensors:
        if pending and pending_bytes + tensor.nbytes > max_shard_bytes:
            flush()
            pending_bytes = 0
        pending[name] = tensor
        pending_bytes += tensor.nbytes
        total_bytes += tensor.nbytes
    flush()

    if len(temp_names) == 1:
        os.replace(work / temp_names[0], work / SINGLE_FILE)
        return
    count = len(temp_names)
    final = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map = {}
    for temp, name, members in zip(temp_names, final, groups):
        os.replace(work / temp, work / name)
        weight_map.update({member: name for member in members})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (work / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _swap_into_place(work: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / "previous")
        os.replace(work, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out_dir)

