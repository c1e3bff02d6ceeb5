"""The TRL peer of the `train-step` target: `trl.GRPOTrainer` on our exported initial weights.

Same model (our weights through the HF export), same tokenizer, the same prompt texts in the
same order as our run's prompt stream, same G, completion length, prompts per step,
temperature, beta, learning rate and reward function (our scorer, called from TRL's reward
hook), and the same activation recompute: gradient checkpointing follows our `model.remat`
(TRL's GRPOConfig turns it on by default, which re-runs every layer's forward in the backward:
about 0.15 s of TRL's 0.8 s `small` step on the 2-core CPU). EOS is kept out with
`min_new_tokens`, so every completion has full length; vLLM, logging, saving and dataset
shuffling are off. It trains on the GPU when torch sees one (as ours does under jax), else on the
CPU. One run = one optimizer step: a callback times the step from `on_step_begin` to
`on_step_end` (generation, reward, reference forward, loss, backward and optimizer step all fall
inside), and the reward hook counts the completion tokens.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from maxent_jax.bench.presets import Preset
from maxent_jax.bench.timing import Run


class TrlPeer:
    def __init__(self, model_dir: Path, prompts: Sequence[str], answers: Sequence[str], preset: Preset, *,
                 beta: float, learning_rate: float, gradient_checkpointing: bool, scorer: Any,
                 torch_threads: int | None):
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback, TrainerCallback
        from transformers.utils import logging as hf_logging
        from trl import GRPOConfig, GRPOTrainer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []
        peer = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                peer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                peer.step_seconds.append(time.perf_counter() - peer._start)

        def reward(prompts, completions, completion_ids, answer, **kwargs) -> list[float]:
            peer.step_tokens.append(sum(len(ids) for ids in completion_ids))
            utilities, _ = scorer(list(completions), list(answer), is_eval=False)
            return [float(u) for u in utilities]

        reward.__name__ = "maxent_jax_reward"
        self._out = tempfile.TemporaryDirectory(prefix="maxent-bench-trl-")
        args = GRPOConfig(
            output_dir=self._out.name, per_device_train_batch_size=preset.rows, gradient_accumulation_steps=1,
            num_generations=preset.generations, max_completion_length=preset.new_tokens, temperature=1.0,
            top_p=1.0, top_k=0, beta=beta, learning_rate=learning_rate, max_steps=1, num_iterations=1,
            generation_kwargs={"min_new_tokens": preset.new_tokens}, shuffle_dataset=False, use_vllm=False,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), gradient_checkpointing=gradient_checkpointing,
            bf16=False, seed=0, dataloader_num_workers=0, log_level="error",
        )
        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
        dataset = Dataset.from_dict({"prompt": list(prompts), "answer": list(answers)})
        self.trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                                   processing_class=tokenizer, callbacks=[StepTimer()])
        for callback in (PrinterCallback, ProgressCallback):  # train() would print a summary per call
            self.trainer.remove_callback(callback)

    def run(self, tokens_name: str, seconds_name: str) -> Run:
        def one() -> dict[str, float]:
            self.trainer.train()  # max_steps=1: one step; model weights carry over between calls
            seconds, tokens = self.step_seconds[-1], self.step_tokens[-1]
            return {tokens_name: tokens / seconds, seconds_name: seconds}

        return one

    def close(self) -> None:
        self._out.cleanup()
