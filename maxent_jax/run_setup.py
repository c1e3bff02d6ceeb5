"""What a run is built from: the policy (model, tokenizer, generator) and the task (prompts, answers).

Kept apart from the loop so `train`, `evaluate` and `bench` construct runs the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from maxent_jax import scoring
from maxent_jax.data.prompts import render_prompt
from maxent_jax.data.sources import load_rows
from maxent_jax.data.tokenizer import build_offline_tokenizer
from maxent_jax.errors import UserError
from maxent_jax.model.attention import check_attention_backend
from maxent_jax.model.config import ModelConfig
from maxent_jax.model.decoder import Decoder
from maxent_jax.model.generation_config import eos_token_ids
from maxent_jax.model.hf_io import load_hf_checkpoint, resolve_checkpoint
from maxent_jax.model.lora import LoRAParam, LoRASettings, apply_lora
from maxent_jax.objectives.settings import InfoSeedSettings, ObjectiveSettings, resolve_epsilons
from maxent_jax.parallel.rules import LOGICAL_AXIS_RULES, tree_shardings
from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.client import RolloutClient
from maxent_jax.rollout.remote import RemoteRollout
from maxent_jax.rollout.sampler import Sampler
from maxent_jax.rollout.spawn import SpawnedServer, start_for_policy

Generation = tuple[list[list[int]], list[list[float]], np.ndarray]
GenerateFn = Callable[[nnx.State, Sequence[Sequence[int]], SamplingParams, jax.Array], Generation]


def cache_dir() -> pathlib.Path:
    """MAXENT_CACHE_DIR, else ~/.cache/maxent_jax: where the offline tokenizer is built once."""
    return pathlib.Path(os.environ.get("MAXENT_CACHE_DIR") or pathlib.Path.home() / ".cache" / "maxent_jax")


@dataclasses.dataclass
class Policy:
    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    rest: nnx.State
    tokenizer: Any
    tokenizer_dir: str
    generate: GenerateFn
    remote: RemoteRollout | None = None  # set when rollouts come from a rollout server
    # LoRA (`lora.enabled`): `params` are the adapters only and the frozen base is in `rest`.
    lora: LoRASettings | None = None
    server: SpawnedServer | None = None  # the rollout server this run started (rollout.spawn_server)

    def close(self) -> None:
        """Stop the rollout server this policy started, if any."""
        if self.server is not None:
            self.server.stop()

    @property
    def pad_id(self) -> int:
        return self.model_cfg.pad_token_id if self.model_cfg.pad_token_id is not None else 0

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Completion texts without special tokens (what the rewards score): `batch_decode`'s result.

        A fast tokenizer without space clean-up goes straight to its Rust backend: `batch_decode`
        first type-checks every token id in Python, about 5 ms of the `tiny` preset's 0.1 s RL step.
        """
        tokenizer = self.tokenizer
        if getattr(tokenizer, "is_fast", False) and not tokenizer.clean_up_tokenization_spaces:
            return tokenizer.backend_tokenizer.decode_batch([list(row) for row in ids], skip_special_tokens=True)
        return tokenizer.batch_decode(ids, skip_special_tokens=True)


def _load_tokenizer(path: str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"tokenizer {path!r} could not be loaded: {' '.join(str(err).split())[:200]}") from None


def numerics(m: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ModelConfig fields the run's `model` section sets on any architecture (besides param_dtype)."""
    check_attention_backend(m.attention)
    return dict(compute_dtype=m.compute_dtype, remat=m.remat, remat_policy=m.remat_policy, attention=m.attention)


def checkpoint_shardings(path: pathlib.Path, config: ml_collections.ConfigDict, mesh: Mesh | None, rules: Any) -> Any:
    """Where each parameter of the checkpoint at `path` goes on `mesh`: the rules applied to an
    abstract model, so every host reads only its shards (None without a mesh)."""
    if mesh is None:
        return None
    m = config.model
    cfg = ModelConfig.from_hf_config(json.loads((path / "config.json").read_text()), param_dtype=m.param_dtype,
                                     **numerics(m))
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return tree_shardings(nnx.split(abstract, nnx.Param, ...)[1], mesh, rules or LOGICAL_AXIS_RULES)


def load_reference_params(config: ml_collections.ConfigDict, mesh: Mesh, rules: Any) -> nnx.State:
    """The frozen reference policy from `maxent.reference_model_name_or_path` (same architecture)."""
    m = config.model
    path = resolve_checkpoint(config.maxent.reference_model_name_or_path, m.revision)
    _, model = load_hf_checkpoint(path, shardings=checkpoint_shardings(path, config, mesh, rules),
                                  dtype=m.param_dtype, **numerics(m))
    return nnx.split(model, nnx.Param, ...)[1]


def load_policy(config: ml_collections.ConfigDict, mesh: Mesh | None = None, rules: Any = None,
                workdir: pathlib.Path | None = None) -> Policy:
    """The tiny random decoder with the offline tokenizer, or an HF checkpoint (placed by `shardings`).

    With `rollout.spawn_server` it also starts the rollout server (log in `workdir`); close the policy.
    """
    m = config.model
    path = None
    lora = LoRASettings.from_config(config.lora) if config.lora.enabled else None
    if m.name_or_path:
        path = resolve_checkpoint(m.name_or_path, m.revision)
        model_cfg, model = load_hf_checkpoint(path, shardings=checkpoint_shardings(path, config, mesh, rules),
                                              dtype=(lora and lora.base_dtype) or m.param_dtype, **numerics(m))
        tokenizer_dir = m.tokenizer_name_or_path or str(path)
    else:
        tokenizer_dir = m.tokenizer_name_or_path or str(build_offline_tokenizer(cache_dir() / "tokenizer"))
        model_cfg = ModelConfig.tiny(**dict(m.tiny), param_dtype=m.param_dtype, **numerics(m))
        model = Decoder(model_cfg, rngs=nnx.Rngs(config.seed))
    tokenizer = _load_tokenizer(tokenizer_dir)
    if lora is not None:
        apply_lora(model, lora, config.seed, adapter_dtype=m.param_dtype)
    graphdef, params, rest = nnx.split(model, LoRAParam if lora is not None else nnx.Param, ...)
    if config.rollout.backend == "server":
        server = start_for_policy(config, model, model_cfg, tokenizer_dir, workdir) if config.rollout.spawn_server else None
        client = RolloutClient.from_config(config, url=server and server.url, token=server and server.token)
        remote = RemoteRollout(client, model_cfg,
                               sync_interval_steps=config.rollout.sync_interval_steps,
                               max_rounds=config.vllm.max_completion_rounds, retry_sleep=config.vllm.retry_sleep,
                               lora=lora)
        return Policy(model_cfg, graphdef, params, rest, tokenizer, tokenizer_dir, remote.generate, remote, lora,
                      server=server)
    eos = eos_token_ids(path, model_cfg.eos_token_id, tokenizer)  # generation_config.json's too, as transformers
    sampler = Sampler(graphdef, eos_token_ids=eos, pad_token_id=model_cfg.pad_token_id or 0,
                      streams=decode_streams(config.rollout.decode_streams, mesh))
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)

    def generate(state: nnx.State, prompts: Sequence[Sequence[int]], sp: SamplingParams, key: jax.Array) -> Generation:
        out = sampler.generate((state, rest), prompts, sp, key, decode=decode)
        ids = [row[:n].tolist() for row, n in zip(out.tokens, out.lengths)]
        logps = [row[:n].tolist() for row, n in zip(out.logprobs, out.lengths)]
        return ids, logps, out.stopped

    return Policy(model_cfg, graphdef, params, rest, tokenizer, tokenizer_dir, generate, lora=lora)


def decode_streams(configured: int, mesh: Mesh | None) -> int:
    """`rollout.decode_streams` with 0 (auto) resolved: 2 on a one-device CPU mesh (at most the cores), else 1."""
    if configured:
        return configured
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    return min(2, os.cpu_count() or 1) if len(devices) == 1 and devices[0].platform == "cpu" else 1


@dataclasses.dataclass
class Task:
    """Rendered, tokenised rows: each has `prompt`, `prompt_ids`, `answer` (and `solution` if known)."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    prompt_len: int  # the prompt bucket every score batch uses
    clipped_prompts: int


def load_task(config: ml_collections.ConfigDict, tokenizer: Any) -> Task:
    d, r = config.data, config.rollout
    rows = load_rows(d, config.seed)
    clipped = 0

    def prepare(row: dict[str, str]) -> dict[str, Any]:
        nonlocal clipped
        prompt = render_prompt(tokenizer, row["problem"], system_prompt=d.system_prompt, chat_template=d.chat_template,
                               max_prompt_chars=d.max_prompt_chars, max_prompt_length=r.max_prompt_length)
        clipped += prompt.clipped
        ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"][-r.max_prompt_length:]
        return {**row, "prompt": prompt.text, "prompt_ids": ids}

    train = [prepare(row) for row in rows["train"]]
    evaluation = [prepare(row) for row in rows["eval"]]
    longest = max(len(row["prompt_ids"]) for row in train + evaluation)
    return Task(train, evaluation, scoring.bucket(longest, 16, r.max_prompt_length), clipped)


def objective_settings(config: ml_collections.ConfigDict) -> ObjectiveSettings:
    """The static objective settings from the config's objective, maxent and info_seed sections."""
    o, m, s = config.objective, config.maxent, config.info_seed
    low, high = resolve_epsilons(o.clip_range, o.epsilon_low, o.epsilon_high)
    return ObjectiveSettings(
        loss_type=o.loss_type,
        importance_sampling_level=o.importance_sampling_level,
        epsilon_low=low,
        epsilon_high=high,
        negative_adv_rule=o.negative_adv_rule,
        use_clip_objective=m.use_clip_objective,
        clip_objective_coef=m.clip_objective_coef,
        clip_adv_baseline=m.clip_adv_baseline,
        kl_estimator=o.kl_estimator,
        kl_bias_correction=o.kl_bias_correction,
        max_completion_length=config.rollout.max_completion_length,
        sampler_correction=o.sampler_correction,
        sampler_correction_max=o.sampler_correction_max,
        sampler_correction_min=o.sampler_correction_min,
        info_seed=InfoSeedSettings(
            num_seeds=s.num_seeds if s.enabled else 0, lambda_=s.lambda_ if s.enabled else 0.0,
            temperature=s.temperature, alpha_entropy=s.alpha_entropy if s.enabled else 0.0,
            loss_type=s.loss_type, entropy_mode=s.entropy_mode),
    )
