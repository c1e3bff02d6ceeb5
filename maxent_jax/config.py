"""The base configuration: every field and its default (validation: `maxent_jax.config_check`).

Field names follow the reference trainer (spec 13.2) so its users recognise them. A prefixed
reference field lives in the section named by its prefix with the prefix dropped
(`maxent_tau` -> `maxent.tau`, `info_seed_num_seeds` -> `info_seed.num_seeds`,
`controller_meta_lr` -> `controller_meta.lr`, `vllm_url` -> `vllm.url`); unprefixed ones live
in the section of their topic (`kl_target` -> `controllers.kl_target`, `beta`/`init_kl_coeff`
-> `objective.beta`). Recipes in `configs/` start from `get_base_config()` and change fields.

`config_check.validate(config)` runs before any compute and raises `UserError` with one line
naming the field, the bad value and what is valid.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
from ml_collections import config_dict

from maxent_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

OBJECTIVE_LOSS_TYPES = ("reference", "grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("sequence_sum", "sequence", "token")
SCALE_REWARDS = ("none", "group", "batch")
NEGATIVE_ADV_RULES = ("standard_min", "reference_max")
KL_ESTIMATORS = ("sequence_k3", "k1", "k2", "k3")
SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SEED_ENTROPY_MODES = ("abs", "reference_signed")
REFERENCE_SOURCES = ("auto", "model", "policy", "rollout")
META_METHODS = ("analytic", "first_order", "truncated_backprop")
META_OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("cosine", "cosine_with_min_lr", "linear", "constant", "constant_with_warmup")
ROLLOUT_BACKENDS = ("sampler", "server")
SPAWN_SERVERS = ("", "jax", "vllm")
DTYPES = ("float32", "bfloat16")
INFO_SEED_LOSSES = ("infonce", "ce")
INFO_SEED_POOLINGS = ("mean", "last")
WANDB_MODES = ("auto", "online", "offline", "disabled")
RESUME_MODES = ("latest", "none")


def _placeholder(kind: type) -> config_dict.FieldReference:
    """A field that defaults to None but still type-checks overrides."""
    return config_dict.placeholder(kind)


def get_base_config() -> ml_collections.ConfigDict:
    """Every field with its default; the defaults are the reference's unless a comment says why not."""
    c = ml_collections.ConfigDict()
    c.seed = 42

    c.model = ml_collections.ConfigDict()
    # '' = the built-in tiny random decoder with the offline tokenizer (the embedded default).
    c.model.name_or_path = ""
    c.model.tokenizer_name_or_path = ""  # '' = the model directory (or the offline tokenizer)
    c.model.revision = "main"
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "float32"
    c.model.remat = False
    # What per-layer remat keeps: 'full' (nothing: least memory) or 'save_dots' (matmul outputs:
    # only the cheap elementwise work is recomputed).
    c.model.remat_policy = "full"
    # Attention of training/scoring forwards: 'blocked' (maxent_jax's causal-block kernel, any
    # device), 'dot_product' (jax.nn.dot_product_attention on XLA) or 'cudnn' (cuDNN flash
    # attention: GPU, bfloat16). The sampler's cached decode always uses its own.
    c.model.attention = "blocked"
    # Score each group's shared prompt once in the RL forwards (policy loss, reference log-probs)
    # instead of once per completion: same numbers, Tp / (Tp + Tc) less work on (G - 1) / G of the
    # rows. Needs model.attention='blocked'.
    c.model.score_prompt_once = True
    # Sequence positions per block when gathering per-token log-probs (0 = whole sequence).
    c.model.logprob_chunk_size = 0
    # Shapes of the built-in tiny decoder (used only when name_or_path is '').
    c.model.tiny = ml_collections.ConfigDict(
        dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
    )

    c.data = ml_collections.ConfigDict()
    # 'synthetic:arithmetic' is the offline task of the embedded default, 'synthetic:pair_sum' the
    # many-answer task of docs/experiments.md; otherwise an HF dataset name or a local path
    # understood by datasets.load_dataset.
    c.data.dataset_name = "synthetic:arithmetic"
    c.data.dataset_config = _placeholder(str)
    # JSON list of {"id", "config", "split", "columns", "weight"} (spec 2.1); '' = off.
    c.data.dataset_mixture = ""
    c.data.dataset_train_split = "train"
    c.data.dataset_test_split = "test"
    c.data.dataset_prompt_column = "problem"
    c.data.dataset_solution_column = "answer"
    # The column of worked solutions (reasoning and answer) the supervised warm-up
    # (train.sft_warmup_steps) imitates; rows keep it when the dataset has it.
    c.data.dataset_worked_solution_column = "solution"
    c.data.system_prompt = _placeholder(str)
    c.data.chat_template = _placeholder(str)
    c.data.max_prompt_chars = 2048  # MAX_PROMPT_CHARS of the reference (spec 2.2)
    c.data.eval_dataset_name = _placeholder(str)
    c.data.eval_dataset_config = _placeholder(str)
    c.data.eval_dataset_split = "validation"
    c.data.eval_dataset_prompt_column = _placeholder(str)
    c.data.eval_dataset_solution_column = _placeholder(str)
    # The synthetic tasks: arithmetic, problems `a op b` with operands 0..max_operand and the given
    # operators; pair_sum, two numbers from 0 to max_operand that add up to each sum 1..2*max_operand-1.
    c.data.synthetic = ml_collections.ConfigDict(dict(num_train=4096, num_eval=128, max_operand=9, operators="+-*"))

    c.rollout = ml_collections.ConfigDict()
    c.rollout.backend = "sampler"  # in-process JAX sampler, or 'server' (HTTP rollout server)
    c.rollout.num_generations = 8
    c.rollout.max_prompt_length = 512
    c.rollout.max_completion_length = 256
    c.rollout.temperature = 0.8  # gen_temperature
    c.rollout.top_p = 0.9  # gen_top_p
    c.rollout.top_k = 0  # gen_top_k; 0 = off (the reference never sends it, Q3)
    c.rollout.stop_sequences = ()  # vllm_stop_sequences
    c.rollout.ignore_eos = False
    # The in-process sampler's concurrent decode programs, each over a share of the prompts (same
    # samples for any value). 0 = auto: 2 on a one-device CPU mesh (idle cores otherwise), else 1;
    # more than 1 needs a one-device mesh.
    c.rollout.decode_streams = 0
    # Push weights to the rollout server every N optimizer steps; 0 = never. The reference
    # never syncs (Q5), so its rollouts come from the initial model.
    c.rollout.sync_interval_steps = 1
    # With backend 'server': 'jax' or 'vllm' makes the trainer start `python -m maxent_jax.serve
    # --backend X` itself (free loopback port, fresh token, the policy's own weights) and stop it
    # on every exit; '' = use the server already running at vllm.url.
    c.rollout.spawn_server = ""
    # The spawned server's CUDA_VISIBLE_DEVICES, e.g. '0,1' (start the trainer with the other
    # devices visible); '' = the trainer's own environment.
    c.rollout.spawn_server_devices = ""
    # DAPO's group filter: drop groups whose rewards are all equal (no signal for GRPO or MaxEnt)
    # and draw more prompts until the batch is full of informative groups (docs/rollout.md).
    c.rollout.dynamic_sampling = False
    # Rounds of prompts one step may draw with dynamic_sampling (the first included); after the
    # last the step trains on the informative groups it has, the rest of the batch masked out.
    c.rollout.dynamic_sampling_max_rounds = 10
    # Asynchronous rollouts (backend 'server'): the server generates up to this many batches ahead of
    # the update, with weights at most this many optimizer steps old (older completions are dropped and
    # counted); 0 = the synchronous loop (push, generate, update in turn). docs/rollout.md.
    c.rollout.max_staleness = 0
    # With max_staleness >= 1: groups kept generating beyond one batch; a batch takes the first complete
    # groups and a straggler joins a later batch (its staleness counted); 0 = a batch waits for all its groups.
    c.rollout.straggler_groups = 0

    c.vllm = ml_collections.ConfigDict()
    c.vllm.url = "http://localhost:8000/generate"
    c.vllm.server_timeout = 240.0
    c.vllm.max_retries = 3
    c.vllm.backoff = 1.0
    c.vllm.backoff_multiplier = 2.0
    c.vllm.client_tag = ""  # '' = resolve from VLLM_CLIENT_TAG / process index / SLURM_PROCID
    # A server that does not echo client_tag is an error (the reference keeps such results, Q4).
    c.vllm.client_tag_fail_fast = True
    c.vllm.token_file = ""  # shared secret for POST /weights
    c.vllm.return_logprobs = True
    c.vllm.max_completion_rounds = 0
    c.vllm.retry_sleep = 0.5

    c.rewards = ml_collections.ConfigDict()
    c.rewards.reward_funcs = ("pure_accuracy_math",)
    c.rewards.reward_weights = ()
    c.rewards.eval_reward_funcs = ()
    c.rewards.eval_reward_weights = ()
    # 0 = score in the trainer process (the built-in rewards take microseconds); N > 0 = N worker
    # processes for slow rewards such as math_verify on long completions.
    c.rewards.num_workers = 0
    c.rewards.timeout_s = 10.0

    c.objective = ml_collections.ConfigDict()
    c.objective.train_grpo_objective = False  # False = MaxEnt weighting, True = GRPO advantages
    c.objective.beta = 0.04  # init_kl_coeff / init_kl_coef / kl_penalty_beta / beta
    c.objective.clip_range = 0.2
    c.objective.loss_type = "reference"
    c.objective.importance_sampling_level = "sequence_sum"
    c.objective.scale_rewards = "none"
    c.objective.epsilon_low = _placeholder(float)  # None = clip_range
    c.objective.epsilon_high = _placeholder(float)  # None = epsilon_low
    c.objective.negative_adv_rule = "standard_min"  # 'reference_max' reproduces Q12
    c.objective.kl_estimator = "sequence_k3"  # the reference's sequence-level k3; or token-level k1/k2/k3
    # TRL's use_bias_correction_kl: the per-token KL is multiplied by the importance ratio
    # pi_theta / pi_old before beta x KL (token-level estimators); off = the reference's formula.
    c.objective.kl_bias_correction = False
    # Correction for sampler/trainer log-prob mismatch (TRL's vllm_importance_sampling_*):
    # 'none' uses the sampler's log-probs directly as the ratio denominator.
    c.objective.sampler_correction = "none"
    c.objective.sampler_correction_max = 3.0
    c.objective.sampler_correction_min = 0.0

    c.maxent = ml_collections.ConfigDict()
    c.maxent.tau = 0.0
    c.maxent.q_temperature = 1.0
    c.maxent.q_epsilon = 1e-6
    c.maxent.length_normalize_ref = True
    c.maxent.reference_logprobs_source = "auto"
    c.maxent.share_reference_model = False
    c.maxent.reference_model_name_or_path = ""
    c.maxent.target_weight_entropy = _placeholder(float)
    c.maxent.target_weight_entropy_start = _placeholder(float)
    c.maxent.target_weight_entropy_final = _placeholder(float)
    c.maxent.target_weight_entropy_horizon = 0
    c.maxent.tau_lr = 0.0
    c.maxent.tau_min = 0.0
    c.maxent.tau_max = 0.0
    c.maxent.tau_warmup_steps = -1  # -1 = follow the optimizer warmup (Q17)
    c.maxent.use_clip_objective = True  # the reference's clip term is on whenever clip_range > 0 (Q11)
    c.maxent.clip_objective_coef = 1.0
    c.maxent.clip_adv_baseline = _placeholder(float)

    c.controllers = ml_collections.ConfigDict()
    c.controllers.kl_target = 0.0
    c.controllers.kl_horizon = 0
    c.controllers.kl_ctl_step_size = 0.0
    c.controllers.overwrite_from_config = False

    c.controller_meta = ml_collections.ConfigDict()
    c.controller_meta.enabled = False
    c.controller_meta.method = "analytic"
    c.controller_meta.lr = 0.0
    c.controller_meta.tau_lr = 0.0
    c.controller_meta.beta_lr = 0.0
    c.controller_meta.beta_grad_clip = 0.0
    c.controller_meta.update_interval = 1
    c.controller_meta.objective = "potential"
    c.controller_meta.analytic_steps = 1
    c.controller_meta.optimizer = "sgd"
    c.controller_meta.truncation_steps = 1
    c.controller_meta.use_hessian = False

    c.info_seed = ml_collections.ConfigDict()
    c.info_seed.enabled = False
    c.info_seed.num_seeds = 0
    c.info_seed.lambda_ = 0.0  # info_seed_lambda ('lambda' is a Python keyword)
    c.info_seed.temperature = 0.1
    c.info_seed.alpha_entropy = 0.0
    c.info_seed.prompt_template = "\n[seed={seed}]"
    c.info_seed.loss_type = "infonce"
    c.info_seed.pooling = "mean"
    # How the alpha term measures weight entropy: 'abs' is NaN-free on signed GRPO advantages
    # (Q23); 'reference_signed' reproduces the reference (NaN on mixed-reward groups).
    c.info_seed.entropy_mode = "abs"

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.adam_beta1 = 0.9
    c.optim.adam_beta2 = 0.999
    c.optim.adam_epsilon = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0
    c.optim.lr_scheduler_type = "cosine"
    # cosine_with_min_lr decays to min_lr_rate * learning_rate instead of 0 (HF's schedule of that name).
    c.optim.min_lr_rate = 0.0
    c.optim.warmup_steps = 0
    c.optim.warmup_ratio = 0.0

    c.train = ml_collections.ConfigDict()
    c.train.max_steps = 100  # optimizer steps; -1 = as many as num_train_epochs passes over the train split
    c.train.num_train_epochs = 1
    c.train.per_device_train_batch_size = 2  # prompts per micro-batch per device of the ('data', 'fsdp') axes
    c.train.gradient_accumulation_steps = 1
    # Compute each micro-batch's gradient in this many pieces of its rows, one forward and backward
    # at a time: the same gradient (up to float rounding) with a fraction of the live activations
    # (faster on a CPU once they overflow the cache, less memory on a GPU). Divides the completions
    # per prompt (each prompt's completions are split) or per_device_train_batch_size (whole groups);
    # not with the InfoSeed loss.
    c.train.gradient_chunks = 1
    # Padding-free RL forwards (docs/packing.md): each group's prompt (once) and its completions laid
    # end to end in token buffers with segment-masked attention; log-probs are read back into the
    # padded layout, so losses and normalisers are unchanged. One host process.
    c.train.packing = False
    # Buffer tokens: 0 = chosen per step by a cost estimate (a few lengths from a row's width up to a
    # whole group's, or the padded layout where that is cheaper); else a fixed length of at least
    # rollout.max_prompt_length + rollout.max_completion_length.
    c.train.pack_length = 0
    # Supervised warm-up steps on the dataset's worked solutions before RL (the tiny default
    # needs it: a random model cannot discover the answer format by RL alone).
    c.train.sft_warmup_steps = 0
    c.train.sft_learning_rate = 1e-3
    c.train.max_consecutive_nonfinite = 5

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # over ('data', 'fsdp', 'tensor'); -1 = the rest of the devices
    # Extra logical-axis rules as "logical=mesh_axis" strings that override the table in
    # maxent_jax/parallel/rules.py, e.g. ("vocab=tensor",); mesh_axis may be 'none'.
    c.mesh.rules = ()

    c.lora = ml_collections.ConfigDict()
    # LoRA adapters on a frozen base (maxent_jax/model/lora.py; the training guide's LoRA section).
    c.lora.enabled = False
    c.lora.rank = 16  # r: A is [in, r], B is [r, out]
    c.lora.alpha = 32.0  # the adapter is scaled by alpha / rank (PEFT's lora_alpha)
    c.lora.dropout = 0.0  # PEFT's lora_dropout: drop the adapters' input in the RL update's forward (0 <= p < 1)
    # HF module names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or 'all-linear'.
    c.lora.target_modules = ("all-linear",)
    c.lora.base_dtype = ""  # '' = model.param_dtype; 'bfloat16' freezes a half-precision base under float32 adapters
    # The optimizer's learning rate while LoRA is on (adapters want a far larger one than full
    # fine-tuning); 0 = optim.learning_rate.
    c.lora.learning_rate = 2e-3

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_steps = 50
    c.checkpoint.save_total_limit = 3
    c.checkpoint.resume = "latest"  # 'latest', 'none' or a checkpoint path
    c.checkpoint.async_save = True
    c.checkpoint.export_final = True

    c.logging = ml_collections.ConfigDict()
    c.logging.logging_steps = 1
    c.logging.wandb = "auto"  # auto: online if a project/API key is configured, else offline
    c.logging.wandb_entity = ""
    c.logging.wandb_project = ""
    c.logging.wandb_run_group = ""
    c.logging.run_name = ""
    c.logging.log_completions = False
    c.logging.progress = True

    c.eval = ml_collections.ConfigDict()
    c.eval.do_eval = True
    c.eval.eval_steps = 25
    c.eval.per_device_eval_batch_size = 8
    c.eval.max_eval_samples = 0  # 0 = all rows
    return c


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
    """Plain JSON-serialisable view (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def from_json_dict(data: dict, source: str = "config.json") -> ml_collections.ConfigDict:
    """The inverse of `to_json_dict`: the base config with every field of `data` set (lists become
    tuples), so a tool can rebuild a run's config from its WORKDIR/config.json. An unknown field
    or a value of the wrong type is a UserError naming it (a config.json from another version)."""
    config = get_base_config()

    def fill(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            path = prefix + key
            if key not in node:
                raise UserError(f"{source}: field {path} is not a config field of this version")
            if isinstance(node[key], ml_collections.ConfigDict):
                if not isinstance(value, dict):
                    raise UserError(f"{source}: field {path} should be a section, got {value!r}")
                fill(node[key], value, path + ".")
                continue
            try:
                node[key] = tuple(value) if isinstance(value, list) else value
            except (TypeError, ValueError):
                raise UserError(f"{source}: field {path}={value!r} has the wrong type "
                                f"(expected {node.get_type(key).__name__})") from None

    with config.unlocked():
        fill(config, data, "")
    return config


def set_fields(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    """Write `{'train.max_steps': 5, ...}` (dotted field names) onto `config` in place."""
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
