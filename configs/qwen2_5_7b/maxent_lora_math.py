"""Qwen2.5-7B, MaxEnt-GRPO with LoRA adapters (rank 16, all projections) on OpenR1-Math.

The maxent_math recipe (with its meta-controller) with a frozen bfloat16 base and float32 adapters (configs/openr1_math.py,
`lora`); the reference's use_peft recipes map onto the same fields through --recipe.

Run from the repository root: python -m maxent_jax.train --config=configs/qwen2_5_7b/maxent_lora_math.py
"""

from configs import openr1_math
from configs.qwen2_5_7b import base


def get_config():
    return openr1_math.lora(openr1_math.maxent_meta(base.shared_config()))
