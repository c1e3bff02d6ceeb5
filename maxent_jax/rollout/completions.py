"""The /generate exchange seen from the client: the request body, and the answer read into Samples.

The request side: the client tag this process sends and how long a text prompt may be.
What the trainer gets back (`Sample`, `RolloutBatch`) and the errors when a server cannot give
usable completions live here too, so the transport (`client.py`) and the parsing share them.
The tag policy (dropping, counting, refusing untagged answers) stays with the client, which
knows its tag and keeps the count; `parse_results` only sorts outputs by tag.
No jax here (the client imports this module).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

from maxent_jax.rollout.backend import SamplingParams

DEFAULT_PROMPT_CHAR_LIMIT = 2048


class RolloutError(RuntimeError):
    """The rollout server could not give usable completions; the message says which server and why."""


class ClientTagError(RolloutError):
    """Results missing our client_tag echo, or all of them tagged for another client."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One completion as the trainer consumes it."""

    token_ids: np.ndarray  # [len] int32
    logprobs: np.ndarray | None  # [len] float32: behaviour (old-policy) log-probs, temperature 1
    text: str
    finish_reason: str
    weight_version: int
    sampling_logprobs: np.ndarray | None = None  # [len] float32, under the sampled distribution


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """Completions regrouped per prompt (prompt order; a group may be short) and request metrics."""

    groups: list[list[Sample]]
    weight_version: int
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class ParsedResults:
    """A /generate answer sorted by tag: our completions per prompt, and what was not ours."""

    groups: list[list[Sample]]
    weight_version: int
    dropped: int  # results/outputs tagged for another client
    untagged: int  # outputs kept although they carry no tag at all


def resolve_client_tag(explicit: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """The tag this process sends: explicit/config -> $VLLM_CLIENT_TAG -> jax process -> SLURM -> rank-0-of-1.

    The jax process index is used only when this process already runs jax with several
    processes (the client never imports jax itself).
    """
    if explicit:
        return explicit
    if env.get("VLLM_CLIENT_TAG"):
        return env["VLLM_CLIENT_TAG"]
    jax = sys.modules.get("jax")
    if jax is not None and jax.process_count() > 1:
        return f"rank-{jax.process_index()}-of-{jax.process_count()}"
    if env.get("SLURM_PROCID"):
        return f"rank-{env['SLURM_PROCID']}-of-{env.get('SLURM_NTASKS', '1')}"
    return "rank-0-of-1"


def prompt_char_limit(max_prompt_length: int, env: Mapping[str, str] = os.environ) -> int:
    """max($MAX_PROMPT_CHARS or 2048, 4 * max_prompt_length) characters (REFERENCE_SPEC 2.2, 3.4)."""
    raw = env.get("MAX_PROMPT_CHARS") or str(DEFAULT_PROMPT_CHAR_LIMIT)
    try:
        floor = int(raw)
    except ValueError:
        raise ValueError(f"MAX_PROMPT_CHARS={raw!r}: expected an integer number of characters") from None
    return max(floor, 4 * max_prompt_length)


def generate_payload(prompts: Sequence, params: SamplingParams, client_tag: str, char_limit: int) -> tuple[dict, int]:
    """The JSON body (reference field names) and how many text prompts were clipped to `char_limit`."""
    payload: dict[str, Any] = {
        "n": params.n,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "seed": params.seed,
        "logprobs": 1 if params.logprobs else 0,
        "client_tag": client_tag,
        "request_id": f"maxent-{uuid.uuid4().hex}",
    }
    if all(isinstance(p, str) for p in prompts):
        clipped = [p[:char_limit] for p in prompts]
        payload["prompts"] = clipped
        n_clipped = sum(len(a) != len(b) for a, b in zip(prompts, clipped))
    else:
        payload["prompt_token_ids"] = [[int(t) for t in p] for p in prompts]
        n_clipped = 0
    return payload, n_clipped


def tag_of(obj: Any) -> str | None:
    """The client_tag a result or output echoes (top level or in its metadata), None if it has none."""
    if not isinstance(obj, dict):
        return None
    tag = obj.get("client_tag")
    if tag is None and isinstance(obj.get("metadata"), dict):
        tag = obj["metadata"].get("client_tag")
    return tag if isinstance(tag, str) else None


def parse_results(body: Any, num_prompts: int, params: SamplingParams, client_tag: str, where: str) -> ParsedResults:
    """Our completions of a /generate answer, regrouped per prompt; a malformed answer is a RolloutError naming `where`."""
    if not isinstance(body, dict) or not isinstance(body.get("results"), list):
        raise RolloutError(f"{where} answered without a 'results' list: {str(body)[:200]}")
    version = body.get("weight_version")
    if not isinstance(version, int):
        raise RolloutError(f"{where} answered without an integer 'weight_version': {version!r}")
    groups: list[list[Sample]] = [[] for _ in range(num_prompts)]
    dropped = untagged = 0
    results = body["results"]
    # A server that answers with one single-output result per completion (P*n results, no
    # prompt_index) is regrouped in consecutive blocks of n (REFERENCE_SPEC 3.4).
    flat = params.n > 1 and len(results) == num_prompts * params.n and not any(
        isinstance(r, dict) and "prompt_index" in r for r in results
    )
    for pos, result in enumerate(results):
        if not isinstance(result, dict) or not isinstance(result.get("outputs"), list):
            raise RolloutError(f"{where}: result {pos} is not an object with an 'outputs' list")
        result_tag = tag_of(result)
        if result_tag is not None and result_tag != client_tag:
            dropped += 1
            continue
        index = result.get("prompt_index", pos // params.n if flat else pos)
        if not isinstance(index, int) or not 0 <= index < num_prompts:
            raise RolloutError(f"{where}: result {pos} has prompt_index {index!r} for {num_prompts} prompts")
        for output in result["outputs"]:
            tag = tag_of(output) or result_tag
            if tag is None:
                untagged += 1
            elif tag != client_tag:
                dropped += 1
                continue
            groups[index].append(_sample(output, version, params, where))
    return ParsedResults(groups, version, dropped, untagged)


def _sample(output: Any, version: int, params: SamplingParams, where: str) -> Sample:
    ids = output.get("token_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise RolloutError(f"{where}: an output has no integer 'token_ids' list: {str(output)[:200]}")
    logprobs = output.get("logprobs")
    if params.logprobs:
        if not isinstance(logprobs, list) or len(logprobs) != len(ids):
            raise RolloutError(f"{where}: an output's 'logprobs' do not match its {len(ids)} tokens: {str(logprobs)[:200]}")
    sampling = output.get("sampling_logprobs")
    return Sample(
        token_ids=np.asarray(ids, dtype=np.int32),
        logprobs=np.asarray(logprobs, dtype=np.float32) if params.logprobs else None,
        text=str(output.get("text", "")),
        finish_reason=str(output.get("finish_reason")),
        weight_version=int(output.get("metadata", {}).get("weight_version", version)),
        sampling_logprobs=np.asarray(sampling, dtype=np.float32) if isinstance(sampling, list) else None,
    )
