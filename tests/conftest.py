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


def _session_compilation_cache() -> pathlib.Path | None:
    """A persistent compilation cache for this session only: every Trainer (and plan, sampler, ...)
    jits its programs afresh, so the tiny run's step, built again by dozens of tests, compiled every
    time. Now the first build writes it and the others load it. An entry is keyed by the program's
    HLO, the compile options and the jax/XLA versions and flags, so a hit is the program a compile
    would give. The directory is new per session (nothing carries over from a run of other code) and
    removed at its end; subprocesses keep their own cache (they do not inherit this setting). None in
    the vLLM environment, which has no jax (it runs the shared server tests on the vllm backend)."""
    try:
        import jax
    except ModuleNotFoundError:
        return None
    root = pathlib.Path(__file__).resolve().parents[1] / "var" / "cache"
    root.mkdir(parents=True, exist_ok=True)
    cache = pathlib.Path(tempfile.mkdtemp(prefix="pytest-xla-", dir=root))
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return cache


_XLA_CACHE = _session_compilation_cache()


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE is not None:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)
