"""Llama-3.1-8B-Instruct: the settings its math recipes share (model, memory knobs, the OpenR1-Math task)."""

import ml_collections

from configs import openr1_math

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def shared_config() -> ml_collections.ConfigDict:
    """The OpenR1-Math task for Llama-3.1-8B-Instruct; recipes add one objective on top."""
    c = openr1_math.task_config(MODEL)
    # Sequence positions per block when gathering per-token log-probs over the
    # 128,256-token vocabulary: bounds the float32 logits buffer, the numbers are unchanged.
    c.model.logprob_chunk_size = 512
    # Two prompts per device are 32 rows of 4,144 tokens: the gradient in 8 pieces of each prompt's
    # completions (4 rows at a time, the same gradient) keeps the update under 80 GB per device
    # (226 GB in one piece; docs/plans/, docs/planning.md).
    c.train.gradient_chunks = 8
    # The reference's Llama recipe is an older PPO-style file (vLLM colocated, eval off, critic
    # keys its loader drops, Q2; spec 14 does not resolve it). This recipe runs the shared
    # OpenR1-Math settings instead, so it compares directly with the Qwen GRPO recipes.
    return c
