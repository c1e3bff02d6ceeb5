"""The machine's measured matmul rate: the denominator of "fraction of the machine used".

A CPU has no spec-sheet peak that JAX reaches, so the reference is what XLA itself achieves
on one large square float32 matmul here, now (under the same shared load as the benchmark).
On a GPU the probe is a bfloat16 matmul large enough to fill the chip: the rate its matrix
units really reach, which sits below the spec-sheet peak that MFU divides by.
"""

from __future__ import annotations

from maxent_jax.bench.report import Figure, load_average
from maxent_jax.bench.timing import timed

# (dtype, size) of the probe per platform: CPU in the models' float32, GPU in bfloat16.
PROBE_SHAPES = {"cpu": ("float32", 1024), "gpu": ("bfloat16", 8192)}


def probe_label() -> str:
    """What the probe measures on this platform, e.g. "fp32 matmul" (names the ratio derived from it)."""
    dtype, _ = _probe_shape()
    return f"{'fp32' if dtype == 'float32' else 'bf16'} matmul"


def _probe_shape() -> tuple[str, int]:
    import jax

    return PROBE_SHAPES.get(jax.devices()[0].platform, PROBE_SHAPES["cpu"])


def matmul_probe(repeats: int = 5) -> Figure:
    """GFLOP/s of a jitted square matmul (2 * size**3 FLOPs per call) in the platform's probe dtype."""
    import jax
    import jax.numpy as jnp

    dtype, size = _probe_shape()
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    matmul(a, b).block_until_ready()
    before = load_average()
    samples = []
    for _ in range(repeats):
        seconds, _ = timed(lambda: matmul(a, b).block_until_ready())
        samples.append(2 * size**3 / seconds / 1e9)
    return Figure(f"{probe_label()} probe", "GFLOP/s", samples, (before, load_average()), {"size": size, "dtype": dtype})


# Dense bfloat16 peak FLOP/s per device by jax device_kind, for MFU on accelerators.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The device's dense bf16 peak, if known (H100 / H200 / A100 families match by prefix)."""
    if device_kind in PEAK_BF16_FLOPS:
        return PEAK_BF16_FLOPS[device_kind]
    for prefix, value in (("NVIDIA H100", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100", 312e12)):
        if device_kind.startswith(prefix):
            return value
    return None
