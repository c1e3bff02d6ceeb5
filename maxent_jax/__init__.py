"""maxent-jax: GRPO and MaxEnt-GRPO reinforcement learning for language models in JAX/Flax."""

__version__ = "0.1.0"
