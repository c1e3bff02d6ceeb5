"""Qwen2.5-7B, GRPO + InfoSeed on OpenR1-Math with MATH-500 eval.

Reference recipe: configs/recipes/Qwen2.5-7B/infoseed/config_math.yaml.

Run from the repository root: python -m maxent_jax.train --config=configs/qwen2_5_7b/infoseed_math.py
"""

from configs import openr1_math
from configs.qwen2_5_7b import base


def get_config():
    c = openr1_math.infoseed(base.shared_config())
    c.controller_meta.lr = 0.05  # the 7B InfoSeed recipe's meta learning rate (1.5B: 0.02)
    return c
