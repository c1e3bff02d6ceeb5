"""Qwen2.5-0.5B-Instruct: the settings its math recipes share (model, memory knobs, the OpenR1-Math task)."""

import ml_collections

from configs import openr1_math

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def shared_config() -> ml_collections.ConfigDict:
    """The OpenR1-Math task for Qwen2.5-0.5B-Instruct; recipes add one objective on top."""
    c = openr1_math.task_config(MODEL)
    # Sequence positions per block when gathering per-token log-probs over the
    # 151,936-token vocabulary: bounds the float32 logits buffer, the numbers are unchanged.
    c.model.logprob_chunk_size = 1024
    # The reference's 0.5B recipes (both objectives): shorter sequences, groups of 4, 200 steps.
    c.rollout.max_prompt_length = 1024
    c.rollout.max_completion_length = 512
    c.rollout.num_generations = 4
    c.train.max_steps = 200
    c.train.num_train_epochs = 1
    return c
