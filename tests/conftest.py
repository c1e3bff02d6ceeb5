"""Test-wide setup: 8 host CPU devices so the real (data, fsdp, tensor) mesh can be exercised.

XLA reads the flag once, at backend initialisation, so it must be set before jax is imported.
Single-device tests simply run on jax.devices()[0].
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
