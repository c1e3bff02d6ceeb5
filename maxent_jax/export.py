"""The end of training: the policy as a Hugging Face directory (or a LoRA run's PEFT adapter and
merged model), with the controllers' state beside it so the directory alone can seed another run."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Mapping

import jax

FINAL_EXPORT_DIR = "final_hf"
CONTROLLER_STATE_FILE = "controller_state.json"


def export_final(
    params: Any,
    model_config: Any,
    workdir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None,
    controller_state: Mapping[str, Any] | None,
    dtype: str | None = None,
) -> pathlib.Path:
    """Write WORKDIR/final_hf: HF config, safetensors weights and tokenizer, plus controller_state.json.

    `params` / `model_config` are the policy's `nnx.State` (or Decoder) and `ModelConfig`;
    `controller_state` is the controllers' JSON (spec 8.4), stored beside the weights so the
    directory alone can seed another run. Transformers ignores the extra file. The weights
    directory is renamed into place whole; the JSON is then replaced atomically.
    """
    from maxent_jax.model.hf_io import export_hf_checkpoint

    out = export_hf_checkpoint(params, model_config, pathlib.Path(workdir) / FINAL_EXPORT_DIR,
                               tokenizer_dir=tokenizer_dir, dtype=dtype)
    if controller_state is not None and jax.process_index() == 0:
        tmp = out / (CONTROLLER_STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(dict(controller_state), indent=2) + "\n")
        os.replace(tmp, out / CONTROLLER_STATE_FILE)
    return out


MERGED_EXPORT_DIR = "final_merged_hf"


def export_adapter(model: Any, settings: Any, workdir: str | os.PathLike, *, base: Mapping[str, Any],
                   tokenizer_dir: str | os.PathLike | None, controller_state: Mapping[str, Any] | None) -> pathlib.Path:
    """A LoRA run's WORKDIR/final_hf: a PEFT adapter directory (`adapter_config.json`,
    `adapter_model.safetensors`) on the base `base` names, with the tokenizer and controller_state.json."""
    from maxent_jax.model.hf_io import TOKENIZER_FILES
    from maxent_jax.model.lora_io import write_peft_adapter

    out = write_peft_adapter(model, settings, pathlib.Path(workdir) / FINAL_EXPORT_DIR, base_model=base["path"],
                             revision=base["revision"])
    if jax.process_index() == 0:
        for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
            if (pathlib.Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(pathlib.Path(tokenizer_dir) / name, out / name)
        if controller_state is not None:
            tmp = out / (CONTROLLER_STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(dict(controller_state), indent=2) + "\n")
            os.replace(tmp, out / CONTROLLER_STATE_FILE)
    return out


def export_merged(model: Any, model_config: Any, workdir: str | os.PathLike, *,
                  tokenizer_dir: str | os.PathLike | None) -> pathlib.Path:
    """WORKDIR/final_merged_hf: a LoRA run's adapters folded into its base, as a plain HF checkpoint."""
    from maxent_jax.model.lora_io import export_merged as write_merged

    return write_merged(model, model_config, pathlib.Path(workdir) / MERGED_EXPORT_DIR, tokenizer_dir=tokenizer_dir)


def export_policy(policy: Any, params: Any, workdir: str | os.PathLike, *, lora_base: Mapping[str, Any] | None,
                  controller_state: Mapping[str, Any] | None) -> str:
    """The end of training's export of `policy` (a `run_setup.Policy`) with `params`: final_hf/, or a
    LoRA run's PEFT adapter there and its merged model in final_merged_hf/. Returns the line that
    says where they went."""
    if policy.lora is None:
        out = export_final(params, policy.model_cfg, workdir, tokenizer_dir=policy.tokenizer_dir,
                           controller_state=controller_state)
        return f"exported the final policy to {out} (transformers can load it)"
    from flax import nnx

    model = nnx.merge(policy.graphdef, params, policy.rest)
    out = export_adapter(model, policy.lora, workdir, base=lora_base, tokenizer_dir=policy.tokenizer_dir,
                         controller_state=controller_state)
    merged = export_merged(model, policy.model_cfg, workdir, tokenizer_dir=policy.tokenizer_dir)
    return (f"exported the LoRA adapter to {out} (peft can load it on {lora_base['path']}) and the "
            f"merged model to {merged}")
