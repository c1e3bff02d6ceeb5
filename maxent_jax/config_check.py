"""Validation of a configuration: one line naming the field, the bad value and what is valid.

`validate(config)` runs before any compute (the entry points, `--dry_run`, recipe loading); a
user's mistake raises `UserError` here rather than a traceback an hour into a run. Per-field
rules live in one table (`_FIELD_RULES`, also used by `field_problems` to report every bad
recipe key at once); rules across fields follow in `validate`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Iterable

import ml_collections

from maxent_jax.config import (
    MESH_AXES,
    OBJECTIVE_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    SCALE_REWARDS,
    NEGATIVE_ADV_RULES,
    KL_ESTIMATORS,
    SAMPLER_CORRECTIONS,
    SEED_ENTROPY_MODES,
    REFERENCE_SOURCES,
    META_METHODS,
    META_OPTIMIZERS,
    LR_SCHEDULES,
    ROLLOUT_BACKENDS,
    SPAWN_SERVERS,
    DTYPES,
    INFO_SEED_LOSSES,
    INFO_SEED_POOLINGS,
    WANDB_MODES,
)
from maxent_jax.errors import UserError
from maxent_jax.model.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES


def _fail(field: str, value: Any, valid: str) -> UserError:
    return UserError(f"config field {field}={value!r} is invalid: {valid}")


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        node = node[part]
    return node


def _check(config: ml_collections.ConfigDict, path: str, ok: Callable[[Any], bool], valid: str) -> None:
    value = _get(config, path)
    try:
        good = bool(ok(value))
    except (TypeError, ValueError):
        good = False
    if not good:
        raise _fail(path, value, valid)


def _one_of(choices: Iterable[str]) -> tuple[Callable[[Any], bool], str]:
    choices = tuple(choices)
    return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_NONNEG = (lambda v: _finite(v) and v >= 0, "a finite number >= 0")
_POS = (lambda v: _finite(v) and v > 0, "a finite number > 0")
_POS_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
_NONNEG_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
_OPT_NONNEG = (lambda v: v is None or (_finite(v) and v >= 0), "unset or a finite number >= 0")
_UNIT = (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]")

# (field, predicate, description) checked in order; cross-field rules follow in validate().
_FIELD_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("seed", *_NONNEG_INT),
    ("model.param_dtype", *_one_of(DTYPES)),
    ("model.compute_dtype", *_one_of(DTYPES)),
    ("model.remat_policy", *_one_of(REMAT_POLICIES)),
    ("model.attention", *_one_of(ATTENTION_IMPLEMENTATIONS)),
    ("model.logprob_chunk_size", *_NONNEG_INT),
    ("rollout.decode_streams", *_NONNEG_INT),
    ("model.tiny.hidden_size", *_POS_INT),
    ("model.tiny.num_layers", *_POS_INT),
    ("model.tiny.num_heads", *_POS_INT),
    ("model.tiny.num_kv_heads", *_POS_INT),
    ("model.tiny.head_dim", *_POS_INT),
    ("model.tiny.intermediate_size", *_POS_INT),
    ("data.max_prompt_chars", *_POS_INT),
    ("data.synthetic.num_train", *_POS_INT),
    ("data.synthetic.num_eval", *_POS_INT),
    ("data.synthetic.max_operand", *_POS_INT),
    ("rollout.backend", *_one_of(ROLLOUT_BACKENDS)),
    ("rollout.num_generations", lambda v: isinstance(v, int) and v >= 2, "an integer >= 2 (a group needs 2+ completions)"),
    ("rollout.max_prompt_length", *_POS_INT),
    ("rollout.max_completion_length", *_POS_INT),
    ("rollout.temperature", *_POS),
    ("rollout.top_p", lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("rollout.top_k", *_NONNEG_INT),
    ("rollout.sync_interval_steps", *_NONNEG_INT),
    ("rollout.spawn_server", *_one_of(SPAWN_SERVERS)),
    ("rollout.dynamic_sampling", lambda v: isinstance(v, bool), "True or False"),
    ("rollout.dynamic_sampling_max_rounds", *_POS_INT),
    ("rollout.max_staleness", *_NONNEG_INT),
    ("rollout.straggler_groups", *_NONNEG_INT),
    ("rollout.spawn_server_devices", lambda v: isinstance(v, str) and re.fullmatch(r"(\d+(,\d+)*)?", v) is not None,
     "'' or comma-separated device indices such as '0,1'"),
    ("vllm.url", lambda v: isinstance(v, str) and v.startswith(("http://", "https://")), "an http(s) URL"),
    ("vllm.server_timeout", *_POS),
    ("vllm.max_retries", *_POS_INT),
    ("vllm.backoff", *_NONNEG),
    ("vllm.backoff_multiplier", lambda v: _finite(v) and v >= 1, "a number >= 1"),
    ("vllm.max_completion_rounds", *_NONNEG_INT),
    ("vllm.retry_sleep", *_NONNEG),
    ("rewards.reward_funcs", lambda v: len(v) >= 1, "a non-empty list of reward names"),
    ("rewards.num_workers", *_NONNEG_INT),
    ("rewards.timeout_s", *_POS),
    ("objective.beta", *_NONNEG),
    ("objective.clip_range", *_UNIT),
    ("objective.loss_type", *_one_of(OBJECTIVE_LOSS_TYPES)),
    ("objective.importance_sampling_level", *_one_of(IMPORTANCE_SAMPLING_LEVELS)),
    ("objective.scale_rewards", *_one_of(SCALE_REWARDS)),
    ("objective.epsilon_low", lambda v: v is None or (_finite(v) and 0 <= v <= 1), "unset or a number in [0, 1]"),
    ("objective.epsilon_high", *_OPT_NONNEG),
    ("objective.negative_adv_rule", *_one_of(NEGATIVE_ADV_RULES)),
    ("objective.kl_estimator", *_one_of(KL_ESTIMATORS)),
    ("objective.sampler_correction", *_one_of(SAMPLER_CORRECTIONS)),
    ("objective.sampler_correction_min", *_NONNEG),
    ("objective.sampler_correction_max", *_POS),
    ("maxent.tau", *_NONNEG),
    ("maxent.q_temperature", *_POS),
    ("maxent.q_epsilon", lambda v: _finite(v) and 0 < v < 1, "a number in (0, 1)"),
    ("maxent.reference_logprobs_source", *_one_of(REFERENCE_SOURCES)),
    ("maxent.target_weight_entropy", *_OPT_NONNEG),
    ("maxent.target_weight_entropy_start", *_OPT_NONNEG),
    ("maxent.target_weight_entropy_final", *_OPT_NONNEG),
    ("maxent.target_weight_entropy_horizon", *_NONNEG_INT),
    ("maxent.tau_lr", *_NONNEG),
    ("maxent.tau_min", *_NONNEG),
    ("maxent.tau_max", *_NONNEG),
    ("maxent.tau_warmup_steps", lambda v: isinstance(v, int) and v >= -1, "an integer >= -1 (-1 = optimizer warmup)"),
    ("maxent.clip_objective_coef", *_NONNEG),
    ("maxent.clip_adv_baseline", lambda v: v is None or _finite(v), "unset or a finite number"),
    ("controllers.kl_target", *_NONNEG),
    ("controllers.kl_horizon", *_NONNEG_INT),
    ("controllers.kl_ctl_step_size", *_NONNEG),
    ("controller_meta.method", *_one_of(META_METHODS)),
    ("controller_meta.lr", *_NONNEG),
    ("controller_meta.tau_lr", *_NONNEG),
    ("controller_meta.beta_lr", *_NONNEG),
    ("controller_meta.beta_grad_clip", *_NONNEG),
    ("controller_meta.update_interval", *_POS_INT),
    ("controller_meta.analytic_steps", *_POS_INT),
    ("controller_meta.optimizer", *_one_of(META_OPTIMIZERS)),
    ("controller_meta.truncation_steps", *_POS_INT),
    ("info_seed.num_seeds", *_NONNEG_INT),
    ("info_seed.lambda_", *_NONNEG),
    ("info_seed.temperature", *_POS),
    ("info_seed.loss_type", *_one_of(INFO_SEED_LOSSES)),
    ("info_seed.pooling", *_one_of(INFO_SEED_POOLINGS)),
    ("info_seed.entropy_mode", *_one_of(SEED_ENTROPY_MODES)),
    ("info_seed.prompt_template", lambda v: isinstance(v, str) and "{seed}" in v, "a string containing '{seed}'"),
    ("optim.learning_rate", *_NONNEG),
    ("optim.adam_beta1", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.adam_beta2", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.adam_epsilon", *_POS),
    ("optim.weight_decay", *_NONNEG),
    ("optim.max_grad_norm", *_NONNEG),
    ("optim.lr_scheduler_type", *_one_of(LR_SCHEDULES)),
    ("optim.min_lr_rate", *_UNIT),
    ("optim.warmup_steps", *_NONNEG_INT),
    ("optim.warmup_ratio", *_UNIT),
    ("train.max_steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1),
     "an integer >= 1, or -1 (train for num_train_epochs)"),
    ("train.num_train_epochs", *_POS_INT),
    ("train.per_device_train_batch_size", *_POS_INT),
    ("train.gradient_accumulation_steps", *_POS_INT),
    ("train.gradient_chunks", *_POS_INT),
    ("train.packing", lambda v: isinstance(v, bool), "True or False"),
    ("train.pack_length", *_NONNEG_INT),
    ("train.sft_warmup_steps", *_NONNEG_INT),
    ("train.sft_learning_rate", *_NONNEG),
    ("train.max_consecutive_nonfinite", *_POS_INT),
    ("mesh.shape", lambda v: len(v) == len(MESH_AXES) and all(isinstance(d, int) and (d >= 1 or d == -1) for d in v)
     and sum(d == -1 for d in v) <= 1, "three integers for ('data', 'fsdp', 'tensor'), each >= 1 or one -1"),
    ("lora.rank", *_POS_INT),
    ("lora.alpha", *_POS),
    ("lora.dropout", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1) (PEFT's lora_dropout)"),
    ("lora.base_dtype", lambda v: v == "" or v in DTYPES, "'' (model.param_dtype) or one of " + ", ".join(DTYPES)),
    ("lora.learning_rate", *_NONNEG),
    ("checkpoint.save_steps", *_NONNEG_INT),
    ("checkpoint.save_total_limit", *_NONNEG_INT),
    ("logging.logging_steps", *_POS_INT),
    ("logging.wandb", *_one_of(WANDB_MODES)),
    ("eval.eval_steps", *_NONNEG_INT),
    ("eval.per_device_eval_batch_size", *_POS_INT),
    ("eval.max_eval_samples", *_NONNEG_INT),
)


def field_problems(config: ml_collections.ConfigDict, fields: Iterable[str]) -> list[tuple[str, str]]:
    """(field, one-line error) for each of `fields` its own rule refuses: every problem at once
    (validate() stops at the first, and also checks the rules across fields)."""
    wanted, out = set(fields), []
    for path, ok, valid in _FIELD_RULES:
        if path in wanted:
            try:
                _check(config, path, ok, valid)
            except UserError as err:
                out.append((path, str(err)))
    return out


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raise UserError for the first invalid field; `device_count` also checks the mesh fits."""
    for path, ok, valid in _FIELD_RULES:
        _check(config, path, ok, valid)

    if config.model.attention == "cudnn" and config.model.compute_dtype != "bfloat16":
        raise _fail("model.attention", "cudnn", "'blocked' or 'dot_product' unless model.compute_dtype is "
                    "'bfloat16' (cuDNN flash attention takes half-precision inputs)")
    if config.model.score_prompt_once and config.model.attention != "blocked":
        raise _fail("model.score_prompt_once", True, "False unless model.attention is 'blocked' (here "
                    f"{config.model.attention!r}: the fused attentions score every row whole)")
    m = config.maxent
    if m.tau_max > 0 and m.tau_max < m.tau_min:
        raise _fail("maxent.tau_max", m.tau_max, f"0 (no bound) or >= maxent.tau_min={m.tau_min}")
    if not config.objective.train_grpo_objective and m.tau + config.objective.beta <= 0:
        raise UserError(
            "config fields maxent.tau=0 and objective.beta=0 are invalid together: the MaxEnt objective "
            "needs tau + beta > 0 (set one of them > 0, or objective.train_grpo_objective=True)"
        )
    has_target = any(
        v is not None for v in (m.target_weight_entropy, m.target_weight_entropy_start, m.target_weight_entropy_final)
    )
    if has_target and m.tau_lr > 0 and m.tau_max <= 0:
        raise _fail("maxent.tau_max", m.tau_max, "> 0 when the tau controller is active (a target entropy and tau_lr > 0)")
    if has_target and config.objective.train_grpo_objective:
        raise UserError(
            "config field maxent.target_weight_entropy is set but objective.train_grpo_objective=True: "
            "weight-entropy targets only apply to the MaxEnt objective"
        )
    if config.objective.kl_bias_correction and config.objective.kl_estimator == "sequence_k3":
        raise _fail("objective.kl_bias_correction", True, "False with objective.kl_estimator='sequence_k3' (the "
                    "correction weights per-token KL); use kl_estimator k1, k2 or k3 (TRL's is k3)")
    o = config.optim
    if o.min_lr_rate > 0 and o.lr_scheduler_type != "cosine_with_min_lr":
        raise _fail("optim.min_lr_rate", o.min_lr_rate,
                    f"0 unless optim.lr_scheduler_type is 'cosine_with_min_lr' (here {o.lr_scheduler_type!r})")
    cm = config.controller_meta
    if cm.use_hessian and cm.method == "analytic":
        raise _fail(
            "controller_meta.use_hessian", True,
            "only with controller_meta.method 'first_order' or 'truncated_backprop' (the analytic proxy has no curvature)",
        )
    if cm.enabled and max(cm.lr, cm.tau_lr, cm.beta_lr) <= 0:
        raise _fail("controller_meta.lr", cm.lr, "> 0 (or tau_lr/beta_lr > 0) when controller_meta.enabled=True")

    s = config.info_seed
    if s.enabled and s.num_seeds < 1:
        raise _fail("info_seed.num_seeds", s.num_seeds, "an integer >= 1 when info_seed.enabled=True")
    if s.enabled and s.lambda_ > 0 and s.loss_type == "ce":
        raise _fail("info_seed.loss_type", "ce", "'infonce' (the trainer has no seed classification head; the "
                    "reference's 'ce' path fails at runtime, Q22)")

    t = config.train
    group = config.rollout.num_generations + (s.num_seeds if s.enabled else 0)
    if t.per_device_train_batch_size % t.gradient_chunks and group % t.gradient_chunks:  # packed or not
        raise _fail("train.gradient_chunks", t.gradient_chunks,
                    f"a divisor of train.per_device_train_batch_size={t.per_device_train_batch_size}"
                    f" or of the completions per prompt ({group})")
    if t.gradient_chunks > 1 and s.enabled and s.lambda_ > 0:
        raise _fail("train.gradient_chunks", t.gradient_chunks,
                    "1 while the InfoSeed loss is on (info_seed.lambda_ > 0): its InfoNCE term compares rows "
                    "across the micro-batch, so the gradient cannot be taken a piece at a time")

    row = config.rollout.max_prompt_length + config.rollout.max_completion_length
    if t.packing and 0 < t.pack_length < row:
        raise _fail("train.pack_length", t.pack_length, f"0 (automatic) or >= rollout.max_prompt_length + "
                    f"rollout.max_completion_length = {row} (one whole row must fit a buffer)")

    r = config.rewards
    if r.reward_weights and len(r.reward_weights) != len(r.reward_funcs):
        raise _fail(
            "rewards.reward_weights", tuple(r.reward_weights),
            f"empty or one weight per reward function ({len(r.reward_funcs)})",
        )
    if r.eval_reward_weights and len(r.eval_reward_weights) != len(r.eval_reward_funcs or r.reward_funcs):
        raise _fail("rewards.eval_reward_weights", tuple(r.eval_reward_weights), "empty or one weight per eval reward")

    if config.rollout.spawn_server and config.rollout.backend != "server":
        raise _fail("rollout.spawn_server", config.rollout.spawn_server,
                    "'' unless rollout.backend is 'server' (the in-process sampler needs no server)")
    if config.rollout.max_staleness > 0:
        _check_async(config)
    if config.rollout.straggler_groups and not config.rollout.max_staleness:
        raise _fail("rollout.straggler_groups", config.rollout.straggler_groups,
                    "0 unless rollout.max_staleness >= 1 (a synchronous step waits for its whole batch)")
    if config.rollout.straggler_groups and config.rollout.dynamic_sampling:
        raise _fail("rollout.straggler_groups", config.rollout.straggler_groups,
                    "0 with rollout.dynamic_sampling=True (its rounds draw whole batches)")
    o = config.objective
    if o.sampler_correction_max <= o.sampler_correction_min:
        raise _fail("objective.sampler_correction_max", o.sampler_correction_max,
                    f"> objective.sampler_correction_min={o.sampler_correction_min}")
    if config.data.dataset_mixture:
        try:
            mixture = json.loads(config.data.dataset_mixture)
        except json.JSONDecodeError as err:
            raise _fail("data.dataset_mixture", config.data.dataset_mixture, f"a JSON list of sources ({err.msg})") from None
        if not isinstance(mixture, list) or not mixture or not all(isinstance(x, dict) and "id" in x for x in mixture):
            raise _fail("data.dataset_mixture", config.data.dataset_mixture, 'a non-empty JSON list of {"id": ...} objects')
    if not config.data.dataset_name and not config.data.dataset_mixture:
        raise _fail("data.dataset_name", "", "a dataset name/path (or set data.dataset_mixture)")
    if config.lora.enabled:
        from maxent_jax.model.lora import resolve_targets

        resolve_targets(config.lora.target_modules)
        if config.maxent.reference_model_name_or_path:
            raise _fail("maxent.reference_model_name_or_path", config.maxent.reference_model_name_or_path,
                        "'' while lora.enabled=True (the reference is the base with the adapters as RL started)")
    res = config.checkpoint.resume
    if not isinstance(res, str) or not res:
        raise _fail("checkpoint.resume", res, "'latest', 'none' or a checkpoint path")

    if device_count is not None:
        shape = validate_mesh_shape(tuple(config.mesh.shape), device_count)
        if config.rollout.decode_streams > 1 and math.prod(shape) > 1:
            raise _fail("rollout.decode_streams", config.rollout.decode_streams,
                        f"0 or 1 on a mesh of {math.prod(shape)} devices (concurrent decode programs need one device)")


def _check_async(config: ml_collections.ConfigDict) -> None:
    """`rollout.max_staleness` >= 1 overlaps a rollout server's generation with the update; it needs
    what makes that exact: the server backend, the sampler's log-probs for the ratio, a push per step."""
    r, s = config.rollout, config.rollout.max_staleness
    if r.backend != "server":
        raise _fail("rollout.max_staleness", s, f"0 with rollout.backend={r.backend!r} (the in-process sampler cannot "
                    "generate while the update runs); use --config.rollout.backend=server (rollout.spawn_server=jax "
                    "starts a local server)")
    if not config.vllm.return_logprobs:
        raise _fail("rollout.max_staleness", s, "0 unless vllm.return_logprobs=True (the importance ratio of a stale "
                    "completion needs the log-probs of the weights that sampled it)")
    if r.sync_interval_steps != 1:
        raise _fail("rollout.max_staleness", s, f"0 unless rollout.sync_interval_steps=1 (is {r.sync_interval_steps}): "
                    "staleness is bounded by pushing the weights after every update")


def validate_mesh_shape(shape: tuple[int, ...], device_count: int) -> tuple[int, ...]:
    """Resolve -1 and check the mesh uses exactly the available devices; returns the concrete shape."""
    fixed = math.prod(d for d in shape if d != -1)
    if -1 in shape:
        if device_count % fixed:
            raise _fail("mesh.shape", shape, f"fixed axes must divide the {device_count} devices "
                        f"(e.g. {_mesh_fix(shape, device_count)})")
        shape = tuple(device_count // fixed if d == -1 else d for d in shape)
    if math.prod(shape) != device_count:
        raise _fail("mesh.shape", shape, f"a shape whose product is the device count ({device_count}), e.g. "
                    f"{_mesh_fix(shape, device_count)}; -1 takes the rest of the devices")
    return shape


def _mesh_fix(shape: tuple[int, ...], device_count: int) -> str:
    """The given shape with its largest axis as -1 when the others divide the devices, else all on fsdp."""
    largest = max(range(len(shape)), key=lambda i: shape[i])
    fix = tuple(-1 if i == largest else (1 if d == -1 else d) for i, d in enumerate(shape))
    if device_count % math.prod(d for d in fix if d != -1):
        fix = (1, -1, 1)
    return "--config.mesh.shape=(" + ",".join(map(str, fix)) + ")"
