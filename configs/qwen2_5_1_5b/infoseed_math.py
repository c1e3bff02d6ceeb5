"""Qwen2.5-1.5B-Instruct, GRPO + InfoSeed on OpenR1-Math with MATH-500 eval.

Reference recipe: configs/recipes/Qwen2.5-1.5B-Instruct/infoseed/config_math.yaml.

Run from the repository root: python -m maxent_jax.train --config=configs/qwen2_5_1_5b/infoseed_math.py
"""

from configs import openr1_math
from configs.qwen2_5_1_5b import base


def get_config():
    return openr1_math.infoseed(base.shared_config())
