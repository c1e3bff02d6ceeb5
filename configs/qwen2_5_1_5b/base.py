"""Qwen2.5-1.5B-Instruct: the settings its math recipes share (model, memory knobs, the OpenR1-Math task)."""

import ml_collections

from configs import openr1_math

MODEL = "Qwen/Qwen2.5-1.5B-Instruct"


def shared_config() -> ml_collections.ConfigDict:
    """The OpenR1-Math task for Qwen2.5-1.5B-Instruct; recipes add one objective on top."""
    c = openr1_math.task_config(MODEL)
    # Sequence positions per block when gathering per-token log-probs over the
    # 151,936-token vocabulary: bounds the float32 logits buffer, the numbers are unchanged.
    c.model.logprob_chunk_size = 1024
    # Two prompts per device are 32 rows of 4,144 tokens (105 GB per device in one piece): the
    # gradient in 2 pieces of each prompt's completions (the same gradient) fits 80 GB (docs/plans/).
    # The InfoSeed recipe takes its gradient whole (its InfoNCE term compares rows) and uses
    # smaller micro-batches instead (`openr1_math.infoseed`).
    c.train.gradient_chunks = 2
    return c
