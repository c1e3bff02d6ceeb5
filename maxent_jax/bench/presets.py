"""Benchmark presets: a model shape plus the rollout shape of one RL step.

- `tiny`: the embedded default, read from configs/tiny.py (model.tiny, G, prompts per step,
  completion length), so the benchmark follows the default config when it changes.
- `small`: a Qwen2 shape (hidden 256, 4 layers, 4 heads of 64, 2 kv heads, MLP 768, vocab
  512, tied embeddings: 3.3M matmul parameters); 2 prompts x G=8 = 16 completions x 64 tokens.
- `qwen2_5_1_5b`: the Qwen2.5-1.5B shape with random weights in bfloat16 and cuDNN flash attention,
  without remat (16 x 1,024 tokens fit an 80 GB GPU; on an H100 that was the fastest of the five
  attention/remat settings measured, docs/benchmarks.md), for the `update` target's MFU and the
  1.5B `sampler` on a GPU (too large for a CPU run). `--model remat=true` etc. measure the others.

Every preset samples at temperature 1 with EOS ignored, so every completion has full length
and both sides of a comparison generate exactly the same number of tokens.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import ml_collections
import numpy as np

from maxent_jax.errors import UserError
from maxent_jax.model.config import ModelConfig

PRESETS = ("tiny", "small", "qwen2_5_1_5b")
NUM_SPECIAL_IDS = 3  # ids 0-2 of the offline tokenizer are pad / im_start / eos: never in synthetic prompts


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    prompts: int  # distinct prompts per step
    generations: int  # G completions per prompt
    new_tokens: int  # completion length (EOS ignored)
    prompt_len: int  # synthetic prompt length for the sampler / update targets
    logprob_chunk_size: int = 0  # 0 = the whole completion in one block
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # trainer config (dotted keys)

    @property
    def rows(self) -> int:
        return self.prompts * self.generations

    def describe(self) -> dict[str, Any]:
        m = self.model
        return {"model": f"{m.family} L{m.num_layers} D{m.hidden_size} H{m.num_heads}x{m.head_dim} "
                         f"KV{m.num_kv_heads} F{m.intermediate_size} V{m.vocab_size} {m.param_dtype}",
                "prompts": self.prompts, "G": self.generations, "completions": self.rows,
                "new_tokens": self.new_tokens, "prompt_len": self.prompt_len}

    def prompt_ids(self, seed: int = 0) -> list[list[int]]:
        """`prompts` synthetic prompts of `prompt_len` ordinary token ids (the same for every side)."""
        rng = np.random.default_rng(seed)
        ids = rng.integers(NUM_SPECIAL_IDS, self.model.vocab_size, size=(self.prompts, self.prompt_len))
        return ids.tolist()


def default_config() -> ml_collections.ConfigDict:
    """configs/tiny.py's get_config(): the embedded default run."""
    from maxent_jax.cli import DEFAULT_CONFIG

    spec = importlib.util.spec_from_file_location("maxent_jax_default_config", DEFAULT_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_preset(name: str) -> Preset:
    if name == "tiny":
        c = default_config()
        return Preset(
            name="tiny",
            model=ModelConfig.tiny(**dict(c.model.tiny)),
            prompts=c.train.per_device_train_batch_size * c.train.gradient_accumulation_steps,
            generations=c.rollout.num_generations,
            new_tokens=c.rollout.max_completion_length,
            prompt_len=40,
        )
    if name == "small":
        shape = dict(hidden_size=256, num_layers=4, num_heads=4, head_dim=64, num_kv_heads=2, intermediate_size=768)
        return Preset(
            name="small",
            model=ModelConfig.tiny(**shape),
            prompts=2,
            generations=8,
            new_tokens=64,
            prompt_len=40,
            config_overrides={**{f"model.tiny.{k}": v for k, v in shape.items()},
                              "train.per_device_train_batch_size": 2, "rollout.num_generations": 8,
                              "rollout.max_completion_length": 64,
                              # one group per piece is slower here (180 -> 194 ms per gradient on the CPU)
                              "train.gradient_chunks": 1},
        )
    if name == "qwen2_5_1_5b":
        model = ModelConfig(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
            num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
            attention_bias=True, max_position_embeddings=32768, family="qwen2", param_dtype="bfloat16",
            compute_dtype="bfloat16", attention="cudnn", eos_token_id=151645, pad_token_id=151643,
        )
        return Preset(name="qwen2_5_1_5b", model=model, prompts=2, generations=8, new_tokens=768, prompt_len=256,
                      logprob_chunk_size=256)
    raise UserError(f"--preset {name!r} is unknown; expected one of {', '.join(PRESETS)}")


def with_model_fields(preset: Preset, assignments: list[str]) -> Preset:
    """The preset with `FIELD=VALUE` changes to its ModelConfig (values parsed as the field's type)."""
    changes: dict[str, Any] = {}
    for item in assignments:
        name, sep, text = item.partition("=")
        if not sep or not hasattr(preset.model, name):
            raise UserError(f"--model {item!r} is invalid; expected FIELD=VALUE with FIELD a ModelConfig field")
        current = getattr(preset.model, name)
        if isinstance(current, bool):
            if text.lower() not in ("true", "false"):
                raise UserError(f"--model {item!r} is invalid; {name} is true or false")
            changes[name] = text.lower() == "true"
        elif isinstance(current, (int, float)):
            try:
                changes[name] = type(current)(text)
            except ValueError:
                kind = "an integer" if isinstance(current, int) else "a number"
                raise UserError(f"--model {item!r} is invalid; {name} is {kind}") from None
        else:
            changes[name] = text
    if not changes:
        return preset
    from maxent_jax.model.attention import check_attention_backend

    model = preset.model.replace(**changes)
    check_attention_backend(model.attention)
    return dataclasses.replace(preset, model=model)
