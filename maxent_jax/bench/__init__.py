"""Throughput benchmarks with peers side by side: `python -m maxent_jax.bench TARGET`.

One module per target (`train_step`, `update`, `sampler`, `weight_sync`, `e2e`), the peers
that need torch in their own modules (`hf_peer`, `trl_peer`; `vllm_peer` runs inside the
vLLM environment), and `report` for the machine description, statistics, tables and JSON.
docs/benchmarks.md lists every figure measured with it. Importing this package imports
neither jax nor torch.
"""
