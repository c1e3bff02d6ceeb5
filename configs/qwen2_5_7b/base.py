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
    # The reference's 7B recipes (both objectives): beta 0.04, one prompt per micro-batch with
    # 2 accumulation steps, 4096-token completions, no server log-probs (the ratio's
    # denominator is then the stop-gradient of the current log-probs, spec 5.4). Its eval
    # cadence was 500 steps; we keep the shared 25 (--config.eval.eval_steps=500 restores it).
    c.objective.beta = 0.04
    c.train.per_device_train_batch_size = 1
    c.train.gradient_accumulation_steps = 2
    # One prompt per device is 16 rows of 2,096 + 4,096 tokens (99,072 per device): its update
    # planned at 165 GB per device. The gradient in 4 pieces of each prompt's completions (4 rows
    # at a time, the same gradient) plans under 80 GB (docs/plans/, docs/planning.md).
    c.train.gradient_chunks = 4
    c.rollout.max_completion_length = 4096
    c.vllm.return_logprobs = False
    return c
