"""Stop strings, applied on the host after decoding (token-level stops end rows inside the loop).

Semantics are vLLM's: the completion text ends just before the first stop string, and its
tokens end with the token that completed that string; the finish reason becomes "stop".
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from maxent_jax.rollout.sampler import SampleBatch

Decode = Callable[[Sequence[int]], str]


def stop_string_cut(token_ids: Sequence[int], stops: Sequence[str], decode: Decode) -> tuple[int, str] | None:
    """(tokens to keep, text) when the decoded completion contains a stop string, else None.

    Binary search over prefixes (a longer prefix decodes to a longer text), so a completion
    costs O(log n) decodes, not n.
    """
    if not stops or not any(stop in decode(token_ids) for stop in stops):
        return None
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(stop in decode(token_ids[:mid]) for stop in stops):
            hi = mid
        else:
            lo = mid + 1
    text = decode(token_ids[:lo])
    cut = min(text.find(stop) for stop in stops if stop in text)
    return lo, text[:cut]


def apply_stop_strings(batch: SampleBatch, stops: Sequence[str], decode: Decode, pad_id: int) -> tuple[SampleBatch, list[str]]:
    """The batch with rows cut at their first stop string (lengths, stopped, pad tails), and every row's text."""
    tokens, logprobs, sampling = batch.tokens.copy(), batch.logprobs.copy(), batch.sampling_logprobs.copy()
    lengths, stopped = batch.lengths.copy(), batch.stopped.copy()
    texts = []
    for r in range(tokens.shape[0]):
        ids = tokens[r, : lengths[r]].tolist()
        cut = stop_string_cut(ids, stops, decode)
        if cut is None:
            texts.append(decode(ids))
            continue
        keep, text = cut
        tokens[r, keep:], logprobs[r, keep:], sampling[r, keep:] = pad_id, 0.0, 0.0
        lengths[r], stopped[r] = keep, True
        texts.append(text)
    cut_batch = dataclasses.replace(batch, tokens=tokens, logprobs=logprobs, sampling_logprobs=sampling,
                                    lengths=lengths, stopped=stopped)
    return cut_batch, texts
