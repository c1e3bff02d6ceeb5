"""The embedded default: a tiny decoder, the offline tokenizer and synthetic arithmetic.

`python -m maxent_jax.train` with no flags runs this. A short supervised warm-up teaches the
random model the `<think>/<answer>` format, then MaxEnt-GRPO raises the reward on two CPU cores
within minutes.
"""

from maxent_jax.config import get_base_config


def get_config():
    c = get_base_config()
    c.model.name_or_path = ""
    c.data.dataset_name = "synthetic:arithmetic"
    c.rollout.backend = "sampler"
    c.rollout.num_generations = 8
    c.rollout.max_prompt_length = 48
    c.rollout.max_completion_length = 24
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.objective.train_grpo_objective = False
    c.objective.beta = 0.02
    c.maxent.tau = 0.1
    c.maxent.q_temperature = 0.5
    c.optim.learning_rate = 3e-4
    c.optim.max_grad_norm = 1.0
    c.optim.lr_scheduler_type = "constant"
    c.train.max_steps = 60
    c.train.per_device_train_batch_size = 8
    c.train.gradient_accumulation_steps = 1
    c.train.sft_warmup_steps = 150
    c.train.sft_learning_rate = 3e-3
    c.checkpoint.save_steps = 20
    c.eval.eval_steps = 20
    c.eval.per_device_eval_batch_size = 32
    c.logging.wandb = "disabled"
    return c
