"""In-process sampler: jitted prefill + `lax.while_loop` decode over the model's KV cache.

For P left-padded prompts and n samples each (rows = P*n, prompt-major: row = p*n + j):

1. prefill the P prompts once (positions = cumsum(mask) - 1), take the logits of the last
   slot, then repeat the cache n times along the batch axis (prompts are not recomputed per sample);
2. decode one token per loop step for all rows until every row has ended or `max_tokens` is
   reached (the loop exits early; no per-token host work, the cache is updated in place by
   `dynamic_update_slice` inside the loop carry).

Token choice at step t for row r (`z` = float32 logits, `T` = temperature):
    greedy (T == 0):  y = argmax z
    sampled:          s = z / T; s -> -inf outside the top-k (k > 0), then outside the smallest
                      set of most likely tokens whose mass under softmax(s) reaches top_p;
                      y = argmax(s + g), g ~ Gumbel, a function of (key, r, t) (`rollout.gumbel`):
                      a draw from softmax(s)
Returned per token:
    logprobs          log softmax(z)[y]: the model's log-prob at temperature 1 over the full
                      vocabulary - the "old policy" of the trainer's ratio, what vLLM reports
                      by default, equal to a full forward's re-score of the same tokens;
    sampling_logprobs log softmax(s)[y] with the masks: the distribution actually sampled from
                      (0 for greedy, whose distribution is a point mass).
A row ends after a token in its stop set (EOS unless `ignore_eos`, plus `stop_token_ids`);
that token is kept and counted. Randomness depends only on (key, row, step), so results are
deterministic per key and independent of the padding buckets and of `streams`.

`streams` > 1 splits the prompts into that many contiguous shares, each decoded by its own
program, run at once from a thread pool. On a CPU one small-batch decode leaves cores idle (each
step is a chain of small matrix products whose latency the intra-op threads cannot hide); two
concurrent programs keep both cores of the bench machine busy (docs/rollout.md). Only for
parameters on one device: concurrent programs with collectives can deadlock XLA:CPU.

Shapes are padded to buckets (powers of two: prompts, prompt length, max_tokens, stop-id
count) so a run compiles a handful of programs; each new program is logged.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxent_jax.model.decoder import Decoder
from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.gumbel import gumbel_noise, row_keys

log = logging.getLogger(__name__)

_MIN_LEN_BUCKET = 16
_MIN_STOP_BUCKET = 4


def bucket(size: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(size, minimum)."""
    size = max(int(size), minimum)
    return 1 << (size - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class SampleBatch:
    """Host arrays for rows = prompts * n (prompt-major); entries past `lengths` are pad / 0."""

    tokens: np.ndarray  # [rows, max_tokens] int32
    logprobs: np.ndarray  # [rows, max_tokens] float32, model log-probs at temperature 1
    sampling_logprobs: np.ndarray  # [rows, max_tokens] float32, under the sampled distribution
    lengths: np.ndarray  # [rows] int32, tokens generated (a final stop token included)
    stopped: np.ndarray  # [rows] bool, True = ended on a stop token, False = reached max_tokens


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Tempered logits with -inf outside the top-k and the top-p nucleus.

    logits `[rows, vocab]` float32; temperature > 0, top_k (0 = off), top_p in (0, 1] scalars.
    Top-p is taken on the distribution renormalised after top-k (as vLLM does); ties at
    the cut-off are kept.
    """
    vocab = logits.shape[-1]
    scaled = logits / temperature
    desc = -jnp.sort(-scaled, axis=-1)  # [rows, vocab], descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranks = jnp.arange(vocab)
    desc = jnp.where(ranks[None, :] < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < top_p) & (ranks[None, :] < k)
    cutoff = jnp.min(jnp.where(keep_sorted, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def first_argmax(x: jax.Array) -> jax.Array:
    """Index of the first maximum along the last axis, int32 (`jnp.argmax` for finite inputs).

    Two plain reductions (max, then the smallest index holding it) instead of `jnp.argmax`'s
    variadic (value, index) reduce, which XLA:CPU runs element by element and with the Gumbel
    noise fused into it: 5x slower per decode step at vocabulary 512. A row without a maximum
    (NaN logits) gets the last index rather than an out-of-range one.
    """
    size = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(x == top, jnp.arange(size, dtype=jnp.int32), size), axis=-1)
    return jnp.minimum(first, size - 1)


def choose_tokens(
    logits: jax.Array,
    noise: jax.Array | None,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    filtered: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens `[rows]` int32, model log-probs `[rows]`, sampling log-probs `[rows]`) from logits `[rows, vocab]`.

    `noise` is standard Gumbel noise `[rows, vocab]`, or None for greedy decoding.
    """
    logits = logits.astype(jnp.float32)
    model_logp = jax.nn.log_softmax(logits, axis=-1)
    if noise is None:
        tokens = first_argmax(logits)
        sampling_lp = jnp.zeros(tokens.shape, jnp.float32)
    else:
        scaled = filter_logits(logits, temperature, top_k, top_p) if filtered else logits / temperature
        tokens = first_argmax(scaled + noise)
        sampling_lp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    model_lp = jnp.take_along_axis(model_logp, tokens[:, None], axis=-1)[:, 0]
    return tokens, model_lp, sampling_lp


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "max_new", "greedy", "filtered", "pad_id"))
def _decode(
    graphdef: nnx.GraphDef,
    state: nnx.State | tuple[nnx.State, ...],
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    live: jax.Array,
    stop_ids: jax.Array,
    key: jax.Array,
    first_row: jax.Array,
    max_tokens: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    num_samples: int,
    max_new: int,
    greedy: bool,
    filtered: bool,
    pad_id: int,
) -> tuple[jax.Array, ...]:
    """The whole generation as one program; shapes: prompts `[P, T]`, live `[P*n]`, stop_ids `[S]` (-1 = unused).

    `first_row`: the call-wide index of this program's first row (its rows' noise streams).

    Jitted at module level with the graph definition static, so samplers of equal architecture
    (e.g. two servers in one process) share compiled programs.
    """
    model: Decoder = nnx.merge(graphdef, *state) if isinstance(state, tuple) else nnx.merge(graphdef, state)
    num_prompts, prompt_len = prompt_ids.shape
    rows = num_prompts * num_samples
    mask = prompt_mask.astype(jnp.bool_)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = model.init_cache(num_prompts, prompt_len + max_new)
    hidden, cache = model(prompt_ids, positions, mask, cache)
    logits = model.logits(hidden[:, -1:])[:, 0]  # [P, vocab]; left padding puts every last token in the last slot

    def repeat(x: jax.Array, axis: int) -> jax.Array:
        return jnp.repeat(x, num_samples, axis=axis, total_repeat_length=x.shape[axis] * num_samples)

    cache = cache.map_rows(lambda x: repeat(x, 0))
    next_pos = repeat(jnp.sum(mask, axis=1, dtype=jnp.int32), 0)
    keys = row_keys(key, rows, first_row)

    def pick(logits: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        noise = None if greedy else gumbel_noise(keys, step, logits.shape[-1])
        return choose_tokens(logits, noise, temperature, top_k, top_p, filtered=filtered)

    def is_stop(tokens: jax.Array) -> jax.Array:
        return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)

    def record(carry: dict, tokens: jax.Array, lp: jax.Array, slp: jax.Array) -> dict:
        active = ~carry["finished"]
        step = carry["step"]
        tokens = jnp.where(active, tokens, pad_id)
        out = dict(carry)
        out["tokens"] = jax.lax.dynamic_update_slice(carry["tokens"], tokens[:, None], (0, step))
        out["logprobs"] = jax.lax.dynamic_update_slice(carry["logprobs"], jnp.where(active, lp, 0.0)[:, None], (0, step))
        out["sampling_logprobs"] = jax.lax.dynamic_update_slice(
            carry["sampling_logprobs"], jnp.where(active, slp, 0.0)[:, None], (0, step)
        )
        out["lengths"] = carry["lengths"] + active.astype(jnp.int32)
        out["stopped"] = carry["stopped"] | (active & is_stop(tokens))
        out["finished"] = carry["finished"] | out["stopped"]
        out["last"] = tokens
        out["step"] = step + 1
        return out

    carry = {
        "step": jnp.zeros((), jnp.int32),
        "tokens": jnp.full((rows, max_new), pad_id, jnp.int32),
        "logprobs": jnp.zeros((rows, max_new), jnp.float32),
        "sampling_logprobs": jnp.zeros((rows, max_new), jnp.float32),
        "lengths": jnp.zeros((rows,), jnp.int32),
        "stopped": jnp.zeros((rows,), jnp.bool_),
        "finished": ~live,
        "last": jnp.zeros((rows,), jnp.int32),
        "pos": next_pos,
        "cache": cache,
    }
    carry = record(carry, *pick(repeat(logits, 0), carry["step"]))

    def cond(carry: dict) -> jax.Array:
        return (carry["step"] < max_tokens) & ~jnp.all(carry["finished"])

    def body(carry: dict) -> dict:
        ones = jnp.ones((rows, 1), jnp.bool_)
        hidden, cache = model(carry["last"][:, None], carry["pos"][:, None], ones, carry["cache"])
        carry = dict(carry, cache=cache, pos=carry["pos"] + 1)
        return record(carry, *pick(model.logits(hidden)[:, 0], carry["step"]))

    carry = jax.lax.while_loop(cond, body, carry)
    return carry["tokens"], carry["logprobs"], carry["sampling_logprobs"], carry["lengths"], carry["stopped"]


class Sampler:
    """Generates from a Decoder's parameters as given (sharded or not; never copied)."""

    def __init__(self, graphdef: nnx.GraphDef, *, eos_token_ids: Sequence[int], pad_token_id: int = 0,
                 streams: int = 1):
        if streams < 1:
            raise ValueError(f"streams={streams} must be >= 1")
        self.graphdef = graphdef
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.streams = streams
        self._pool = concurrent.futures.ThreadPoolExecutor(streams) if streams > 1 else None
        self._compiled: set[tuple] = set()

    @classmethod
    def for_model(cls, model: Decoder, *, eos_token_ids: Sequence[int] | None = None,
                  streams: int = 1) -> tuple["Sampler", nnx.State]:
        """A sampler for `model` and the model's parameter state (split once, outside the hot path)."""
        graphdef, state = nnx.split(model)
        cfg = model.cfg
        eos = eos_token_ids if eos_token_ids is not None else ([cfg.eos_token_id] if cfg.eos_token_id is not None else [])
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        return cls(graphdef, eos_token_ids=eos, pad_token_id=pad, streams=streams), state

    def generate(
        self,
        state: nnx.State | tuple[nnx.State, ...],
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        key: jax.Array,
        decode: Callable[[Sequence[int]], str] | None = None,
    ) -> SampleBatch:
        """`params.n` completions for each prompt (token ids, no padding).

        `state` is what `nnx.split` gave with `self.graphdef`: one state, or a tuple such as the
        trainer's `(params, rest)`; sharded arrays are used where they are. Stop strings
        (`params.stop`) need `decode` (token ids -> text, e.g. the tokenizer's decode with
        skip_special_tokens) and are applied on the host after the loop; without it they
        are refused rather than ignored.
        """
        if params.stop and decode is None:
            raise ValueError(f"stop strings {list(params.stop)!r} need decode= (token ids -> text) to be applied")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if params.n < 1 or params.max_tokens < 1:
            raise ValueError(f"n={params.n} and max_tokens={params.max_tokens} must both be >= 1")
        shares = min(self.streams, len(prompts))
        if shares > 1 and any(isinstance(x, jax.Array) and len(x.devices()) > 1 for x in jax.tree.leaves(state)):
            raise ValueError(f"streams={self.streams} needs parameters on one device; these span several")
        edges = [len(prompts) * i // shares for i in range(shares + 1)]
        parts = [(prompts[lo:hi], lo * params.n) for lo, hi in zip(edges[:-1], edges[1:])]
        if shares == 1:
            batch = self._decode_share(state, *parts[0], params, key)
        else:
            outputs = list(self._pool.map(lambda part: self._decode_share(state, *part, params, key), parts))
            batch = SampleBatch(**{f.name: np.concatenate([getattr(o, f.name) for o in outputs])
                                   for f in dataclasses.fields(SampleBatch)})
        if params.stop:
            from maxent_jax.rollout.stop_strings import apply_stop_strings

            batch, _ = apply_stop_strings(batch, params.stop, decode, self.pad_token_id)
        return batch

    def _decode_share(self, state: nnx.State | tuple[nnx.State, ...], prompts: Sequence[Sequence[int]],
                      first_row: int, params: SamplingParams, key: jax.Array) -> SampleBatch:
        """One program's generation for `prompts`, whose rows start at `first_row` of the call's batch."""
        num_prompts, n = len(prompts), params.n
        p_bucket = bucket(num_prompts)
        t_bucket = bucket(max(len(p) for p in prompts), _MIN_LEN_BUCKET)
        new_bucket = bucket(params.max_tokens, _MIN_LEN_BUCKET)
        stop = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids)))
        s_bucket = bucket(len(stop), _MIN_STOP_BUCKET)

        ids = np.full((p_bucket, t_bucket), self.pad_token_id, np.int32)
        mask = np.zeros((p_bucket, t_bucket), bool)
        for i, prompt in enumerate(prompts):
            ids[i, t_bucket - len(prompt) :] = prompt
            mask[i, t_bucket - len(prompt) :] = True
        mask[num_prompts:, -1] = True  # bucket-padding prompts: one dummy token, never sampled from
        live = np.zeros((p_bucket * n,), bool)
        live[: num_prompts * n] = True
        stop_ids = np.full((s_bucket,), -1, np.int32)
        stop_ids[: len(stop)] = stop

        greedy = params.temperature == 0.0
        filtered = not greedy and (params.top_k > 0 or params.top_p < 1.0)
        signature = (p_bucket, t_bucket, n, new_bucket, s_bucket, greedy, filtered)
        if signature not in self._compiled:
            self._compiled.add(signature)
            level = logging.INFO if len(self._compiled) == 1 else logging.WARNING
            log.log(level, "sampler compiles program %d for prompts=%d len=%d n=%d max_new=%d stops=%d greedy=%s filtered=%s",
                    len(self._compiled), *signature)
        outputs = _decode(
            self.graphdef,
            state,
            ids,
            mask,
            live,
            stop_ids,
            key,
            np.int32(first_row),
            np.int32(params.max_tokens),
            np.float32(params.temperature if not greedy else 1.0),
            np.int32(params.top_k),
            np.float32(params.top_p),
            num_samples=n,
            max_new=new_bucket,
            greedy=greedy,
            filtered=filtered,
            pad_id=self.pad_token_id,
        )
        tokens, logprobs, sampling_lp, lengths, stopped = jax.device_get(outputs)
        rows, width = num_prompts * n, params.max_tokens
        return SampleBatch(
            tokens=tokens[:rows, :width],
            logprobs=logprobs[:rows, :width],
            sampling_logprobs=sampling_lp[:rows, :width],
            lengths=lengths[:rows],
            stopped=stopped[:rows],
        )

    @property
    def num_programs(self) -> int:
        """Distinct compiled programs so far (one per shape bucket and mode)."""
        return len(self._compiled)
