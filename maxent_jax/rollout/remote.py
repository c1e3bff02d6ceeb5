"""The trainer's rollouts through a rollout server, shaped like the in-process sampler's call.

`RemoteRollout.generate(params, prompt_ids, sampling, key)` returns what the embedded sampler's
generate function returns (completion ids, behaviour log-probs, stopped flags; prompt-major),
so the loop swaps one for the other; `maybe_push(params, step)` keeps the server's weights
current on the cadence of REFERENCE_SPEC 3.6: push when `step - last_pushed >=
sync_interval_steps` (0 = never), never twice for one step. Pushes carry the step as the
weight version, so every rollout reports its staleness in steps. A server that holds our own
model (the jax backend) gets the parameters in our layout, with no transposes
(`rollout/push_native_layout` = 1); others get HF's.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Sequence

import jax
import numpy as np

from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.client import RolloutClient, RolloutError
from maxent_jax.rollout.protocol import NATIVE_LAYOUT


@dataclasses.dataclass
class RemoteRollout:
    """A RolloutClient plus the model config it pushes for and the push cadence."""

    client: RolloutClient
    model_cfg: Any  # ModelConfig of the pushed parameters
    sync_interval_steps: int = 1
    push_dtype: str | None = None  # None: the server's dtype (/info)
    max_rounds: int = 0
    retry_sleep: float = 0.5
    last_pushed_step: int | None = None
    step: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    # The weight version of every completion generated on each thread since its last
    # `take_versions()` (per thread: the rollout producer and an evaluation generate at once).
    _served: threading.local = dataclasses.field(default_factory=threading.local)

    def take_versions(self) -> list[int]:
        """The weight versions of this thread's completions since the last call, in order; clears them."""
        served, self._served.versions = getattr(self._served, "versions", []), []
        return served

    def maybe_push(self, params: Any, step: int) -> bool:
        """Push `params` if the cadence says so; True when it pushed (metrics in `self.metrics`)."""
        self.step = step
        if self.sync_interval_steps <= 0 or step == self.last_pushed_step:
            return False
        if self.last_pushed_step is not None and step - self.last_pushed_step < self.sync_interval_steps:
            return False
        report = self.client.push_params(params, self.model_cfg, dtype=self.push_dtype, version=step)
        self.last_pushed_step = step
        self.metrics.update({
            "rollout/push_seconds": report["seconds"],
            "rollout/push_gb_per_s": report["gb_per_s"],
            "rollout/push_bytes": report["bytes"],
            "rollout/push_native_layout": float(report["layout"] == NATIVE_LAYOUT),
        })
        return True

    def generate(
        self, params: Any, prompts: Sequence[Sequence[int]], sampling: SamplingParams, key: jax.Array
    ) -> tuple[list[list[int]], list[list[float]], np.ndarray]:
        """n completions per prompt from the server: (ids, behaviour log-probs, stopped), prompt-major.

        `params` is unused (the server holds the weights of the last push); `key` seeds the request.
        A group the server left short after `max_rounds` is an error: the trainer's batch has
        fixed groups of n.
        """
        del params
        seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
        batch = self.client.generate_groups(
            prompts, dataclasses.replace(sampling, seed=seed, logprobs=True),
            max_rounds=self.max_rounds, retry_sleep=self.retry_sleep, current_step=self.step,
        )
        short = [i for i, group in enumerate(batch.groups) if len(group) != sampling.n]
        if short:
            raise RolloutError(
                f"rollout server {self.client.url} returned {len(batch.groups[short[0]])} of {sampling.n} completions "
                f"for prompt {short[0]} ({len(short)} prompt(s) short) after {int(batch.metrics['rollout/rounds'])} round(s)"
            )
        self.metrics.update(batch.metrics)
        samples = [s for group in batch.groups for s in group]
        self._served.versions = getattr(self._served, "versions", []) + [s.weight_version for s in samples]
        return (
            [s.token_ids.tolist() for s in samples],
            [s.logprobs.tolist() for s in samples],
            np.array([s.finish_reason == "stop" for s in samples]),
        )
