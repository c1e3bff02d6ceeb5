"""Reference-style flat YAML recipes mapped onto our config (`python -m maxent_jax.train --recipe=x.yaml`).

The reference reads a flat YAML file into its script, training and model dataclasses and
silently drops every key none of them declares (spec 13.1, quirk Q2), so a typo or a stale
key changes a run without a word. Here every key of a recipe falls in exactly one class:

* `FIELDS`: a reference key with a home in our config (`maxent_tau` -> `maxent.tau`);
* a key read by one of the rules below `FIELDS` (KL aliases into `objective.beta`, vLLM
  routing into `rollout.backend`/`vllm.url`, precision, eval/save strategies, resume, ...);
* `IGNORED`: a key that is meaningful for the reference's PyTorch stack (DeepSpeed,
  DataLoader workers, the Hub, TRL-trainer-only knobs) but not here; reported as a warning
  with its reason;
* `NEUTRAL_ONLY`: a key we accept only at the value that changes nothing (`load_in_4bit: false`);
* anything else is unknown: all unknown keys and refused values make ONE `UserError` line.

The result is a `Recipe`: field updates plus warnings; `apply()` writes it onto a config,
converting YAML scalars (PyYAML reads `1e-6` as a string) to each field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
from typing import Any, Callable, Iterable

import ml_collections
import yaml

from maxent_jax.errors import UserError

_Q2 = "dropped by the reference's loader too (Q2)"
_TRL_ONLY = "read only by TRL's GRPOTrainer, which the reference's custom loop (and maxent-jax) replaces (Q1)"
_SHARDING = "DeepSpeed/Accelerate distribution setting; sharding comes from mesh.shape"
_DATALOADER = "PyTorch DataLoader setting; prompts are read and tokenized on the host without workers"
_HUB = "no Hub upload; checkpoint.export_final writes an HF directory you can upload"
_PPO = "PPO critic setting; GRPO has no value function, and the reference dropped it too (Q2)"
_UNUSED_SCRIPT = "declared by the reference but never read (Q6)"
_SERVER_SIDE = "rollout-server setting: pass it to the launcher (VLLM_MEM_UTIL, --dp, --tp), see docs/launch.md"


def _floats(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in _as_list(value))


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in _as_list(value))


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _top_k(value: Any) -> int:
    """vLLM/TRL write 'no top-k' as -1 (or null); ours is 0."""
    return 0 if value is None or int(value) < 0 else int(value)


def _url(value: Any) -> str:
    """The reference recipes write `.../generate/`; our server's route has no trailing slash."""
    return str(value).rstrip("/")


# Reference key -> (our field, converter or None). Several keys may share a field; they must agree.
FIELDS: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "seed": ("seed", None),
    # model (TRL ModelConfig)
    "model_name_or_path": ("model.name_or_path", None),
    "model_revision": ("model.revision", None),
    "gradient_checkpointing": ("model.remat", None),
    # LoRA (TRL ModelConfig's PEFT keys)
    "use_peft": ("lora.enabled", None),
    "lora_r": ("lora.rank", None),
    "lora_alpha": ("lora.alpha", None),
    "lora_dropout": ("lora.dropout", None),
    "lora_target_modules": ("lora.target_modules", _strings),
    # data (script arguments)
    "dataset_name": ("data.dataset_name", None),
    "dataset_config": ("data.dataset_config", None),
    "dataset_train_split": ("data.dataset_train_split", None),
    "dataset_test_split": ("data.dataset_test_split", None),
    "dataset_prompt_column": ("data.dataset_prompt_column", None),
    "dataset_solution_column": ("data.dataset_solution_column", None),
    "system_prompt": ("data.system_prompt", None),
    "chat_template": ("data.chat_template", None),
    "eval_dataset_name": ("data.eval_dataset_name", None),
    "eval_dataset_config": ("data.eval_dataset_config", None),
    "eval_dataset_split": ("data.eval_dataset_split", None),
    "eval_dataset_prompt_column": ("data.eval_dataset_prompt_column", None),
    "eval_dataset_solution_column": ("data.eval_dataset_solution_column", None),
    # generation
    "num_generations": ("rollout.num_generations", None),
    "max_prompt_length": ("rollout.max_prompt_length", None),
    "max_completion_length": ("rollout.max_completion_length", None),
    "gen_temperature": ("rollout.temperature", None),
    "gen_top_p": ("rollout.top_p", None),
    # The reference never sent top-k (Q3: gen_top_k was dropped, vllm_top_k never read);
    # we honour either.
    "gen_top_k": ("rollout.top_k", _top_k),
    "vllm_top_k": ("rollout.top_k", _top_k),
    "vllm_stop_sequences": ("rollout.stop_sequences", _strings),
    # vLLM client
    "vllm_url": ("vllm.url", _url),
    "vllm_server_timeout": ("vllm.server_timeout", None),
    "vllm_request_timeout": ("vllm.server_timeout", None),  # dropped by the reference (Q2); honoured here
    "vllm_max_completion_rounds": ("vllm.max_completion_rounds", None),
    "vllm_retry_sleep": ("vllm.retry_sleep", None),
    "vllm_return_logprobs": ("vllm.return_logprobs", None),
    "vllm_request_logprobs": ("vllm.return_logprobs", None),  # dropped by the reference (Q2); honoured here
    "vllm_client_tag_fail_fast": ("vllm.client_tag_fail_fast", None),
    # rewards
    "reward_funcs": ("rewards.reward_funcs", _strings),
    "reward_weights": ("rewards.reward_weights", _floats),
    "eval_reward_funcs": ("rewards.eval_reward_funcs", _strings),
    "eval_reward_weights": ("rewards.eval_reward_weights", _floats),
    # objective
    "train_grpo_objective": ("objective.train_grpo_objective", None),
    "clip_range": ("objective.clip_range", None),
    # MaxEnt
    "maxent_tau": ("maxent.tau", None),
    "maxent_q_temperature": ("maxent.q_temperature", None),
    "maxent_q_epsilon": ("maxent.q_epsilon", None),
    "maxent_length_normalize_ref": ("maxent.length_normalize_ref", None),
    "maxent_reference_logprobs_source": ("maxent.reference_logprobs_source", None),
    "maxent_share_reference_model": ("maxent.share_reference_model", None),
    "reference_model_name_or_path": ("maxent.reference_model_name_or_path", None),
    "maxent_target_weight_entropy": ("maxent.target_weight_entropy", None),
    "maxent_target_weight_entropy_start": ("maxent.target_weight_entropy_start", None),
    "maxent_target_weight_entropy_final": ("maxent.target_weight_entropy_final", None),
    "maxent_target_weight_entropy_horizon": ("maxent.target_weight_entropy_horizon", None),
    "maxent_tau_lr": ("maxent.tau_lr", None),
    "maxent_tau_min": ("maxent.tau_min", None),
    "maxent_tau_max": ("maxent.tau_max", None),
    "maxent_tau_warmup_steps": ("maxent.tau_warmup_steps", None),
    "maxent_use_clip_objective": ("maxent.use_clip_objective", None),
    "maxent_clip_objective_coef": ("maxent.clip_objective_coef", None),
    "maxent_clip_adv_baseline": ("maxent.clip_adv_baseline", None),
    # controllers
    "kl_target": ("controllers.kl_target", None),
    "kl_horizon": ("controllers.kl_horizon", None),
    "kl_ctl_step_size": ("controllers.kl_ctl_step_size", None),
    "controller_overwrite_from_config": ("controllers.overwrite_from_config", None),
    "controller_meta_enabled": ("controller_meta.enabled", None),
    "controller_meta_method": ("controller_meta.method", None),
    "controller_meta_lr": ("controller_meta.lr", None),
    "controller_meta_tau_lr": ("controller_meta.tau_lr", None),
    "controller_meta_beta_lr": ("controller_meta.beta_lr", None),
    "controller_meta_beta_grad_clip": ("controller_meta.beta_grad_clip", None),
    "controller_meta_update_interval": ("controller_meta.update_interval", None),
    "controller_meta_objective": ("controller_meta.objective", None),
    "controller_meta_analytic_steps": ("controller_meta.analytic_steps", None),
    "controller_meta_optimizer": ("controller_meta.optimizer", None),
    "controller_meta_truncation_steps": ("controller_meta.truncation_steps", None),
    "controller_meta_use_hessian": ("controller_meta.use_hessian", None),
    # InfoSeed
    "info_seed_enabled": ("info_seed.enabled", None),
    "info_seed_num_seeds": ("info_seed.num_seeds", None),
    "info_seed_lambda": ("info_seed.lambda_", None),
    "info_seed_temperature": ("info_seed.temperature", None),
    "info_seed_alpha_entropy": ("info_seed.alpha_entropy", None),
    "info_seed_prompt_template": ("info_seed.prompt_template", None),
    "info_seed_loss_type": ("info_seed.loss_type", None),
    "info_seed_pooling": ("info_seed.pooling", None),
    # optimizer and schedule
    "learning_rate": ("optim.learning_rate", None),
    "adam_beta1": ("optim.adam_beta1", None),
    "adam_beta2": ("optim.adam_beta2", None),
    "adam_epsilon": ("optim.adam_epsilon", None),
    "weight_decay": ("optim.weight_decay", None),
    "max_grad_norm": ("optim.max_grad_norm", None),
    "lr_scheduler_type": ("optim.lr_scheduler_type", None),
    "warmup_steps": ("optim.warmup_steps", None),
    "warmup_ratio": ("optim.warmup_ratio", None),
    # loop
    "num_train_epochs": ("train.num_train_epochs", None),
    "per_device_train_batch_size": ("train.per_device_train_batch_size", None),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", None),
    "save_total_limit": ("checkpoint.save_total_limit", None),
    # logging and eval
    "logging_steps": ("logging.logging_steps", None),
    "log_completions": ("logging.log_completions", None),
    "wandb_entity": ("logging.wandb_entity", None),
    "wandb_project": ("logging.wandb_project", None),
    "wandb_run_group": ("logging.wandb_run_group", None),
    "run_name": ("logging.run_name", None),
    "per_device_eval_batch_size": ("eval.per_device_eval_batch_size", None),
}

# Keys read by the rules in `_rules()` (several keys decide one field, or one key several).
RULE_KEYS = frozenset({
    "beta", "init_kl_coeff", "init_kl_coef", "kl_penalty_beta",
    "bf16", "fp16", "torch_dtype",
    "use_vllm", "vllm_mode", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
    "vllm_sync_weights", "vllm_sync_interval_steps",
    "do_eval", "eval_strategy", "evaluation_strategy", "eval_steps",
    "save_strategy", "save_steps",
    "report_to", "resume_from_checkpoint", "init_from_checkpoint", "output_dir",
    "max_steps", "optim", "dataset_mixture", "reference_model_revision",
})

# Known keys that mean nothing in maxent-jax, with the reason (reported as a warning).
IGNORED: dict[str, str] = {
    "maxent_logprob_chunk_size": "scoring memory is bounded by model.logprob_chunk_size (positions per vocabulary block)",
    "maxent_score_tail_tokens": "completions are always scored whole, with their prompt as context (the tail window "
                                "dropped the context, Q7)",
    "maxent_allow_empty_weight_fallback": "masked group math never yields an empty weight vector",
    "force_custom_loop": "maxent-jax has one training loop for every objective",
    "attn_implementation": "PyTorch kernels do not apply; model.attention picks 'blocked', 'dot_product' or 'cudnn' "
                           "(flash attention on a GPU)",
    "trust_remote_code": "models are built from maxent-jax's own Flax code",
    "gradient_checkpointing_kwargs": "re-entrancy is a PyTorch notion; model.remat covers checkpointing",
    "torch_compile": "XLA compiles every step",
    "overwrite_output_dir": "a workdir resumes from its latest checkpoint; nothing is deleted (the reference "
                            "deleted its controller state, Q19)",
    "logging_dir": "metrics go to WORKDIR and W&B",
    "logging_first_step": "every logged step is an optimizer step; there is no step-0 record",
    "log_level": "use absl's --verbosity",
    "log_like_grpo": "metrics are always means over all hosts",
    "num_completions_to_print": "logging.log_completions writes completions to W&B and JSONL",
    "wandb_log_unique_prompts": "logging.log_completions writes completions to W&B and JSONL",
    "benchmarks": "run python -m maxent_jax.evaluate on a checkpoint",
    "callbacks": "HF Trainer callbacks have no counterpart",
    "maxent_allow_stale_reference_logprobs": "reference log-probs come from one forward per batch; nothing is stale",
    "maxent_score_slice_prefetch": "throughput knob of the reference's PyTorch scorer",
    "maxent_prompt_cache_size": "throughput knob of the reference's PyTorch scorer",
    "maxent_clip_range": "never read by the reference either (Q13)",
    "vllm_backfill_with_model": "no local back-fill: failed requests are retried, then fail with a clear error",
    "vllm_logprob_fail_after": "missing server log-probs are an error at once",
    "vllm_logprob_fallback": "missing server log-probs are an error at once",
    "vllm_best_of": "never read by the reference (Q3); the server samples n independent completions",
    "vllm_frequency_penalty": "never read by the reference (Q3)",
    "vllm_presence_penalty": "never read by the reference (Q3)",
    "gen_best_of": _Q2 + "; the server samples n independent completions",
    "vllm_group_port": "weights reach the server over HTTP (POST /weights), not an NCCL group",
    "vllm_gpu_memory_utilization": _SERVER_SIDE,
    "vllm_tensor_parallel_size": _SERVER_SIDE,
    "vllm_enable_sleep_mode": _SERVER_SIDE,
    "vllm_guided_decoding_regex": _TRL_ONLY,
    "disable_distributed_sampler": _Q2 + "; each host process reads its own slice of every global batch",
    # Both spellings occur in the shipped reference recipes; neither is a field, so the reference
    # clipped with clip_range (default 0.2) wherever clip_range itself was absent.
    "ppo_clip_range": _Q2 + "; the loop clips with clip_range (default 0.2): set clip_range",
    "ppo_ppo_clip_range": _Q2 + "; the loop clips with clip_range (default 0.2): set clip_range",
    "dataloader_num_workers": _DATALOADER,
    "dataloader_pin_memory": _DATALOADER,
    "dataloader_prefetch_factor": _DATALOADER,
    "dataloader_persistent_workers": _DATALOADER,
    "dataloader_drop_last": _DATALOADER,
    "remove_unused_columns": _DATALOADER,
    "deepspeed": _SHARDING,
    "zero3_save_16bit_model": _SHARDING,
    "fsdp": _SHARDING,
    "fsdp_config": _SHARDING,
    "accelerator_config": _SHARDING,
    "ddp_find_unused_parameters": _SHARDING,
    "ddp_timeout": _SHARDING,
    "ddp_backend": _SHARDING,
    "local_rank": _SHARDING,
    "ds3_gather_for_generation": _SHARDING,
    "push_to_hub": _HUB,
    "hub_model_id": _HUB,
    "hub_strategy": _HUB,
    "hub_private_repo": _HUB,
    "hub_token": _HUB,
    "hub_model_revision": _HUB,
    "push_to_hub_revision": _HUB,
    "overwrite_hub_revision": _HUB,
    "save_safetensors": "checkpoints are Orbax; checkpoint.export_final writes safetensors",
    "save_only_model": "checkpoints always hold params, optimizer, controllers and data position",
    "logging_strategy": "metrics are logged every logging.logging_steps optimizer steps",
    "temperature": _TRL_ONLY + "; the loop samples with gen_temperature",
    "top_p": _TRL_ONLY + "; the loop samples with gen_top_p",
    "top_k": _TRL_ONLY + "; the loop samples with gen_top_k",
    "min_p": _TRL_ONLY,
    "repetition_penalty": _TRL_ONLY,
    "epsilon": _TRL_ONLY + "; the loop clips with clip_range",
    "epsilon_high": _TRL_ONLY,
    "delta": _TRL_ONLY,
    "loss_type": _TRL_ONLY,
    "scale_rewards": _TRL_ONLY,
    "num_iterations": _TRL_ONLY,
    "mask_truncated_completions": _TRL_ONLY,
    "sync_ref_model": _TRL_ONLY,
    "ref_model_mixup_alpha": _TRL_ONLY,
    "ref_model_sync_steps": _TRL_ONLY,
    "use_liger_loss": _TRL_ONLY,
    "cache_implementation": _TRL_ONLY,
    "generation_batch_size": _TRL_ONLY,
    "steps_per_generation": _TRL_ONLY,
    "shuffle_dataset": _TRL_ONLY,
    "model_init_kwargs": _TRL_ONLY,
    "disable_dropout": "the decoder has no dropout",
    "lora_modules_to_save": "only the LoRA adapters train; every other module stays frozen",
    "lora_task_type": "the adapters are always for a causal LM (CAUSAL_LM)",
    "bnb_4bit_quant_type": "bitsandbytes quantisation is not implemented",
    "use_bnb_nested_quant": "bitsandbytes quantisation is not implemented",
    "vf_coef": _PPO, "advantage_normalization": _PPO, "horizon": _PPO, "reward_normalization": _PPO,
    "gamma": _PPO, "gae_lambda": _PPO, "log_grad_norm_after_clip": _PPO, "log_kl_per_token": _PPO,
    "reward_clip": _PPO, "advantage_clip": _PPO, "clip_range_vf": _PPO,
    "cosine_min_value_wrong": _UNUSED_SCRIPT, "cosine_max_value_wrong": _UNUSED_SCRIPT,
    "cosine_min_value_correct": _UNUSED_SCRIPT, "cosine_max_value_correct": _UNUSED_SCRIPT,
    "cosine_max_len": _UNUSED_SCRIPT, "repetition_n_grams": _UNUSED_SCRIPT,
    "repetition_max_penalty": _UNUSED_SCRIPT, "max_completion_len": _UNUSED_SCRIPT,
    "soft_punish_cache": _UNUSED_SCRIPT, "span_kl_target": _UNUSED_SCRIPT, "span_kl_beta0": _UNUSED_SCRIPT,
    "span_kl_horizon": _UNUSED_SCRIPT,
}

# Known keys accepted only at a value that changes nothing: key -> (neutral?, why other values fail).
NEUTRAL_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "load_in_8bit": (lambda v: not v, "bitsandbytes quantisation is not implemented"),
    "load_in_4bit": (lambda v: not v, "bitsandbytes quantisation is not implemented"),
    "lr_scheduler_kwargs": (lambda v: not v, "schedules take no extra arguments (cosine/linear/constant)"),
    "data_seed": (lambda v: v is None, "the data order follows seed"),
    "eval_on_start": (lambda v: not v, "evaluation runs every eval_steps after an optimizer step"),
}

KL_ALIASES = ("beta", "init_kl_coeff", "init_kl_coef", "kl_penalty_beta")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A translated recipe: `updates` maps our field -> (value, the recipe key(s) it came from)."""

    source: str
    updates: dict[str, tuple[Any, str]]
    ignored: tuple[tuple[str, str], ...]  # (key, reason)
    notes: tuple[str, ...]  # values we changed or interpreted, and why
    # Fields the recipe leaves without a usable value: field -> the error if no override sets it.
    unresolved: dict[str, str] = dataclasses.field(default_factory=dict)

    def check_overrides(self, overridden: Iterable[str]) -> None:
        """Raise the first unresolved field's error unless a --config override sets it."""
        missing = [message for field, message in self.unresolved.items() if field not in set(overridden)]
        if missing:
            raise UserError(f"recipe {self.source}: " + "; ".join(missing))

    def warnings(self) -> list[str]:
        """Lines to show the user: every ignored key with its reason, then every note."""
        lines = [f"recipe {self.source}: ignored {k!r}: {why}" for k, why in self.ignored]
        return lines + [f"recipe {self.source}: {note}" for note in self.notes]


def load(path: str | pathlib.Path) -> Recipe:
    """Read a flat YAML recipe file and translate it; every problem is one UserError line."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"--recipe={path}: cannot read it ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"--recipe={path}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--recipe={path}: expected a flat mapping of reference keys, got a {type(data).__name__}")
    return translate(data, source=str(path))


def translate(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Map a flat reference recipe onto our field paths (pure: no config is touched)."""
    known = FIELDS.keys() | RULE_KEYS | IGNORED.keys() | NEUTRAL_ONLY.keys()
    nested = sorted(str(k) for k, v in data.items() if k not in known and isinstance(v, dict))
    unknown = sorted(str(k) for k, v in data.items() if k not in known and not isinstance(v, dict))
    refused = [
        f"{k}={data[k]!r} ({why})" for k, (neutral, why) in NEUTRAL_ONLY.items() if k in data and not neutral(data[k])
    ]
    problems = []
    if unknown:
        problems.append("unknown keys: " + ", ".join(_with_suggestion(k, known) for k in unknown))
    if refused:
        problems.append("unsupported values: " + ", ".join(refused))
    if nested:
        problems.append("nested sections (a flat recipe has none): " + ", ".join(nested))
    if problems:
        raise UserError(f"recipe {source}: " + "; ".join(problems) + " (docs/recipes.md lists every key)")

    updates: dict[str, tuple[Any, str]] = {}
    for key, (field, convert) in FIELDS.items():
        if key in data and data[key] is not None:
            value = data[key]
            if convert is not None:
                try:
                    value = convert(value)
                except (TypeError, ValueError):
                    raise UserError(f"recipe {source}: key {key}={value!r} is invalid for {field}") from None
            _put(updates, field, value, key, source)
    notes: list[str] = []
    unresolved: dict[str, str] = {}
    _rules(data, updates, notes, unresolved, source)
    ignored = tuple((k, IGNORED[k]) for k in data if k in IGNORED)
    return Recipe(source=source, updates=updates, ignored=ignored, notes=tuple(notes), unresolved=unresolved)


def _with_suggestion(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
    return f"{key} (did you mean {close[0]}?)" if close else key


def _put(updates: dict[str, tuple[Any, str]], field: str, value: Any, key: str, source: str) -> None:
    """Record `field = value`; two recipe keys that set one field must agree."""
    if field in updates and updates[field][0] != value:
        other_value, other_key = updates[field]
        raise UserError(
            f"recipe {source}: keys {other_key}={other_value!r} and {key}={value!r} both set {field}; "
            "keep one of them or give them the same value"
        )
    updates[field] = (value, updates[field][1] + "+" + key if field in updates else key)


def _rules(data: dict[str, Any], updates: dict, notes: list[str], unresolved: dict[str, str], source: str) -> None:
    """The keys that need more than a rename (RULE_KEYS)."""
    def put(field: str, value: Any, key: str) -> None:
        _put(updates, field, value, key, source)

    def refuse(message: str) -> UserError:
        return UserError(f"recipe {source}: {message}")

    # KL coefficient: every alias lands in objective.beta (spec 13.1).
    for key in KL_ALIASES:
        if data.get(key) is not None:
            put("objective.beta", data[key], key)

    # Precision: bf16 parameters and compute whenever the recipe asks for 16-bit.
    dtype = str(data.get("torch_dtype") or "").lower()
    if data.get("bf16") or data.get("fp16") or dtype in ("bfloat16", "float16", "bf16", "fp16"):
        put("model.param_dtype", "bfloat16", "bf16/fp16/torch_dtype")
        put("model.compute_dtype", "bfloat16", "bf16/fp16/torch_dtype")
        if data.get("fp16") or (dtype in ("float16", "fp16") and not data.get("bf16")):
            notes.append("float16 requested: maxent-jax uses bfloat16 (same memory, no loss scaling needed)")
    elif dtype in ("float32", "fp32"):
        put("model.param_dtype", "float32", "torch_dtype")
        put("model.compute_dtype", "float32", "torch_dtype")

    # Rollouts: vLLM server mode -> the HTTP rollout server; colocate or no vLLM -> in-process sampler.
    if data.get("vllm_server_base_url"):
        put("vllm.url", _url(data["vllm_server_base_url"]) + "/generate", "vllm_server_base_url")
    elif data.get("vllm_server_host") and "vllm_url" not in data:
        port = data.get("vllm_server_port") or 8000
        put("vllm.url", f"http://{data['vllm_server_host']}:{port}/generate", "vllm_server_host/port")
    if "use_vllm" in data:
        mode = data.get("vllm_mode") or "server"
        if data["use_vllm"] and mode == "server":
            put("rollout.backend", "server", "use_vllm+vllm_mode")
        elif data["use_vllm"] and mode == "colocate":
            put("rollout.backend", "sampler", "use_vllm+vllm_mode")
            notes.append("vllm_mode=colocate: rollouts come from the in-process JAX sampler on the training mesh")
        elif data["use_vllm"]:
            raise refuse(f"key vllm_mode={mode!r} is invalid: 'server' or 'colocate'")
        else:
            put("rollout.backend", "sampler", "use_vllm")

    # Weight sync: the reference never pushed weights unless vllm_sync_weights was true (Q5).
    if data.get("vllm_sync_weights"):
        interval = data.get("vllm_sync_interval_steps")
        put("rollout.sync_interval_steps", 1 if interval is None else interval, "vllm_sync_interval_steps")
    elif updates.get("rollout.backend", ("",))[0] == "server":
        notes.append(
            "vllm_sync_weights is off: the reference then sampled every rollout from the initial weights (Q5); "
            "maxent-jax pushes weights every rollout.sync_interval_steps (default 1); "
            "pass --config.rollout.sync_interval_steps=0 to reproduce the reference"
        )

    # Evaluation: enabled by strategy 'steps', or by do_eval without a strategy (spec 10).
    strategies = {k: data[k] for k in ("eval_strategy", "evaluation_strategy") if data.get(k) is not None}
    if len(set(map(str, strategies.values()))) > 1:
        raise refuse(f"keys eval_strategy and evaluation_strategy disagree ({strategies}); keep one")
    strategy = str(next(iter(strategies.values()))) if strategies else None
    if strategy == "epoch":
        notes.append("eval strategy 'epoch' is unsupported (as in the reference): evaluation is off")
    if strategy is not None and strategy not in ("no", "steps", "epoch"):
        raise refuse(f"key eval_strategy={strategy!r} is invalid: 'no', 'steps' or 'epoch'")
    do_eval = strategy == "steps" or (strategy is None and bool(data.get("do_eval")))
    put("eval.do_eval", do_eval, "do_eval/eval_strategy")
    eval_steps = data.get("eval_steps")
    if eval_steps is None and do_eval and data.get("logging_steps") is not None:
        eval_steps = data["logging_steps"]  # the reference falls back to logging_steps
    if eval_steps is not None:
        put("eval.eval_steps", eval_steps, "eval_steps")

    # Checkpoints: only the 'steps' strategy saves (spec 11).
    save_strategy = data.get("save_strategy")
    if save_strategy is not None and str(save_strategy) != "steps":
        put("checkpoint.save_steps", 0, "save_strategy")
        notes.append(f"save_strategy={save_strategy!r}: no periodic checkpoints (only 'steps' saves)")
    elif data.get("save_steps") is not None:
        put("checkpoint.save_steps", data["save_steps"], "save_steps")

    report_to = data.get("report_to")
    if report_to is not None:
        targets = {str(t) for t in _as_list(report_to)}
        put("logging.wandb", "auto" if targets & {"wandb", "all"} else "disabled", "report_to")

    # Resume: init_from_checkpoint wins over resume_from_checkpoint (spec 11).
    resume = data.get("init_from_checkpoint") or data.get("resume_from_checkpoint")
    if resume is not None:
        put("checkpoint.resume", "latest" if resume is True else "none" if resume is False else str(resume),
            "init_from_checkpoint/resume_from_checkpoint")
    if data.get("output_dir"):
        notes.append(f"output_dir={data['output_dir']!r}: pass --workdir={data['output_dir']} to write there")

    max_steps = data.get("max_steps")
    if max_steps is not None:
        try:
            max_steps = _coerce(max_steps, int)
        except (TypeError, ValueError):
            raise refuse(f"key max_steps={max_steps!r} is invalid: an integer number of optimizer steps") from None
        if max_steps <= 0:
            unresolved["train.max_steps"] = (
                f"key max_steps={max_steps!r} (train by epochs) is unsupported: give the number of optimizer "
                "steps with --config.train.max_steps=N (the reference counted epochs in micro-batches, Q15)"
            )
        else:
            put("train.max_steps", max_steps, "max_steps")

    optim = data.get("optim")
    if optim is not None and (not str(optim).startswith("adamw") or any(s in str(optim) for s in ("8bit", "bnb"))):
        raise refuse(f"key optim={optim!r} is unsupported: maxent-jax uses optax AdamW (any adamw_torch* value)")

    mixture = data.get("dataset_mixture")
    if mixture is not None:
        put("data.dataset_mixture", _mixture_json(mixture, refuse), "dataset_mixture")

    ref_revision = data.get("reference_model_revision")
    if ref_revision is not None and str(ref_revision) != str(data.get("model_revision", "main")):
        raise refuse(
            f"key reference_model_revision={ref_revision!r} is unsupported: the reference model loads at "
            "model_revision"
        )

    # The reference's InfoSeed entry point forces the GRPO objective; its shipped recipe omits
    # train_grpo_objective (Q27).
    if data.get("info_seed_enabled") and "train_grpo_objective" not in data:
        put("objective.train_grpo_objective", True, "info_seed_enabled")
        notes.append("info_seed_enabled without train_grpo_objective: using the GRPO objective, "
                     "as the reference's InfoSeed entry point does (Q27)")


def _mixture_json(mixture: Any, refuse: Callable[[str], UserError]) -> str:
    """The reference's `{datasets: [...], seed, test_split_size}` mapping -> our JSON list of sources."""
    if isinstance(mixture, str):
        return mixture
    if isinstance(mixture, dict):
        if mixture.get("test_split_size") not in (None, 0):
            raise refuse("key dataset_mixture.test_split_size is unsupported: name an eval_dataset_name instead")
        mixture = mixture.get("datasets")
    if not isinstance(mixture, list) or not mixture:
        raise refuse("key dataset_mixture is invalid: a mapping with a non-empty 'datasets' list")
    return json.dumps(mixture)


def apply(config: ml_collections.ConfigDict, recipe: Recipe) -> ml_collections.ConfigDict:
    """Write the recipe's values onto `config` (in place), converted to each field's type."""
    for field, (value, key) in recipe.updates.items():
        *parents, leaf = field.split(".")
        node = config
        for part in parents:
            node = node[part]
        kind = node.get_type(leaf)
        try:
            node[leaf] = _coerce(value, kind)
        except (TypeError, ValueError):
            raise UserError(
                f"recipe {recipe.source}: key {key}={value!r} cannot set {field}: expected {kind.__name__}"
            ) from None
    return config


def _coerce(value: Any, kind: type) -> Any:
    """YAML scalars -> the field's type (PyYAML reads '1e-6' as a string)."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise TypeError(value)
    if kind is float and not isinstance(value, bool):
        return float(value)
    if kind is int and not isinstance(value, bool):
        number = float(value)
        if number != int(number):
            raise ValueError(value)
        return int(number)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if kind is tuple and isinstance(value, list):
        return tuple(value)
    raise TypeError(value)
