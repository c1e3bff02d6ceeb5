"""The key tables of `--recipe` (recipes.py applies them): every flat-YAML key a user may write.

Each key falls in exactly one class:

* `FIELDS`: a reference key with a home in our config (`maxent_tau` -> `maxent.tau`);
* `TRL_KEYS`: a TRL `GRPOConfig` key (open-r1 / TRL recipes) with a home in our config; the
  reference's own spelling wins when a recipe has both (`gen_temperature` over `temperature`);
* `RULE_KEYS`: keys read by the rules in `recipes._rules` (KL aliases into `objective.beta`,
  vLLM routing, precision, eval/save strategies, resume, the LR schedule's kwargs, ...);
* `IGNORED`: meaningful for the reference's PyTorch stack (DeepSpeed, DataLoader workers,
  the Hub, TRL-trainer-only knobs) but not here; reported as a warning with its reason;
* `NEUTRAL_ONLY`: accepted only at the value that changes nothing (`load_in_4bit: false`);
* anything else is unknown.
"""

from __future__ import annotations

from typing import Any, Callable

_Q2 = "dropped by the reference's loader too (Q2)"
_TRL_ONLY = "read only by TRL's GRPOTrainer, which the reference's custom loop (and maxent-jax) replaces (Q1)"
_SHARDING = "DeepSpeed/Accelerate distribution setting; sharding comes from mesh.shape"
_DATALOADER = "PyTorch DataLoader setting; prompts are read and tokenized on the host without workers"
_HUB = "no Hub upload; checkpoint.export_final writes an HF directory you can upload"
_PPO = "PPO critic setting; GRPO has no value function, and the reference dropped it too (Q2)"
_UNUSED_SCRIPT = "declared by the reference but never read (Q6)"
_SERVER_SIDE = "rollout-server setting: pass it to the launcher (VLLM_MEM_UTIL, --dp, --tp), see docs/launch.md"


def floats(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in as_list(value))


def strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in as_list(value))


def as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def top_k(value: Any) -> int:
    """vLLM/TRL write 'no top-k' as -1 (or null); ours is 0."""
    return 0 if value is None or int(value) < 0 else int(value)


def url(value: Any) -> str:
    """The reference recipes write `.../generate/`; our server's route has no trailing slash."""
    return str(value).rstrip("/")


def scale_rewards(value: Any) -> str:
    """TRL takes `scale_rewards: true/false` (its older spelling) or 'group'/'batch'/'none'."""
    if isinstance(value, bool):
        return "group" if value else "none"
    return str(value)


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
    "lora_target_modules": ("lora.target_modules", strings),
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
    "gen_top_k": ("rollout.top_k", top_k),
    "vllm_top_k": ("rollout.top_k", top_k),
    "vllm_stop_sequences": ("rollout.stop_sequences", strings),
    # vLLM client
    "vllm_url": ("vllm.url", url),
    "vllm_server_timeout": ("vllm.server_timeout", None),
    "vllm_request_timeout": ("vllm.server_timeout", None),  # dropped by the reference (Q2); honoured here
    "vllm_max_completion_rounds": ("vllm.max_completion_rounds", None),
    "vllm_retry_sleep": ("vllm.retry_sleep", None),
    "vllm_return_logprobs": ("vllm.return_logprobs", None),
    "vllm_request_logprobs": ("vllm.return_logprobs", None),  # dropped by the reference (Q2); honoured here
    "vllm_client_tag_fail_fast": ("vllm.client_tag_fail_fast", None),
    # rewards
    "reward_funcs": ("rewards.reward_funcs", strings),
    "reward_weights": ("rewards.reward_weights", floats),
    "eval_reward_funcs": ("rewards.eval_reward_funcs", strings),
    "eval_reward_weights": ("rewards.eval_reward_weights", floats),
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

# TRL GRPOConfig key -> (our field, the reference keys that win over it, converter or None).
# TRL-trained users write these; the reference's custom loop ignored them (Q1) and read its own
# spelling, so a recipe with both keeps the reference's value and says so in a note.
TRL_KEYS: dict[str, tuple[str, tuple[str, ...], Callable[[Any], Any] | None]] = {
    "temperature": ("rollout.temperature", ("gen_temperature",), None),
    "top_p": ("rollout.top_p", ("gen_top_p",), None),
    "top_k": ("rollout.top_k", ("gen_top_k", "vllm_top_k"), top_k),
    "epsilon": ("objective.clip_range", ("clip_range",), None),
    "epsilon_high": ("objective.epsilon_high", (), None),
    "loss_type": ("objective.loss_type", (), None),
    "scale_rewards": ("objective.scale_rewards", (), scale_rewards),
    "importance_sampling_level": ("objective.importance_sampling_level", (), None),
}

# Keys read by the rules in `recipes._rules()` (several keys decide one field, or one key several).
RULE_KEYS = frozenset({
    "beta", "init_kl_coeff", "init_kl_coef", "kl_penalty_beta",
    "bf16", "fp16", "torch_dtype",
    "use_vllm", "vllm_mode", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
    "vllm_sync_weights", "vllm_sync_interval_steps",
    "do_eval", "eval_strategy", "evaluation_strategy", "eval_steps",
    "save_strategy", "save_steps",
    "report_to", "resume_from_checkpoint", "init_from_checkpoint", "output_dir",
    "max_steps", "optim", "dataset_mixture", "reference_model_revision", "lr_scheduler_kwargs",
    "use_bias_correction_kl",
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
    "delta": _TRL_ONLY,
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
    "min_p": (lambda v: v is None or float(v) == 0.0, "sampling has no min-p filter"),
    "repetition_penalty": (lambda v: v is None or float(v) == 1.0, "sampling has no repetition penalty"),
    "num_iterations": (lambda v: v is None or int(v) == 1,
                       "one optimizer step per generation batch (the reference's loop; TRL's mu=1)"),
    "data_seed": (lambda v: v is None, "the data order follows seed"),
    "eval_on_start": (lambda v: not v, "evaluation runs every eval_steps after an optimizer step"),
}

KL_ALIASES = ("beta", "init_kl_coeff", "init_kl_coef", "kl_penalty_beta")
