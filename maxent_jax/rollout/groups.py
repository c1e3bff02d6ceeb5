"""One step's completion groups: G completions per prompt, plus InfoSeed's seed completions (spec 9.1),
rewarded and laid out as the score batch (`scoring.py`).

Seed completions join their parent's group (group size G + num_seeds) and are scored under the
parent prompt: the seed tag is only in the generation context.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from maxent_jax import scoring
from maxent_jax.objectives.infoseed import render_seed_prompts
from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.producer import Rollout
from maxent_jax.run_setup import Policy

# n completions per prompt (prompt-major): token ids, behaviour log-probs, stopped flags.
Generate = Callable[[Sequence[Sequence[int]], int], tuple[list[list[int]], list[list[float]], np.ndarray]]


def sampling_params(rollout: ml_collections.ConfigDict, n: int) -> SamplingParams:
    """The `rollout.*` sampling settings for `n` completions per prompt."""
    return SamplingParams(n=n, max_tokens=rollout.max_completion_length, temperature=rollout.temperature,
                          top_p=rollout.top_p, top_k=rollout.top_k, stop=tuple(rollout.stop_sequences),
                          ignore_eos=rollout.ignore_eos)


def rollout_groups(rows: list[dict[str, Any]], *, config: ml_collections.ConfigDict, policy: Policy, prompt_len: int,
                   generate: Generate, rewards: Callable[..., Any], seed_rng: np.random.Generator) -> Rollout:
    """The completions of `rows`' prompts (`generate`), their rewards (`rewards`) and score batch.

    With `info_seed.enabled`, each prompt also gets `info_seed.num_seeds` completions of its
    seed-tagged prompts, the seed ids drawn from `seed_rng`."""
    start = time.monotonic()
    c, n = config, config.rollout.num_generations
    seeds = c.info_seed.num_seeds if c.info_seed.enabled else 0
    k = n + seeds
    prompt_ids = [r["prompt_ids"] for r in rows]
    ids, logps, _ = generate(prompt_ids, n)
    seed_ids = np.full((len(rows), k), -1, np.int32)
    if seeds:
        seed_prompts, seed_ids[:, n:] = render_seed_prompts(
            [r["prompt"] for r in rows], seeds, c.info_seed.prompt_template, seed_rng)
        encoded = policy.tokenizer(seed_prompts, add_special_tokens=False)["input_ids"]
        s_ids, s_logps, _ = generate([x[-c.rollout.max_prompt_length:] for x in encoded], 1)
        ids, logps = interleave(ids, s_ids, n, seeds), interleave(logps, s_logps, n, seeds)
    texts = policy.decode(ids)
    answers = [r["answer"] for r in rows for _ in range(k)]
    utilities, parts = rewards(texts, answers, is_eval=False)
    completion_len = scoring.bucket(max(len(x) for x in ids), 8, c.rollout.max_completion_length)
    batch = scoring.build_score_batch(
        [p for p in prompt_ids for _ in range(k)], ids, prompt_len=prompt_len,
        completion_len=completion_len, pad_id=policy.pad_id, behaviour_logps=logps)
    batch["seed_ids"] = seed_ids.reshape(-1)
    batch["is_seed_aug"] = seed_ids.reshape(-1) >= 0
    return Rollout(batch=batch, utilities=np.asarray(utilities, np.float32).reshape(-1, k), reward_parts=parts,
                   texts=texts, lengths=np.array([len(x) for x in ids]), seconds=time.monotonic() - start)


def interleave(originals: list, seeds: list, n: int, s: int) -> list:
    """Prompt-major rows: each prompt's n originals followed by its s seed completions."""
    out = []
    for p in range(len(originals) // n):
        out += originals[p * n:(p + 1) * n] + seeds[p * s:(p + 1) * s]
    return out
