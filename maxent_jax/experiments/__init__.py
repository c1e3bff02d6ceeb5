"""Reproducible experiments that answer a question about the algorithms, on the CPU, from one command.

`python -m maxent_jax.experiments diversity`: does MaxEnt-GRPO keep more distinct right answers
(higher pass@k at equal pass@1) than GRPO? (`diversity.py`; arms in `arms.py`; table and plots
in `report.py`; the published result in docs/experiments.md.)
"""
