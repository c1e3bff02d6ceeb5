"""The trainer's rollouts through a rollout server, shaped like the in-process sampler's call.

`RemoteRollout.generate(params, prompt_ids, sampling, key)` returns what the embedded sampler's
generate function returns (completion ids, behaviour log-probs, stopped flags; prompt-major),
so the loop swaps one for the other; `maybe_push(params, step)` keeps the server's weights
current on the cadence of REFERENCE_SPEC 3.6: push when `step - last_pushed >=
sync_interval_steps` (0 = never), never twice for one step. Pushes carry the step as the
weight version, so every rollout reports its staleness in steps. A server that holds our own
model (the jax backend) gets the parameters in our layout, with no transposes
(`rollout/push_native_layout` = 1); others get HF's. A LoRA policy (`lora` set) pushes its
adapters alone where the server takes them (rollout/adapters.py), after its base in full once
(and again whenever the server holds another base: a restart, another trainer's push).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Sequence

import jax
import numpy as np

from maxent_jax.rollout.adapters import AdapterSpec
from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.client import RolloutClient
from maxent_jax.rollout.completions import RolloutError
from maxent_jax.rollout.protocol import LORA_LAYOUT, NATIVE_LAYOUT


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
    lora: Any = None  # LoRASettings of a LoRA policy; then `maybe_push` takes the LoRA decoder itself
    base_id: str | None = None  # the server's id of the base this client pushed (adapter pushes name it)
    # The weight version of every completion generated on each thread since its last
    # `take_versions()` (per thread: the rollout producer and an evaluation generate at once).
    _served: threading.local = dataclasses.field(default_factory=threading.local)

    def take_versions(self) -> list[int]:
        """The weight versions of this thread's completions since the last call, in order; clears them."""
        served, self._served.versions = getattr(self._served, "versions", []), []
        return served

    def maybe_push(self, params: Any, step: int) -> bool:
        """Push `params` if the cadence says so; True when it pushed (metrics in `self.metrics`).

        A LoRA policy passes its decoder (adapters and base): the server gets its adapters alone
        when it takes them and holds this client's base, else the base in full first; a server
        without adapter pushes (vLLM without LoRA) gets the merged weights.
        """
        self.step = step
        if self.sync_interval_steps <= 0 or step == self.last_pushed_step:
            return False
        if self.last_pushed_step is not None and step - self.last_pushed_step < self.sync_interval_steps:
            return False
        if self.lora is None:
            report = self.client.push_params(params, self.model_cfg, dtype=self.push_dtype, version=step)
        else:
            report = self._push_lora(params, step)
        self.last_pushed_step = step
        self.metrics.update({
            "rollout/push_seconds": report["seconds"],
            "rollout/push_gb_per_s": report["gb_per_s"],
            "rollout/push_bytes": report["bytes"],
            "rollout/push_native_layout": float(report["layout"] == NATIVE_LAYOUT),
        })
        if self.lora is not None:  # 1: the adapters alone; 0: the base (or the merged model) in full too
            adapter_only = report["layout"] == LORA_LAYOUT and "base_pushed" not in report
            self.metrics["rollout/push_adapter_only"] = float(adapter_only)
        return True

    def _push_lora(self, model: Any, step: int) -> dict[str, Any]:
        """The adapters (after the base in full, when the server lacks it), or the merged model."""
        from maxent_jax.model import lora_io  # jax and flax only on the trainer's side

        info = self.client.info()
        if LORA_LAYOUT not in (info.get("weight_layouts") or []):
            return self.client.push_params(lora_io.merged_state(model), self.model_cfg, dtype=self.push_dtype,
                                           version=step)
        base = None
        if self.base_id is None or info.get("base_id") != self.base_id:
            base = self.client.push_params(lora_io.base_state(model), self.model_cfg, dtype=self.push_dtype,
                                           version=step)
            self.base_id = base["base_id"]
        spec = AdapterSpec(self.lora.rank, self.lora.alpha, self.lora.targets, self.base_id)
        report = self.client.push_adapter(lora_io.peft_tensors(model), spec, version=step)
        if base is not None:  # this step's push is both: its cost is their sum
            report = {**report, **{k: base[k] + report[k] for k in ("seconds", "bytes")}, "base_pushed": True}
            report["gb_per_s"] = report["bytes"] / 1e9 / max(report["seconds"], 1e-9)
        return report

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
