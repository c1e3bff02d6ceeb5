"""The transformers peer of the `sampler` target: `model.generate` on our exported weights."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from maxent_jax.bench.timing import Run, timed


def generate_run(model_dir: Path, prompts: Sequence[Sequence[int]], generations: int, new_tokens: int,
                 pad_id: int, eos_id: int | None, name: str, torch_threads: int | None = None,
                 dtype: str = "float32") -> Run:
    """A run of transformers `generate`: G samples per prompt at temperature 1, full length (EOS suppressed).

    `min_new_tokens = max_new_tokens` keeps EOS out, `top_k=0` turns off transformers' default
    top-k of 50, so the sampled distribution is the full softmax as on our side. Prompts must
    share one length (no padding). The model runs in `dtype` (our compute dtype) on the GPU when
    torch sees one, as ours does under jax, else on the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if torch_threads:
        torch.set_num_threads(torch_threads)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()
    input_ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)

    def generate():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_return_sequences=generations,
            pad_token_id=pad_id, eos_token_id=eos_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def run() -> dict[str, float]:
        with torch.inference_mode():
            seconds, out = timed(generate)
        tokens = (out.shape[1] - input_ids.shape[1]) * out.shape[0]
        return {name: tokens / seconds}

    return run
