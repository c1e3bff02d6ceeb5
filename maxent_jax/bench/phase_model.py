"""The phase model of one RL step: what overlapping generation with the rest of the step gains.

A synchronous step runs its phases one after another - generation, scoring (rewards and the
reference log-probs), the update, the weight push - so it costs their sum. One step off
(bounded staleness 1), the rollout server generates the next batch while the trainer scores,
updates and pushes this one, so a step costs about the larger of generation and the rest; the
speedup is sum / max(generation, rest), at most 2 (when the two sides are equal). The model
assumes generation runs on its own devices at the measured speed and ignores host glue between
phases and the cost of overlapping itself (queueing, a push landing between generation batches).

`qwen2_5_1_5b_h100()` builds the phases from the H100 figures of docs/benchmarks.md;
`python -m maxent_jax.bench.phase_model` prints the table of docs/rollout.md ("Phase model"),
and a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses

# docs/benchmarks.md, "GPU figures (NVIDIA H100 80GB HBM3)", Qwen2.5-1.5B shape, one H100, bf16:
# `sampler --preset qwen2_5_1_5b`: 16 rows (2 prompts x G=8) x 768 new tokens after a 256-token prompt.
H100_GENERATION_S = 3.19
# `update --preset qwen2_5_1_5b`: one loss + grad + AdamW step over the same 16 rows of 1,024 tokens
# (cuDNN attention, no remat: the preset's row).
H100_UPDATE_S = 0.340
# Not measured on the H100: the reference log-probs are one forward over the update's rows, 2 of the
# update's 6 x params x tokens FLOPs, so update / 3 at the update's MFU (the CPU `small` preset
# measured reference / update = 0.053 / 0.196 = 0.27, the same order).
REFERENCE_FRACTION_OF_UPDATE = 1 / 3
# Rewards are host Python, the same on any machine: 0.3 ms per `small` step (docs/benchmarks.md).
REWARDS_S = 0.0003
# Not measured on the H100: a push of the bf16 weights at the loopback rates of `weight-sync`
# (jax server, native layout, 408 MB): 3.52 GB/s idle, 1.61 GB/s at load 3.5 (both CPU machines).
QWEN2_5_1_5B_PARAMS = 1.54e9
PUSH_GB_PER_S = (3.52, 1.61)


@dataclasses.dataclass(frozen=True)
class Phases:
    """Seconds per RL step of each phase."""

    generation: float
    scoring: float  # rewards + reference log-probs
    update: float
    push: float

    @property
    def rest(self) -> float:
        """What the trainer does while the server generates the next batch."""
        return self.scoring + self.update + self.push

    @property
    def synchronous(self) -> float:
        return self.generation + self.rest

    @property
    def overlapped(self) -> float:
        return max(self.generation, self.rest)

    @property
    def speedup(self) -> float:
        return self.synchronous / self.overlapped


def qwen2_5_1_5b_h100(push_gb_per_s: float) -> Phases:
    """The Qwen2.5-1.5B step on one H100 (16 rows), from docs/benchmarks.md and the estimates above."""
    push_bytes = QWEN2_5_1_5B_PARAMS * 2  # bfloat16
    return Phases(generation=H100_GENERATION_S,
                  scoring=REWARDS_S + H100_UPDATE_S * REFERENCE_FRACTION_OF_UPDATE,
                  update=H100_UPDATE_S,
                  push=push_bytes / (push_gb_per_s * 1e9))


def markdown_table() -> str:
    """The table docs/rollout.md shows: one row per push rate."""
    lines = ["| push rate | generation | scoring | update | push | synchronous step | overlapped step | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for rate in PUSH_GB_PER_S:
        p = qwen2_5_1_5b_h100(rate)
        lines.append(f"| {rate:.2f} GB/s | {p.generation:.2f} s | {p.scoring:.3f} s | {p.update:.3f} s | "
                     f"{p.push:.2f} s | {p.synchronous:.2f} s | {p.overlapped:.2f} s | **{p.speedup:.2f}x** |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
