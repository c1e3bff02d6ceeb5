"""Each real-model recipe's combination of features trains on the CPU mesh: the recipe as shipped,
with only what a CPU cannot hold swapped out (the tiny model for the hub checkpoint, 'blocked' for
cuDNN attention, the in-process sampler for the vLLM server, the synthetic task for the hub
datasets, short sequences, one accumulation step, two RL steps).

Why: the features are tested one by one, and a combination none of them covers can still fail. Every
LoRA recipe did, at its first step: `model.remat` with a frozen LoRA base raised flax's
TraceContextError, which no test ran. What stays: the mesh, dtypes, remat, packing (forced to
buffers, so every step packs), gradient pieces, objective, controllers, InfoSeed, LoRA, and the
log-prob settings.
"""

from __future__ import annotations

import math

import pytest

from configs import tiny
from maxent_jax import cli, train
from tests.test_train_e2e import run

pytestmark = pytest.mark.slow

RECIPES = [
    # MaxEnt with the meta-controller, bf16, remat, gradient pieces of each prompt's 16 completions
    # (one prompt per device), no server log-probs.
    "configs/qwen2_5_7b/maxent_math.py",
    # GRPO with InfoSeed's seed completions and its pooled hidden states on packed buffers.
    "configs/qwen2_5_1_5b/infoseed_math.py",
    # MaxEnt on LoRA adapters over a frozen bf16 base, remat, 2 gradient pieces.
    "configs/qwen2_5_1_5b/maxent_lora_math.py",
]


def cpu_sized(recipe: str):
    fv, _ = cli.parse(train.define_flags, ["train", f"--config={recipe}"])
    config = train.resolve_config(fv)
    small = tiny.get_config()
    config.model.name_or_path = ""
    config.model.tiny = small.model.tiny
    config.model.attention = "blocked"
    config.data = small.data
    config.data.synthetic.num_train, config.data.synthetic.num_eval = 64, 8
    config.rollout.backend = "sampler"
    config.rollout.max_prompt_length, config.rollout.max_completion_length = 48, 24
    config.train.gradient_accumulation_steps = 1
    config.train.max_steps, config.train.sft_warmup_steps = 2, 0
    config.train.pack_length = 128
    config.eval.do_eval = False
    config.checkpoint.save_steps, config.checkpoint.export_final = 0, False
    config.logging.wandb, config.logging.progress = "disabled", False
    return config


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_recipes_features_train_together_on_the_cpu_mesh(recipe, tmp_path):
    records = [r for r in run(cpu_sized(recipe), tmp_path) if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["train/pack/packed"] == 1.0 for r in records)
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in records)
