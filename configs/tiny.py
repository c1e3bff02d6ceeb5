"""The embedded default: a tiny decoder, the offline tokenizer and synthetic arithmetic.

`python -m maxent_jax.train` with no flags runs this. A random model scores 0 (it cannot even
produce the `<think>/<answer>` format), so a short supervised warm-up on worked solutions
teaches the format and most sums; MaxEnt-GRPO then sharpens the policy on its own samples.
The whole run fits in a few minutes on two CPU cores (README: the measured curve).
"""

from maxent_jax.config import get_base_config


def get_config():
    c = get_base_config()
    c.model.name_or_path = ""
    c.data.dataset_name = "synthetic:arithmetic"
    c.data.synthetic.operators = "+"
    c.rollout.backend = "sampler"
    c.rollout.num_generations = 8
    c.rollout.max_prompt_length = 48
    c.rollout.max_completion_length = 24
    c.rollout.temperature = 0.7
    c.rollout.top_p = 1.0
    c.objective.train_grpo_objective = False
    c.objective.beta = 0.02
    c.maxent.tau = 0.05
    c.maxent.q_temperature = 0.5
    # A stronger clipped-surrogate term (A = w - 1/K) pushes wrong answers down, not only
    # correct ones up; with the weighted likelihood alone the tiny model sharpens slowly.
    c.maxent.clip_objective_coef = 4.0
    c.optim.learning_rate = 3e-4
    c.optim.max_grad_norm = 1.0
    c.optim.lr_scheduler_type = "constant"
    c.train.max_steps = 100
    c.train.per_device_train_batch_size = 16
    c.train.gradient_accumulation_steps = 1
    # The update's activations (16 prompts x 8 completions) overflow a CPU's last-level cache; in two
    # pieces they fit: the same gradient, the update about 20% faster on the 2-core bench machine
    # (docs/benchmarks.md).
    c.train.gradient_chunks = 2
    c.train.sft_warmup_steps = 150
    c.train.sft_learning_rate = 3e-3
    c.checkpoint.save_steps = 50
    c.eval.eval_steps = 50
    c.eval.per_device_eval_batch_size = 32
    c.logging.wandb = "disabled"
    return c
