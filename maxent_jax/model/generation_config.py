"""The ids a completion stops at: what transformers and vLLM read, so our completions end where theirs do.

A model directory's `config.json` names one `eos_token_id`, but `generation_config.json` may list
several (Qwen2.5-Instruct: [151645, 151643], `<|im_end|>` and `<|endoftext|>`), and the tokenizer
may name yet another. transformers' `generate` and vLLM stop at every id of the generation config,
so the in-process sampler and the JAX rollout server take the union of all of them, plus
`<|im_end|>` when the vocabulary has it (the end of a chat turn, also for base models whose
generation config names only `<|endoftext|>`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maxent_jax.errors import UserError

FILENAME = "generation_config.json"
END_OF_TURN = "<|im_end|>"


def generation_eos_ids(model_dir: Path | None) -> list[int]:
    """`eos_token_id` of `model_dir/generation_config.json` (an id or a list), [] without the file."""
    path = None if model_dir is None else Path(model_dir) / FILENAME
    if path is None or not path.is_file():
        return []
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
        ids = value if isinstance(value, list) else [] if value is None else [value]
        return [int(i) for i in ids]
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise UserError(f"{path}: eos_token_id must be an integer or a list of integers ({err})") from None


def eos_token_ids(model_dir: Path | None, config_eos: int | None, tokenizer: Any) -> list[int]:
    """Sorted union of config.json's eos id, generation_config.json's, the tokenizer's and `<|im_end|>`."""
    ids = set(generation_eos_ids(model_dir))
    ids.update(t for t in (config_eos, getattr(tokenizer, "eos_token_id", None)) if t is not None)
    if tokenizer is not None and END_OF_TURN in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids(END_OF_TURN))
    return sorted(int(i) for i in ids)
