"""How much work one /generate request may ask of a rollout server, and how a client splits to fit.

Pure host code (no jax, no HTTP), shared by the server, which refuses what is over a limit, and
the client, which cuts a request that would be refused into pieces that fit.

Why limits: the engine runs one request at a time (the server's engine lock makes weight pushes
atomic), so a request's size is how long everyone else waits, and the jax backend allocates
its whole KV cache up front (rows x positions). Unbounded, `n=200000` held the engine for 91 s
while a one-completion request waited 85 s, and 200k one-token prompts in a 1 MB body tried to
allocate 16.6 GB. Two numbers bound a request:

- completions: prompts x n (each is a row of the batch and an object in the answer);
- tokens: n x sum over prompts of (prompt tokens + max_tokens), the positions the engine
  may have to hold and compute (what the KV cache is sized by).

The token bound's default scales with the model's own limit, `max_model_len` (one sequence),
times how many full-length sequences the backend takes in one request
(`default_request_sequences`): 64 for the jax backend, which allocates a request's whole KV
cache at once; 1024 for vLLM, whose paged cache and scheduler keep memory bounded whatever
the request, and which needs big requests to keep its batch full (the shipped recipes send
thousands of completions per step: split into pieces of about 1024 sequences, each still fills
vLLM's default 256 running sequences). Completions: at most 8192.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from maxent_jax.rollout.protocol import SEED_LIMIT, ProtocolError

DEFAULT_MAX_COMPLETIONS = 8192
DEFAULT_SEQUENCES_PER_REQUEST = 64
DEFAULT_MAX_QUEUED = 64
DEFAULT_READ_TIMEOUT_S = 60.0
# The token bound of a backend that reports no max_model_len.
_FALLBACK_MAX_MODEL_LEN = 1 << 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """The per-request bounds a server enforces (`GET /info` lists them under `limits`)."""

    max_completions_per_request: int
    max_request_tokens: int
    max_queued_requests: int = DEFAULT_MAX_QUEUED

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field.name}={value!r}: must be an integer >= 1")

    @classmethod
    def for_backend(
        cls,
        backend: Any,
        *,
        max_completions_per_request: int | None = None,
        max_request_tokens: int | None = None,
        max_queued_requests: int | None = None,
    ) -> "RequestLimits":
        """A backend's defaults (from its `max_model_len` and `default_request_sequences`); a value given wins."""
        max_model_len = int(backend.info().get("max_model_len") or _FALLBACK_MAX_MODEL_LEN)
        sequences = int(getattr(backend, "default_request_sequences", DEFAULT_SEQUENCES_PER_REQUEST))
        return cls(
            max_completions_per_request=max_completions_per_request or DEFAULT_MAX_COMPLETIONS,
            max_request_tokens=max_request_tokens or sequences * max_model_len,
            max_queued_requests=max_queued_requests or DEFAULT_MAX_QUEUED,
        )

    def as_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def check(self, prompt_lengths: Sequence[int], n: int, max_tokens: int) -> None:
        """Refuse (413, naming the limit, its value and its flag) a request over either bound."""
        completions = len(prompt_lengths) * n
        if completions > self.max_completions_per_request:
            raise ProtocolError(
                f"request asks for {completions} completions ({len(prompt_lengths)} prompts x n={n}); this server allows "
                f"at most max_completions_per_request={self.max_completions_per_request} (--max-completions-per-request): "
                "split it into smaller requests", 413, details={"limits": self.as_json()})
        tokens = request_tokens(prompt_lengths, n, max_tokens)
        if tokens > self.max_request_tokens:
            raise ProtocolError(
                f"request needs {tokens} tokens (n={n} x sum over {len(prompt_lengths)} prompts of prompt tokens + "
                f"max_tokens={max_tokens}); this server allows at most max_request_tokens={self.max_request_tokens} "
                "(--max-request-tokens): split it into smaller requests", 413, details={"limits": self.as_json()})


def request_tokens(prompt_lengths: Sequence[int], n: int, max_tokens: int) -> int:
    """Positions a request may make the engine hold: n x sum(prompt tokens + max_tokens)."""
    return n * (sum(prompt_lengths) + len(prompt_lengths) * max_tokens)


def split_request(prompt_lengths: Sequence[int], n: int, max_tokens: int, limits: RequestLimits) -> list[tuple[int, int, int]]:
    """Pieces (first prompt, end prompt, completions per prompt) that each pass `limits.check`.

    Consecutive prompts are packed greedily, so the pieces concatenate to the request in prompt
    order. When one prompt's n completions do not fit, n is cut into parts of `part` (the
    largest that fits the longest prompt) and a remainder, and every prompt range is asked once
    per part. A request that fits is returned as one piece. Raises ValueError when even one
    completion of one prompt does not fit (the server would refuse it whatever the split).
    """
    longest = max(prompt_lengths)
    part = min(n, limits.max_completions_per_request, limits.max_request_tokens // (longest + max_tokens))
    if part < 1:
        raise ValueError(
            f"one completion of a {longest}-token prompt with max_tokens={max_tokens} needs {longest + max_tokens} tokens; "
            f"the server allows max_request_tokens={limits.max_request_tokens}")
    parts = [part] * (n // part) + ([n % part] if n % part else [])
    pieces = []
    for k in parts:
        start = 0
        while start < len(prompt_lengths):
            end, tokens = start, 0
            while end < len(prompt_lengths):
                cost = k * (prompt_lengths[end] + max_tokens)
                if (end - start + 1) * k > limits.max_completions_per_request or tokens + cost > limits.max_request_tokens:
                    break
                tokens, end = tokens + cost, end + 1
            pieces.append((start, end, k))
            start = end
    return pieces


def piece_seed(seed: int | None, index: int) -> int | None:
    """The seed of piece `index` of a split request: piece 0 keeps the request's seed (an unsplit
    request samples as before), later pieces get independent ones, so no two pieces repeat the
    same random stream (both backends derive a prompt's noise from the seed and its index)."""
    if seed is None or index == 0:
        return seed
    state = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) % SEED_LIMIT


def limits_from_json(obj: Any) -> RequestLimits | None:
    """The limits a server sent (`/info` or a 413 body), or None when it sent none we can read."""
    if not isinstance(obj, dict) or not isinstance(obj.get("limits"), dict):
        return None
    names = {f.name for f in dataclasses.fields(RequestLimits)}
    try:
        return RequestLimits(**{k: v for k, v in obj["limits"].items() if k in names})
    except (TypeError, ValueError):
        return None
