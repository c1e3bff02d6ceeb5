"""`python -m maxent_jax.train --dry_run ...`: every check a run makes before compute, without loading weights.

A run can fail minutes in: after the model is downloaded and loaded, a reward name is unknown, a
dataset column is missing, the disk is too small. The dry run makes those checks first and in
seconds, then prints what the run would do (model, mesh, batch, steps, where outputs go):

- the config's rules (and the mesh against the device count),
- the workdir (a finished run, a resumable one, or another run's config: `maxent_jax.workdir`),
- reward names, the dataset (its columns, and the first prompts rendered with the tokenizer),
- the model's shapes (config.json only) and which of its dimensions the mesh cannot split,
- the rollout server's token file and URL when `rollout.backend='server'`,
- the W&B mode the run will use, and free disk for the checkpoints.

`dry_run(...)` returns the `Plan` (or raises UserError), so the launcher can call it too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import pathlib
import shutil
import urllib.error
import urllib.request
from typing import Any

import ml_collections

from maxent_jax import checkpoint_verify
from maxent_jax import config as config_lib
from maxent_jax import config_check
from maxent_jax import disk_space
from maxent_jax import workdir as workdir_lib
from maxent_jax.cli import REPO_ROOT
from maxent_jax.errors import UserError

# How a checkpoint compares with the parameters: params + Adam's two moments + the reference
# copy, twice over for the trainer's safety margin (Trainer's preflight uses the same factor).
_CHECKPOINT_PARAM_COPIES = 8
_PROMPTS_RENDERED = 4


@dataclasses.dataclass
class Plan:
    """What the run would do; `lines()` is the printed plan, `notes` are warnings that do not stop it."""

    model: str
    mesh: dict[str, int]
    devices: str
    prompts_per_step: int
    completions_per_step: int
    total_steps: int
    workdir: pathlib.Path
    workdir_state: str
    outputs: list[str]
    wandb: str
    disk: str
    notes: list[str] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        mesh = " x ".join(f"{axis} {size}" for axis, size in self.mesh.items())
        out = [
            "dry run: every check passed (nothing loaded or written)",
            f"  model:   {self.model}",
            f"  mesh:    {mesh} on {self.devices}",
            f"  batch:   {self.prompts_per_step} prompts x {self.completions_per_step // self.prompts_per_step} "
            f"completions = {self.completions_per_step} completions per optimizer step",
            f"  steps:   {self.total_steps}",
            f"  workdir: {self.workdir} ({self.workdir_state})",
            f"  outputs: {', '.join(self.outputs)}",
            f"  W&B:     {self.wandb}",
            f"  disk:    {self.disk}",
        ]
        return out + [f"  note: {n}" for n in self.notes]


def dry_run(config: ml_collections.ConfigDict, workdir: pathlib.Path, *, accept_changes: bool = False,
            device_count: int | None = None, device_kind: str | None = None) -> Plan:
    """Check everything a run checks before compute; raise UserError at the first problem.

    `device_count` defaults to this process's JAX devices; the launcher passes the job's.
    """
    from maxent_jax import optimizer as optimizer_lib  # imports jax: not at module load (the launcher's check)

    if device_count is None:
        import jax

        device_count, device_kind = jax.device_count(), jax.devices()[0].platform
    config_check.validate(config, device_count)
    shape = config_check.validate_mesh_shape(tuple(config.mesh.shape), device_count)
    mesh = dict(zip(config_lib.MESH_AXES, shape))

    existing, changes = workdir_lib.check_reuse(workdir, config, accept_changes=accept_changes)
    check_rewards(config)
    model_cfg, model_dir = model_shapes(config)
    tokenizer = _tokenizer(config, model_dir)
    rows = _first_prompts(config, tokenizer)
    notes = mesh_notes(model_cfg, mesh, config.mesh.rules)
    notes += _server_notes(config)

    t = config.train
    prompts = t.per_device_train_batch_size * mesh["data"] * mesh["fsdp"] * t.gradient_accumulation_steps
    group = config.rollout.num_generations + (config.info_seed.num_seeds if config.info_seed.enabled else 0)
    steps_per_epoch = max(1, rows // prompts)
    # The trainer's count: max_steps -1 means num_train_epochs passes.
    total_steps = optimizer_lib.total_steps(t.max_steps, steps_per_epoch, t.num_train_epochs)
    if 0 <= total_steps < t.max_steps:
        notes.append(f"the dataset's {rows} prompts give {steps_per_epoch} steps per epoch: the run stops after "
                     f"{total_steps} (train.num_train_epochs={t.num_train_epochs}), not train.max_steps={t.max_steps}")

    params = _param_count(model_cfg)
    itemsize = 2 if config.model.param_dtype == "bfloat16" else 4
    disk = check_disk(workdir, checkpoint_bytes=params * itemsize * _CHECKPOINT_PARAM_COPIES,
                      keep=config.checkpoint.save_total_limit,
                      extra_bytes=params * itemsize if config.checkpoint.export_final else 0)
    return Plan(
        model=_describe_model(config, model_cfg, params),
        mesh=mesh, devices=" ".join(filter(None, (str(device_count), device_kind, "device" + "s" * (device_count != 1)))),
        prompts_per_step=prompts, completions_per_step=prompts * group, total_steps=total_steps,
        workdir=workdir, workdir_state=_workdir_state(existing, changes),
        outputs=_outputs(config), wandb=wandb_plan(config), disk=disk, notes=notes)


# ---------------------------------------------------------------------------------------
# The checks


def check_rewards(config: ml_collections.ConfigDict) -> None:
    """Every reward name is registered (a run checks this before it loads the model too)."""
    from maxent_jax.rewards import available_rewards

    known = available_rewards()
    for field in ("reward_funcs", "eval_reward_funcs"):
        for name in config.rewards[field] or ():
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.4) or [n for n in known if name in n][:1]
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"config field rewards.{field} entry {name!r} is not a registered reward{hint}; "
                                f"choose from {', '.join(known)}")


def model_shapes(config: ml_collections.ConfigDict) -> tuple[Any, pathlib.Path | None]:
    """The model's ModelConfig from its config.json alone (no weights), and its directory (None = tiny)."""
    from maxent_jax.model.config import ModelConfig
    from maxent_jax.model.hf_io import read_hf_config

    m = config.model
    if not m.name_or_path:
        return ModelConfig.tiny(**dict(m.tiny), param_dtype=m.param_dtype, compute_dtype=m.compute_dtype), None
    path = pathlib.Path(m.name_or_path).expanduser()
    if not path.is_dir():
        path = _hub_files(m.name_or_path, m.revision)
    return ModelConfig.from_hf_config(read_hf_config(path), param_dtype=m.param_dtype,
                                      compute_dtype=m.compute_dtype), path


def _hub_files(name: str, revision: str) -> pathlib.Path:
    """A hub model's config and tokenizer files only (the run downloads the weights)."""
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(snapshot_download(repo_id=name, revision=revision,
                                              allow_patterns=["*.json", "*.txt", "*.jinja", "*.model"]))
    except Exception as err:  # network, auth, or missing repo: one line for the user
        raise UserError(f"config field model.name_or_path={name!r} is not a local directory and its config could not "
                        f"be fetched from the hub ({type(err).__name__}); expected a local directory or a hub id") from None


def _tokenizer(config: ml_collections.ConfigDict, model_dir: pathlib.Path | None) -> Any:
    from maxent_jax.data.tokenizer import build_offline_tokenizer
    from maxent_jax.run_setup import _load_tokenizer, cache_dir

    m = config.model
    if m.tokenizer_name_or_path:
        return _load_tokenizer(m.tokenizer_name_or_path)
    if model_dir is None:
        return _load_tokenizer(str(build_offline_tokenizer(cache_dir() / "tokenizer")))
    return _load_tokenizer(str(model_dir))


def _first_prompts(config: ml_collections.ConfigDict, tokenizer: Any) -> int:
    """Load the dataset (columns checked), render the first prompts; the number of training rows."""
    from maxent_jax.data.prompts import render_prompt
    from maxent_jax.data.sources import load_rows

    d = config.data
    rows = load_rows(d, config.seed)
    for row in rows["train"][:_PROMPTS_RENDERED]:
        render_prompt(tokenizer, row["problem"], system_prompt=d.system_prompt, chat_template=d.chat_template,
                      max_prompt_chars=d.max_prompt_chars, max_prompt_length=config.rollout.max_prompt_length)
    return len(rows["train"])


def mesh_notes(model_cfg: Any, mesh: dict[str, int], rule_overrides: Any) -> list[str]:
    """Model dimensions the mesh cannot split: the run replicates them (more memory per device)."""
    from maxent_jax.parallel.rules import resolve_rules

    table = dict(resolve_rules(list(rule_overrides)))
    dims = {"vocab": model_cfg.vocab_size, "embed": model_cfg.hidden_size, "heads": model_cfg.num_heads,
            "kv_heads": model_cfg.num_kv_heads, "mlp": model_cfg.intermediate_size}
    notes = []
    for name, size in dims.items():
        axes = [a for a in table.get(name, ()) if mesh[a] > 1]
        parts = math.prod(mesh[a] for a in axes)
        if axes and size % parts:
            notes.append(f"model dimension {name}={size} is not divisible by mesh {'+'.join(axes)}={parts}: "
                         "it is replicated on every device")
    return notes


def _server_notes(config: ml_collections.ConfigDict) -> list[str]:
    if config.rollout.backend != "server":
        return []
    v = config.vllm
    if v.token_file and not os.access(os.path.expanduser(v.token_file), os.R_OK):
        raise UserError(f"config field vllm.token_file={v.token_file!r} is not a readable file")
    health = v.url.rsplit("/", 1)[0] + "/health"
    try:
        urllib.request.urlopen(health, timeout=3).close()
        return [f"the rollout server answers at {health}"]
    except (urllib.error.URLError, OSError) as err:
        notes = [f"no rollout server answers at {health} yet ({getattr(err, 'reason', err)}): start it before the run "
                 "(python -m maxent_jax.serve, or the launcher does it)"]
    vllm_python = pathlib.Path(os.environ.get("VLLM_PYTHON") or REPO_ROOT / ".venv-vllm" / "bin" / "python")
    if not (vllm_python.exists() or shutil.which(str(vllm_python))):
        notes.append(f"no vLLM environment at {vllm_python} (make vllm-env builds it; VLLM_PYTHON names another): "
                     "a vLLM rollout server cannot be started from here")
    return notes


def wandb_plan(config: ml_collections.ConfigDict) -> str:
    """The W&B mode the run will use, and why; UserError when it needs wandb and wandb is missing."""
    from maxent_jax.telemetry import _has_wandb_api_key, wandb_mode

    lg = config.logging
    mode = wandb_mode(lg.wandb, lg.wandb_project, os.environ, has_api_key=_has_wandb_api_key(os.environ))
    if mode == "disabled":
        return "disabled"
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"config field logging.wandb={lg.wandb!r} means W&B mode {mode!r}, but wandb is not installed: "
                        "pip install wandb, or set logging.wandb=disabled") from None
    if mode == "offline":
        return "offline (a local run under the workdir; `wandb sync` uploads it later)"
    return f"online (project {lg.wandb_project or os.environ.get('WANDB_PROJECT') or 'maxent-jax'})"


def check_disk(workdir: pathlib.Path, *, checkpoint_bytes: int, keep: int, extra_bytes: int) -> str:
    """Free space where the workdir is (or will be) against the checkpoints it will keep."""
    here = workdir
    while not here.exists():
        here = here.parent
    if not os.access(here, os.W_OK):
        raise UserError(f"--workdir={workdir} is not writable ({here} is read-only for this user)")
    existing = len(checkpoint_verify.list_steps(workdir / checkpoint_verify.CHECKPOINTS_DIR))
    needed = disk_space.bytes_needed(checkpoint_bytes, keep=keep, existing=existing, extra_bytes=extra_bytes)
    free = shutil.disk_usage(here).free
    size = disk_space.format_bytes
    if free < needed:
        raise UserError(f"--workdir={workdir} has {size(free)} free but the run needs about {size(needed)} for its "
                        f"checkpoints (checkpoint.save_total_limit={keep}): free space or lower it")
    return f"{size(free)} free, about {size(needed)} needed"


# ---------------------------------------------------------------------------------------
# The plan's words


def _param_count(model_cfg: Any) -> int:
    """Parameters of the model, from an abstract (shape-only) instance."""
    import jax
    from flax import nnx

    from maxent_jax.model.decoder import Decoder

    abstract = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
    params = nnx.split(abstract, nnx.Param, ...)[1]
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params) if hasattr(leaf, "shape"))


def _describe_model(config: ml_collections.ConfigDict, cfg: Any, params: int) -> str:
    name = config.model.name_or_path or "the built-in tiny decoder"
    return (f"{name} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
            f"{params / 1e6:.2f}M parameters, {config.model.param_dtype})")


def _workdir_state(existing: workdir_lib.Existing | None, changes: list[workdir_lib.Change]) -> str:
    if existing is None:
        return "new run"
    if existing.finished and not changes:
        return f"holds this run, finished at step {existing.step}: the run would only say so"
    accepted = f", accepting {'; '.join(str(c) for c in changes)}" if changes else ""
    return f"resumes the run there ({existing.status} at step {existing.step}){accepted}"


def _outputs(config: ml_collections.ConfigDict) -> list[str]:
    c = config.checkpoint
    out = ["config.json", "metrics.jsonl"]
    if c.save_steps:
        keep = f", keeping {c.save_total_limit}" if c.save_total_limit else ""
        out.append(f"checkpoints/ every {c.save_steps} steps and at the end{keep}")
    if c.export_final:
        out.append("final_hf/ (transformers format)")
    if config.eval.do_eval and config.eval.eval_steps:
        out.append(f"eval every {config.eval.eval_steps} steps")
    return out


def print_plan(plan: Plan) -> None:
    print("\n".join(plan.lines()), flush=True)
