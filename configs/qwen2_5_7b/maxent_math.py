"""Qwen2.5-7B, MaxEnt-GRPO on OpenR1-Math with MATH-500 eval.

Reference recipe: configs/recipes/Qwen2.5-7B/maxent-grpo/config_math.yaml.

Run from the repository root: python -m maxent_jax.train --config=configs/qwen2_5_7b/maxent_math.py
"""

from configs import openr1_math
from configs.qwen2_5_7b import base


def get_config():
    return openr1_math.maxent_meta(base.shared_config())
