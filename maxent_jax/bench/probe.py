"""The machine's measured float32 matmul rate: the denominator of "fraction of the machine used".

A CPU has no spec-sheet peak that JAX reaches, so the reference is what XLA itself achieves
on one large square float32 matmul here, now (under the same shared load as the benchmark).
"""

from __future__ import annotations

from maxent_jax.bench.report import Figure, load_average
from maxent_jax.bench.timing import timed

PROBE_NAME = "fp32 matmul probe"


def matmul_probe(size: int = 1024, repeats: int = 5) -> Figure:
    """GFLOP/s of a jitted `[size, size] @ [size, size]` float32 matmul (2 * size**3 FLOPs per call)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    matmul(a, b).block_until_ready()
    before = load_average()
    samples = []
    for _ in range(repeats):
        seconds, _ = timed(lambda: matmul(a, b).block_until_ready())
        samples.append(2 * size**3 / seconds / 1e9)
    return Figure(PROBE_NAME, "GFLOP/s", samples, (before, load_average()), {"size": size})


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
