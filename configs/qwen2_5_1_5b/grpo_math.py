"""Qwen2.5-1.5B-Instruct, GRPO on OpenR1-Math with MATH-500 eval.

Reference recipe: configs/recipes/Qwen2.5-1.5B-Instruct/grpo/config_math.yaml.

Run from the repository root: python -m maxent_jax.train --config=configs/qwen2_5_1_5b/grpo_math.py
"""

from configs import openr1_math
from configs.qwen2_5_1_5b import base


def get_config():
    return openr1_math.grpo(base.shared_config())
