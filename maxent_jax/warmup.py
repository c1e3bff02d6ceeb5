"""The supervised warm-up before RL (`train.sft_warmup_steps`): the dataset's worked solutions.

It teaches the tiny default policy the answer format, so RL starts from rewards that vary.
It trains with its own optimizer (constant `train.sft_learning_rate`) and its own train state,
on a stream of the rows that have a solution; RL's optimizer state starts fresh afterwards.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from maxent_jax import optimizer as optimizer_lib
from maxent_jax import scoring
from maxent_jax.data.stream import BatchStream
from maxent_jax.errors import UserError
from maxent_jax.model import lora as lora_lib
from maxent_jax.parallel.train_step import init_train_state, make_train_step
from maxent_jax.policy import sft_loss
from maxent_jax.run_setup import Policy, Task


def supervised_warmup(config: ml_collections.ConfigDict, policy: Policy, task: Task, params: Any, mesh: Mesh,
                      rules: Any, *, rows_per_step: int, say: Callable[[str], None],
                      should_stop: Callable[[], bool]) -> Any | None:
    """`train.sft_warmup_steps` supervised steps from `params`; the parameters RL starts from.

    A LoRA policy warms up its base (merged with the adapters, split on `lora.BASE`), written back
    into `policy.rest`; its adapters, `params`, come back unchanged. `should_stop` is asked after
    every step: True (a SIGTERM) ends the warm-up there and returns None, without a checkpoint
    (there is no RL state yet; a rerun warms up again).
    """
    c = config
    if not any("solution" in row for row in task.train):
        raise UserError(
            f"config field train.sft_warmup_steps={c.train.sft_warmup_steps} needs worked solutions: the dataset "
            f"has no non-empty {c.data.dataset_worked_solution_column!r} column "
            "(data.dataset_worked_solution_column names it); set train.sft_warmup_steps=0 or name the column")
    solved = [row for row in task.train if "solution" in row]
    tok = policy.tokenizer
    end = eos_suffix(tok)
    opt, _ = optimizer_lib.make_optimizer(
        ml_collections.ConfigDict(dict(c.optim.to_dict(), learning_rate=c.train.sft_learning_rate,
                                       lr_scheduler_type="constant", warmup_steps=0, warmup_ratio=0.0)),
        c.train.sft_warmup_steps)
    graphdef, trained, rest = policy.graphdef, params, policy.rest
    if policy.lora is not None:  # the warm-up trains the base; the adapters start on the result
        graphdef, trained, rest = nnx.split(nnx.merge(graphdef, params, rest), lora_lib.BASE, ...)
    state = init_train_state(trained, opt, mesh, rules)
    step_fn = make_train_step(graphdef, rest, state, opt, sft_loss(c.model.logprob_chunk_size), mesh, rules,
                              gradient_chunks=c.train.gradient_chunks)
    stream = BatchStream(solved, rows_per_step, c.seed + 1)
    say(f"supervised warm-up: {c.train.sft_warmup_steps} steps of {rows_per_step} solutions")
    for i in range(c.train.sft_warmup_steps):
        rows = stream.next()
        solutions = [tok(r["solution"] + end, add_special_tokens=False)["input_ids"] for r in rows]
        batch = scoring.build_score_batch(
            [r["prompt_ids"] for r in rows], solutions, prompt_len=task.prompt_len,
            completion_len=scoring.bucket(max(map(len, solutions)), 8, c.rollout.max_completion_length),
            pad_id=policy.pad_id)
        state, metrics = step_fn(state, {k: jnp.asarray(v)[None, :, None] for k, v in batch.items()})
        if (i + 1) % max(1, c.train.sft_warmup_steps // 10) == 0:
            say(f"  warm-up step {i + 1}/{c.train.sft_warmup_steps}: nll {float(metrics['sft/nll']):.3f}")
        if should_stop():
            say(f"preempted during the supervised warm-up (step {i + 1}/{c.train.sft_warmup_steps}): "
                "nothing to save before the first RL step; rerun the same command to start again")
            return None
    if policy.lora is not None:
        lora_lib.write_base(policy.rest, state.params)
        return params
    return state.params


def eos_suffix(tokenizer: Any) -> str:
    """The end-of-turn token a worked solution ends with, so the model learns to stop."""
    return "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else (tokenizer.eos_token or "")
