"""The model a plan is for: its architecture from a shipped config.json, never its weights.

`model.name_or_path` is looked up, in order:
1. '' (the built-in tiny decoder): `model.tiny`, as `run_setup.load_policy` builds it;
2. a local directory holding a config.json (a downloaded or exported checkpoint);
3. the recipe model directories `configs/<model>/`, whose `base.py` names the hub id
   (`MODEL = "Qwen/Qwen2.5-7B"`) and whose `config.json` is that model's architecture as
   published, so planning needs no hub access.
"""

from __future__ import annotations

import json
import pathlib
import re

import ml_collections

from maxent_jax.errors import UserError
from maxent_jax.model.config import ModelConfig

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
_MODEL_LINE = re.compile(r'^MODEL = "([^"]+)"$', re.MULTILINE)


def shipped_config_path(name_or_path: str, configs_dir: pathlib.Path = CONFIGS_DIR) -> pathlib.Path | None:
    """configs/<model>/config.json of the recipe model whose base.py names `name_or_path`, if any."""
    for base in sorted(configs_dir.glob("*/base.py")):
        found = _MODEL_LINE.search(base.read_text())
        if found and found.group(1) == name_or_path and (base.parent / "config.json").is_file():
            return base.parent / "config.json"
    return None


def config_json_path(name_or_path: str) -> pathlib.Path:
    """Where the architecture of `model.name_or_path` is read from; a UserError when nowhere."""
    local = pathlib.Path(name_or_path).expanduser()
    if (local / "config.json").is_file():
        return local / "config.json"
    shipped = shipped_config_path(name_or_path)
    if shipped is not None:
        return shipped
    known = sorted(_MODEL_LINE.search(b.read_text()).group(1) for b in CONFIGS_DIR.glob("*/base.py")
                   if _MODEL_LINE.search(b.read_text()))
    raise UserError(f"model.name_or_path={name_or_path!r} has no config.json to plan from: give a local "
                    f"checkpoint directory or one of the shipped models ({', '.join(known)})")


def read_config_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable config.json ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object (a Hugging Face config.json)")
    return data


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The run's `ModelConfig` (architecture plus the config's dtypes, remat and attention), as the
    trainer would build it, without loading a tokenizer or weights."""
    m = config.model
    settings = dict(compute_dtype=m.compute_dtype, remat=m.remat, remat_policy=m.remat_policy, attention=m.attention)
    if not m.name_or_path:
        return ModelConfig.tiny(**dict(m.tiny), param_dtype=m.param_dtype, **settings)
    path = config_json_path(m.name_or_path)
    try:
        return ModelConfig.from_hf_config(read_config_json(path), param_dtype=m.param_dtype, **settings)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: missing or malformed field {err}; expected a Hugging Face config.json") from None


def divides(cfg: ModelConfig, shape: tuple[int, int, int]) -> bool:
    """Whether every sharded weight dimension divides by its mesh axes (embed by fsdp; vocab, heads
    and the MLP width by tensor)."""
    _, fsdp, tensor = shape
    return cfg.hidden_size % fsdp == 0 and all(d % tensor == 0 for d in (cfg.vocab_size, cfg.num_heads,
                                                                           cfg.intermediate_size))
