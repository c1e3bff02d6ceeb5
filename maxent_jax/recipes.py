"""Reference-style flat YAML recipes mapped onto our config (`python -m maxent_jax.train --recipe=x.yaml`).

The reference reads a flat YAML file into its script, training and model dataclasses and
silently drops every key none of them declares (spec 13.1, quirk Q2), so a typo or a stale
key changes a run without a word. Here every key is mapped, read by a rule, ignored with a
printed reason, accepted only at a neutral value, or unknown (the classes live in
`recipe_keys.py`). Every problem of a recipe (unknown keys, refused values, values a field
cannot take, keys that disagree) is collected and reported in ONE `UserError` line, so a
user fixes a YAML in one pass instead of one error per run.

`load()`/`translate()` give a `Recipe`: field updates, warnings and the problems found so
far; `apply()` writes it onto a config, converting YAML scalars (PyYAML reads `1e-6` as a
string) to each field's type, checks each field it set, and raises once with every problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
from typing import Any, Callable

import ml_collections
import yaml

from maxent_jax import config_check
from maxent_jax.errors import UserError
from maxent_jax.recipe_keys import FIELDS, IGNORED, KL_ALIASES, NEUTRAL_ONLY, RULE_KEYS, TRL_KEYS, as_list, url

KNOWN_KEYS = FIELDS.keys() | TRL_KEYS.keys() | RULE_KEYS | IGNORED.keys() | NEUTRAL_ONLY.keys()


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A translated recipe: `updates` maps our field -> (value, the recipe key(s) it came from)."""

    source: str
    updates: dict[str, tuple[Any, str]]
    ignored: tuple[tuple[str, str], ...]  # (key, reason)
    notes: tuple[str, ...]  # values we changed or interpreted, and why
    problems: tuple[str, ...] = ()  # everything wrong with the recipe; apply() reports them in one line

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
    problems: list[str] = []
    nested = sorted(str(k) for k, v in data.items() if k not in KNOWN_KEYS and isinstance(v, dict))
    unknown = sorted(str(k) for k, v in data.items() if k not in KNOWN_KEYS and not isinstance(v, dict))
    refused = [f"{k}={data[k]!r} ({why})" for k, (neutral, why) in NEUTRAL_ONLY.items()
               if k in data and not _holds(neutral, data[k])]
    if unknown:
        problems.append("unknown keys: " + ", ".join(_with_suggestion(k) for k in unknown))
    if refused:
        problems.append("unsupported values: " + ", ".join(refused))
    if nested:
        problems.append("nested sections (a flat recipe has none): " + ", ".join(nested))

    updates: dict[str, tuple[Any, str]] = {}
    notes: list[str] = []
    for key, (field, convert) in FIELDS.items():
        if key in data and data[key] is not None:
            _map(updates, problems, key, data[key], field, convert)
    for key, (field, winners, convert) in TRL_KEYS.items():
        if key not in data or data[key] is None:
            continue
        winner = next((w for w in winners if data.get(w) is not None), None)
        if winner is None:
            _map(updates, problems, key, data[key], field, convert)
        elif data[key] != data[winner]:
            notes.append(f"{key}={data[key]!r} is not used: {winner}={data[winner]!r} sets {field} "
                         "(the reference's loop reads its own key)")
    _rules(data, updates, notes, problems)
    ignored = tuple((k, IGNORED[k]) for k in data if k in IGNORED)
    return Recipe(source=source, updates=updates, ignored=ignored, notes=tuple(notes), problems=tuple(problems))


def _holds(predicate: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(predicate(value))
    except (TypeError, ValueError):
        return False


def _map(updates: dict, problems: list[str], key: str, value: Any, field: str,
         convert: Callable[[Any], Any] | None) -> None:
    if convert is not None:
        try:
            value = convert(value)
        except (TypeError, ValueError):
            problems.append(f"key {key}={value!r} is invalid for {field}")
            return
    _put(updates, problems, field, value, key)


def _with_suggestion(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.8)
    return f"{key} (did you mean {close[0]}?)" if close else key


def _put(updates: dict[str, tuple[Any, str]], problems: list[str], field: str, value: Any, key: str) -> None:
    """Record `field = value`; two recipe keys that set one field must agree."""
    if field in updates and updates[field][0] != value:
        other_value, other_key = updates[field]
        problems.append(f"keys {other_key}={other_value!r} and {key}={value!r} both set {field}; "
                        "keep one of them or give them the same value")
        return
    updates[field] = (value, updates[field][1] + "+" + key if field in updates else key)


def _rules(data: dict[str, Any], updates: dict, notes: list[str], problems: list[str]) -> None:
    """The keys that need more than a rename (RULE_KEYS); refusals are appended to `problems`."""
    def put(field: str, value: Any, key: str) -> None:
        _put(updates, problems, field, value, key)

    refuse = problems.append

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
        put("vllm.url", url(data["vllm_server_base_url"]) + "/generate", "vllm_server_base_url")
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
            refuse(f"key vllm_mode={mode!r} is invalid: 'server' or 'colocate'")
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
        refuse(f"keys eval_strategy and evaluation_strategy disagree ({strategies}); keep one")
    strategy = str(next(iter(strategies.values()))) if strategies else None
    if strategy == "epoch":
        notes.append("eval strategy 'epoch' is unsupported (as in the reference): evaluation is off")
    if strategy is not None and strategy not in ("no", "steps", "epoch"):
        refuse(f"key eval_strategy={strategy!r} is invalid: 'no', 'steps' or 'epoch'")
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
        targets = {str(t) for t in as_list(report_to)}
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
            steps = _coerce(max_steps, int)
        except (TypeError, ValueError):
            refuse(f"key max_steps={max_steps!r} is invalid: an integer number of optimizer steps, or -1")
        else:
            put("train.max_steps", -1 if steps <= 0 else steps, "max_steps")
            if steps <= 0:
                notes.append(f"max_steps={max_steps!r}: the run lasts num_train_epochs passes over the train split, "
                             "counted in optimizer steps (the reference counted micro-batches there, Q15)")

    _schedule_kwargs(data, put, refuse)

    # TRL's use_bias_correction_kl weights its per-token k3 KL; the reference's sequence-level k3 has no tokens.
    if data.get("use_bias_correction_kl") is not None:
        put("objective.kl_bias_correction", data["use_bias_correction_kl"], "use_bias_correction_kl")
        if data["use_bias_correction_kl"] is True:
            put("objective.kl_estimator", "k3", "use_bias_correction_kl")
            notes.append("use_bias_correction_kl=True: the KL is TRL's per-token k3 (objective.kl_estimator='k3'), "
                         "weighted by the importance ratio")

    optim = data.get("optim")
    if optim is not None and (not str(optim).startswith("adamw") or any(s in str(optim) for s in ("8bit", "bnb"))):
        refuse(f"key optim={optim!r} is unsupported: maxent-jax uses optax AdamW (any adamw_torch* value)")

    mixture = data.get("dataset_mixture")
    if mixture is not None and (sources := _mixture_json(mixture, refuse)) is not None:
        put("data.dataset_mixture", sources, "dataset_mixture")

    ref_revision = data.get("reference_model_revision")
    if ref_revision is not None and str(ref_revision) != str(data.get("model_revision", "main")):
        refuse(
            f"key reference_model_revision={ref_revision!r} is unsupported: the reference model loads at "
            "model_revision"
        )

    # The reference's InfoSeed entry point forces the GRPO objective; its shipped recipe omits
    # train_grpo_objective (Q27).
    if data.get("info_seed_enabled") and "train_grpo_objective" not in data:
        put("objective.train_grpo_objective", True, "info_seed_enabled")
        notes.append("info_seed_enabled without train_grpo_objective: using the GRPO objective, "
                     "as the reference's InfoSeed entry point does (Q27)")


def _schedule_kwargs(data: dict[str, Any], put: Callable[[str, Any, str], None],
                     refuse: Callable[[str], None]) -> None:
    """HF's `lr_scheduler_kwargs`: the floor of `cosine_with_min_lr` (min_lr_rate, or min_lr / learning_rate)."""
    kind = str(data.get("lr_scheduler_type") or "")
    kwargs = data.get("lr_scheduler_kwargs") or {}
    if not isinstance(kwargs, dict):
        refuse(f"key lr_scheduler_kwargs={kwargs!r} is invalid: a mapping such as {{min_lr_rate: 0.1}}")
        return
    if kind != "cosine_with_min_lr":
        extra = {k: v for k, v in kwargs.items() if not (k == "num_cycles" and v == 0.5 and kind == "cosine")}
        if extra:
            refuse(f"key lr_scheduler_kwargs={extra!r} is unsupported with lr_scheduler_type={kind or 'cosine'!r}: "
                   "only cosine_with_min_lr takes arguments (min_lr_rate or min_lr)")
        return
    extra = sorted(set(kwargs) - {"min_lr_rate", "min_lr"})
    if extra or len(kwargs) != 1:
        refuse(f"key lr_scheduler_kwargs={kwargs!r} is invalid for cosine_with_min_lr: exactly one of "
               "min_lr_rate (a fraction of learning_rate) or min_lr")
        return
    try:
        if "min_lr_rate" in kwargs:
            rate = float(kwargs["min_lr_rate"])
        elif data.get("learning_rate") is None:
            refuse("key lr_scheduler_kwargs.min_lr needs learning_rate in the recipe (or give min_lr_rate)")
            return
        else:
            rate = float(kwargs["min_lr"]) / float(data["learning_rate"])
    except (TypeError, ValueError, ZeroDivisionError):
        refuse(f"key lr_scheduler_kwargs={kwargs!r} is invalid: numbers, and learning_rate > 0")
        return
    put("optim.min_lr_rate", rate, "lr_scheduler_kwargs")


def _mixture_json(mixture: Any, refuse: Callable[[str], None]) -> str | None:
    """The reference's `{datasets: [...], seed, test_split_size}` mapping -> our JSON list of sources."""
    if isinstance(mixture, str):
        return mixture
    if isinstance(mixture, dict):
        if mixture.get("test_split_size") not in (None, 0):
            refuse("key dataset_mixture.test_split_size is unsupported: name an eval_dataset_name instead")
        mixture = mixture.get("datasets")
    if not isinstance(mixture, list) or not mixture:
        refuse("key dataset_mixture is invalid: a mapping with a non-empty 'datasets' list")
        return None
    return json.dumps(mixture)


def apply(config: ml_collections.ConfigDict, recipe: Recipe) -> ml_collections.ConfigDict:
    """Write the recipe's values onto `config` (in place), converted to each field's type.

    Raises one UserError with every problem: the recipe's own, values a field's type cannot
    hold, and values the field's rule refuses (cross-field rules stay with config validation).
    """
    problems = list(recipe.problems)
    written = []
    for field, (value, key) in recipe.updates.items():
        *parents, leaf = field.split(".")
        node = config
        for part in parents:
            node = node[part]
        kind = node.get_type(leaf)
        try:
            node[leaf] = _coerce(value, kind)
            written.append(field)
        except (TypeError, ValueError):
            problems.append(f"key {key}={value!r} cannot set {field}: expected {kind.__name__}")
    problems += [f"key {recipe.updates[f][1]}: {message}" for f, message in config_check.field_problems(config, written)]
    if problems:
        raise UserError(f"recipe {recipe.source}: " + "; ".join(problems) + " (docs/recipes.md lists every key)")
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
