"""Qwen2.5-0.5B-Instruct, MaxEnt-GRPO on OpenR1-Math with MATH-500 eval.

Reference recipe: configs/recipes/Qwen2.5-0.5B-Instruct/maxent-grpo/config_math.yaml.

Run from the repository root: python -m maxent_jax.train --config=configs/qwen2_5_0_5b/maxent_math.py
"""

from configs import openr1_math
from configs.qwen2_5_0_5b import base


def get_config():
    return openr1_math.maxent(base.shared_config())
