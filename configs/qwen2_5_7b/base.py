"""Qwen2.5-7B: the settings its math recipes share (model, memory knobs, the OpenR1-Math task)."""

import ml_collections

from configs import openr1_math

MODEL = "Qwen/Qwen2.5-7B"


def shared_config() -> ml_collections.ConfigDict:
    """The OpenR1-Math task for Qwen2.5-7B; recipes add one objective on top."""
    c = openr1_math.task_config(MODEL)
    # Sequence positions per block when gathering per-token log-probs over the
    # 152,064-token vocabulary: bounds the float32 logits buffer, the numbers are unchanged.
    c.model.logprob_chunk_size = 512
    return c
