"""Test-wide setup: 8 host CPU devices so the real (data, fsdp, tensor) mesh can be exercised.

XLA reads the flag once, at backend initialisation, so it must be set before jax is imported.
Single-device tests simply run on jax.devices()[0].
"""

import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (after the flags above)

# A persistent compilation cache for this session only: every Trainer (and plan, sampler, ...) jits
# its programs afresh, so the tiny run's step, built again by dozens of tests, compiled every time.
# Now the first build writes it and the others load it. An entry is keyed by the program's HLO, the
# compile options and the jax/XLA versions and flags, so a hit is the program a compile would give.
# The directory is new per session (nothing carries over from a run of other code) and removed at
# its end; subprocesses keep their own cache (they do not inherit this setting).
_XLA_CACHE = pathlib.Path(__file__).resolve().parents[1] / "var" / "cache"
_XLA_CACHE.mkdir(parents=True, exist_ok=True)
_XLA_CACHE = pathlib.Path(tempfile.mkdtemp(prefix="pytest-xla-", dir=_XLA_CACHE))
jax.config.update("jax_compilation_cache_dir", str(_XLA_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)
