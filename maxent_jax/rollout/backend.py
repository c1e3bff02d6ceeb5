"""The contract every rollout backend fulfils (in-process JAX sampler, vLLM engine).

The HTTP server (`maxent_jax.serve`) speaks the protocol of docs/rollout.md and delegates
to one object of this shape, so the server, its validation and its tests are shared by
both backends; only generation and weight loading differ.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """What one generate request asks for; `n` completions per prompt."""

    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class Completion:
    """One sampled completion: its tokens, the sampler's per-token log-probs and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (EOS / stop string / stop token) or "length"
    # `logprobs` are the model's log-probs of the sampled tokens at temperature 1 over the full
    # vocabulary, under the weights that generated them: the "old policy" of the PPO ratio,
    # what vLLM reports by default. `sampling_logprobs`, when a backend provides them, are the
    # log-probs under the distribution actually sampled from (temperature, top-k, top-p applied).
    sampling_logprobs: list[float] | None = None


class RolloutBackend(Protocol):
    """A generation engine that can also take new weights while it runs."""

    def info(self) -> dict:
        """Model name, backend name, max prompt/total lengths; the server adds the weight version."""

    def generate(
        self, prompt_token_ids: list[list[int]], params: SamplingParams
    ) -> list[list[Completion]]:
        """`params.n` completions for each prompt, in prompt order."""

    def expected_weights(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """HF tensor name -> (shape, dtype name) that a weight push must match exactly.

        Dtype names as numpy spells them (`float32`, `bfloat16`, `float16`); a `torch.` prefix is ignored.
        """

    def load_weights(self, named_tensors: Iterable[tuple[str, np.ndarray]]) -> None:
        """Replace all weights at once; called with validated tensors, never interleaved with generate.

        A backend may also define `prepare_weight(name, array) -> object`: the server then calls
        it as each tensor of a push arrives (before the push is complete and validated, so it
        must not change what generate uses) and passes its results here instead of the arrays.

        A backend that takes pushes in more layouts than HF's lists them in a `weight_layouts`
        attribute (e.g. `("hf", "native")`, see protocol.WEIGHT_LAYOUTS); for a push in another
        layout than `hf` the server calls `expected_weights(layout=...)`,
        `prepare_weight(name, array, layout=...)` and `load_weights(..., layout=...)`, which
        such a backend must then define. One that lists `lora` (adapter-only pushes,
        rollout/adapters.py) defines `load_adapter(tensors, spec)` instead: apply PEFT-named
        adapters of an `AdapterSpec` to the base of its last full push (or its start), replacing
        any adapters applied before.
        """

    def reset_prefix_cache(self) -> None:
        """Forget cached attention computed with earlier weights."""

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of text prompts, as the engine itself would tokenize them.

        Called by the server only for requests that send `prompts` as strings; a backend
        without this method serves `prompt_token_ids` requests only (text prompts get a 400).
        """
