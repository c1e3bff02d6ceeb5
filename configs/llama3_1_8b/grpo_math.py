"""Llama-3.1-8B-Instruct, GRPO on OpenR1-Math with MATH-500 eval.

Reference recipe: configs/recipes/Llama3.1-8B-instruct/grpo/config_math.yaml.

Run from the repository root: python -m maxent_jax.train --config=configs/llama3_1_8b/grpo_math.py
"""

from configs import openr1_math
from configs.llama3_1_8b import base


def get_config():
    return openr1_math.grpo(base.shared_config())
