"""Device mesh, logical-axis sharding rules, the sharded train step and forwards, multi-host start.

See docs/parallelism.md. Modules: mesh (the ('data', 'fsdp', 'tensor') mesh), rules (the one
logical-axis table and the shardings derived from it), train_step, forward (reference /
old-policy log-probs), next_token_loss, distributed (jax.distributed from Slurm), flops (MFU).
"""
