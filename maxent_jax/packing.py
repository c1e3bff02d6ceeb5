"""Padding-free scoring (`train.packing`): a batch's sequences laid end to end in fixed-length buffers.

The padded score layout (`maxent_jax.scoring`) gives every completion `Tc` columns, the step's
longest; with reasoning-length skew most of them are padding. Here each group's prompt (once, as
`model.score_prompt_once` does) and its completions are written into token buffers
`[num_buffers, pack_length]`:

    buffer_ids, buffer_positions     [B, L]  tokens and their per-segment positions (a completion's
                                             continue its prompt's, exactly as in the padded rows)
    buffer_segments                  [B, L]  which sequence a slot holds (1, 2, ... per buffer; 0 = pad)
    buffer_parents                   [B, L]  the one other segment it reads: a completion its prompt
    buffer_predict, buffer_targets   [B, H]  the vocabulary head's (slot, target) pairs: completion
                                             token j of a row is predicted by its prompt's last slot
                                             (j = 0) or by its token j - 1, so a prompt shared by G
                                             completions feeds G first-token pairs
    pack_logp_index                  [P, G, Tc]  where each padded (row, token) reads its log-prob
                                             in the flattened `[B, H]` head output
    pack_row_slots                   [P, G, Tp + Tc]  (InfoSeed only) each padded column's slot

Attention (`model.attention.segment_visibility`) is causal within a segment plus a completion's
view of its own prompt. The log-probs come back in the padded `[P, G, Tc]` layout, so the
objectives, their masks and every normaliser (per token, sequence, group, DAPO / Dr.GRPO
constants) are the padded path's own arrays: only the forward changes.

Packing: groups become units (a prompt and as many of its completions as fit; a group longer than
a buffer is split, its prompt copied into each part, and the copies' gradients add up as the
padded rows' do), placed first-fit decreasing, then the buffers are spread over the batch-sharding
devices so each gets nearly the same number of real tokens. `B` and `H` are rounded up to a few
sizes (`bucket_buffers`), and with `pack_length` 0 the length is one of a few per step (`Packer`),
so a run compiles a handful of programs.
Micro-batches (`train.gradient_accumulation_steps`) and gradient pieces (`train.gradient_chunks`)
are packed separately, in the order the train step slices them (`parallel.train_step.split_axis`,
the one rule for both): piece c of a micro-batch holds buffers c, c + chunks, ... and, when each
batch device's prompts divide by chunks, the micro-batch's groups c, c + chunks, ...; else (one
prompt per device: the 7B recipe's 16 completions in 4 pieces) every prompt's completions
c, c + chunks, ..., each piece with its own copies of the prompts. Indices are local to the piece.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from maxent_jax.model.attention import causal_blocks
from maxent_jax.model.logprobs import token_logprobs
from maxent_jax.objectives.infoseed import pool_hidden
from maxent_jax.parallel.rules import (
    LOGICAL_AXIS_RULES,
    Rules,
    activation_sharding,
    batch_divisor,
    batch_spec,
    constrain_activation,
    tree_shardings,
)
from maxent_jax.parallel.train_step import piece, piece_axis, split_axis

Array = jax.Array
log = logging.getLogger(__name__)
HEAD_MULTIPLE = 8
LENGTH_MULTIPLE = 64  # candidate buffer lengths are multiples of this


def _rounded(length: int) -> int:
    """`length` rounded up to a multiple of LENGTH_MULTIPLE (the candidate buffer lengths)."""
    return -(-length // LENGTH_MULTIPLE) * LENGTH_MULTIPLE


def bucket_buffers(count: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times them) >= count:
    at most a third of buffers are padding, and a run sees a handful of sizes."""
    power = 1
    while True:
        for size in (power, power + power // 2):
            if size >= count:
                return size
        power *= 2


def first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Item indices per bin: items by decreasing size, each into the first bin it fits (11/9 OPT + 1 bins)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[i] > capacity:
            raise ValueError(f"an item of {sizes[i]} tokens does not fit a buffer of {capacity}")
        for b, free in enumerate(room):
            if sizes[i] <= free:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return bins


def balance(tokens: list[int], devices: int, per_device: int) -> list[list[int]]:
    """Bin indices per device, `per_device` places each: largest first onto the device with the fewest
    real tokens so far that has a free place (the longest-processing-time rule)."""
    load, places = [0] * devices, [[] for _ in range(devices)]
    for b in sorted(range(len(tokens)), key=lambda b: -tokens[b]):
        d = min((d for d in range(devices) if len(places[d]) < per_device), key=lambda d: load[d])
        places[d].append(b)
        load[d] += tokens[b]
    return places


@dataclasses.dataclass(frozen=True)
class _Unit:
    """A prompt and some of its group's completions, laid out together in one buffer."""

    group: int  # piece-local group index
    members: tuple[int, ...]  # completion indices within the group
    size: int  # tokens


@dataclasses.dataclass(frozen=True)
class Costs:
    """Relative forward costs of the layouts, from the model's shape: FLOPs per token through the
    layers, per vocabulary-head row, and per attended (query, key) pair. Used to choose a step's
    buffer length, or the padded layout when packing would not save work."""

    token: float
    head: float
    pair: float

    @classmethod
    def of(cls, cfg: Any) -> "Costs":
        d, f = cfg.hidden_size, cfg.intermediate_size
        h, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        layer = d * (2 * h + 2 * kv) + 3 * d * f
        # a pair is two products over every head's dimensions plus its softmax entries, which cost
        # a CPU (or a GPU's non-fused path) far more than their FLOPs: counted as 4 FLOPs each
        return cls(2.0 * cfg.num_layers * layer, 2.0 * d * cfg.vocab_size,
                   cfg.num_layers * (4.0 * h + 4.0 * cfg.num_heads))


def blocked_pairs(queries: int, before: int = 0) -> int:
    """(query, key) pairs `causal_attention` computes for `queries` slots after `before` earlier keys."""
    return sum((hi - lo) * (before + hi) for lo, hi in causal_blocks(queries))


@dataclasses.dataclass(frozen=True)
class _Plan:
    length: int
    per_device: int  # buffers per device and piece
    heads: int  # H
    pieces: list  # (micro, piece, groups, units, bins)


@dataclasses.dataclass
class Packer:
    """Packs the grouped score arrays of one step (host side, numpy).

    pack_length: buffer length L; 0 = chosen per step by `costs` among a few lengths (multiples of
    64 from a row's width, doubling, up to the padded group width Tp + G * Tc), or no packing at all
    for a step whose padded layout is estimated cheaper, such as equal lengths, or where every
    candidate would hold more per device than the padded layout (`within_padded`). devices: the
    batch-sharding devices; chunks: `train.gradient_chunks` (pieces of whole groups or of every
    group's completions, by `split_axis`); micro: micro-batches; rows_for_pooling: also build
    `pack_row_slots` (InfoSeed's pooled states); prompt_once: the padded layout the run falls back
    to (`model.score_prompt_once`), the baseline of both.
    """

    pack_length: int
    devices: int
    chunks: int = 1
    micro: int = 1
    pad_id: int = 0
    rows_for_pooling: bool = False
    costs: Costs | None = None  # needed when pack_length is 0
    prompt_once: bool = True
    shapes: set = dataclasses.field(default_factory=set, repr=False)  # (B, L, H, Tc) seen: one program each

    def __call__(self, grouped: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """grouped: `input_ids`, `positions`, `attention_mask` `[P, G, Tp + Tc]`, `completion_ids`,
        `completion_mask` `[P, G, Tc]`. Returns the `buffer_*` / `pack_*` arrays (buffers of micro-batch
        i at `[i * B, (i + 1) * B)`), or none when the padded layout is chosen, and statistics."""
        ids, valid = grouped["input_ids"], grouped["attention_mask"].astype(bool)
        prompts, group, total = ids.shape
        completion_len = grouped["completion_ids"].shape[-1]
        prompt_len = total - completion_len
        lp = valid[:, 0, :prompt_len].sum(-1)
        lc = grouped["completion_mask"].astype(bool).sum(-1)
        if np.any(lp < 1):
            raise ValueError("packing needs every prompt to hold at least one token")
        if prompts % self.micro or (prompts // self.micro) % self.chunks and group % self.chunks:
            raise ValueError(f"{prompts} groups of {group} do not split into {self.micro} micro-batches of "
                             f"{self.chunks} pieces")
        if self.pack_length:
            if self.pack_length < total:
                raise ValueError(f"pack_length={self.pack_length} is shorter than a row "
                                 f"({prompt_len} + {completion_len})")
            plan = self._plan(self.pack_length, prompts, group, lp, lc)
        else:
            plan = self._choose(prompts, group, prompt_len, completion_len, lp, lc)
        if plan is None:
            self.shapes.add((0, 0, 0, completion_len))
            return {}, {"pack/packed": 0.0, "pack/programs": float(len(self.shapes))}
        length, per_device, heads = plan.length, plan.per_device, plan.heads
        buffers = self.chunks * self.devices * per_device
        out = {
            "buffer_ids": np.full((self.micro * buffers, length), self.pad_id, np.int32),
            "buffer_positions": np.zeros((self.micro * buffers, length), np.int32),
            "buffer_segments": np.zeros((self.micro * buffers, length), np.int32),
            "buffer_parents": np.zeros((self.micro * buffers, length), np.int32),
            "buffer_predict": np.zeros((self.micro * buffers, heads), np.int32),
            "buffer_targets": np.zeros((self.micro * buffers, heads), np.int32),
            "pack_logp_index": np.zeros((prompts, group, completion_len), np.int32),
        }
        if self.rows_for_pooling:
            out["pack_row_slots"] = np.zeros((prompts, group, total), np.int32)
        device_tokens = np.zeros(self.devices)
        for m, c, groups, units, bins in plan.pieces:
            tokens = [sum(units[u].size for u in b) for b in bins]
            for d, places in enumerate(balance(tokens, self.devices, per_device)):
                device_tokens[d] += sum(tokens[b] for b in places)
                for j, b in enumerate(places):
                    q = d * per_device + j  # the buffer's index within its piece
                    self._fill(out, grouped, m * buffers + q * self.chunks + c, q, [units[u] for u in bins[b]],
                               groups, lp, lc, prompt_len, length, heads)
        self.shapes.add((buffers, length, heads, completion_len))
        stats = {"pack/packed": 1.0, "pack/buffers": float(self.micro * buffers), "pack/length": float(length),
                 "pack/programs": float(len(self.shapes)),
                 "pack/fill": float(device_tokens.sum()) / (self.micro * buffers * length),
                 "pack/device_token_spread": float(device_tokens.max() / max(device_tokens.mean(), 1.0))}
        return out, stats

    def _plan(self, length: int, prompts: int, group: int, lp: np.ndarray, lc: np.ndarray) -> _Plan:
        """Units per piece (a group, or the piece's share of its completions, split where it overflows a
        buffer), first-fit decreasing bins, and the bucketed counts every piece shares."""
        per_micro = prompts // self.micro
        by_completions = split_axis(per_micro, group, self.chunks, self.devices, packed=True) == 1
        pieces = []
        for m in range(self.micro):
            for c in range(self.chunks):
                groups = list(range(m * per_micro, (m + 1) * per_micro))
                groups, completions = (groups, range(c, group, self.chunks)) if by_completions else \
                    (groups[c::self.chunks], range(group))
                units = []
                for r, p in enumerate(groups):
                    members: list[int] = []
                    for g in completions:
                        if members and lp[p] + sum(lc[p, members]) + lc[p, g] > length:
                            units.append(_Unit(r, tuple(members), int(lp[p] + sum(lc[p, members]))))
                            members = []
                        members.append(g)
                    units.append(_Unit(r, tuple(members), int(lp[p] + sum(lc[p, members]))))
                pieces.append((m, c, groups, units, first_fit_decreasing([u.size for u in units], length)))
        per_device = bucket_buffers(-(-max(len(bins) for *_, bins in pieces) // self.devices))
        heads = max(sum(int(lc[groups[units[u].group], g]) for u in b for g in units[u].members)
                    for _, _, groups, units, bins in pieces for b in bins)
        heads = min(length, HEAD_MULTIPLE * bucket_buffers(-(-max(heads, 1) // HEAD_MULTIPLE)))
        return _Plan(length, per_device, heads, pieces)

    def _choose(self, prompts: int, group: int, prompt_len: int, completion_len: int, lp: np.ndarray,
                lc: np.ndarray) -> _Plan | None:
        """The cheapest plan by `costs` among the candidate lengths that stay `within_padded`, or None
        when the padded layout is cheaper or no candidate stays within it."""
        costs = self.costs
        pairs = (blocked_pairs(prompt_len) + group * blocked_pairs(completion_len, prompt_len) if self.prompt_once
                 else group * blocked_pairs(prompt_len + completion_len))
        padded = prompts * (costs.token * self._padded_width(prompt_len, group, completion_len)
                            + costs.head * group * completion_len + costs.pair * pairs)
        best, best_cost = None, padded
        top = _rounded(prompt_len + group * completion_len)
        length = _rounded(prompt_len + completion_len)
        while True:
            plan = self._plan(length, prompts, group, lp, lc)
            buffers = self.micro * self.chunks * self.devices * plan.per_device
            cost = buffers * (costs.token * length + costs.head * plan.heads + costs.pair * blocked_pairs(length))
            if cost < best_cost and self.within_padded(plan, prompts, group, prompt_len, completion_len):
                best, best_cost = plan, cost
            if length >= top:
                return best
            length = min(2 * length, top)

    def within_padded(self, plan: _Plan, prompts: int, group: int, prompt_len: int, completion_len: int) -> bool:
        """Whether `plan` holds, on any device and in any piece, no more token slots and no more
        vocabulary-head rows than the padded layout of the same step, and a segment mask (`[B, L, L]`
        booleans) of at most those slots times a row's width.

        Why: `python -m maxent_jax.plan` compiles the padded programs at the longest prompt and
        completion, and a plan is only worth its verdict if no step can outgrow it. Activations,
        saved residuals and logits scale with the slots and head rows; the mask, which the padded
        programs lack, stays a small fraction of them (docs/packing.md gives the 7B recipe's).
        """
        share = self.micro * self.chunks * self.devices  # the padded rows are split this many ways
        slots = -(-prompts * self._padded_width(prompt_len, group, completion_len) // share)
        return (plan.per_device * plan.length <= slots
                and plan.per_device * plan.heads <= -(-prompts * group * completion_len // share)
                and plan.per_device * plan.length ** 2 <= slots * _rounded(prompt_len + completion_len))

    def _padded_width(self, prompt_len: int, group: int, completion_len: int) -> int:
        """Token slots per group in the padded layout the run falls back to: the prompt once and each
        completion (`model.score_prompt_once`), or every completion in its own row with the prompt."""
        return prompt_len + group * completion_len if self.prompt_once else group * (prompt_len + completion_len)

    def _fill(self, out: dict[str, np.ndarray], grouped: Mapping[str, np.ndarray], row: int, q: int,
              units: list[_Unit], groups: list[int], lp: np.ndarray, lc: np.ndarray, prompt_len: int,
              length: int, heads: int) -> None:
        """Write `units` into buffer `row` (index `q` within its piece)."""
        ids, completion_ids = grouped["input_ids"], grouped["completion_ids"]
        slot, head, segment = 0, 0, 0
        for unit in units:
            p = groups[unit.group]
            n = int(lp[p])
            segment += 1
            prompt_segment, prompt_start = segment, slot
            span = slice(slot, slot + n)
            out["buffer_ids"][row, span] = ids[p, 0, prompt_len - n:prompt_len]
            out["buffer_positions"][row, span] = np.arange(n)
            out["buffer_segments"][row, span] = segment
            out["buffer_parents"][row, span] = segment
            slot += n
            for g in unit.members:
                k = int(lc[p, g])
                segment += 1
                span = slice(slot, slot + k)
                out["buffer_ids"][row, span] = completion_ids[p, g, :k]
                out["buffer_positions"][row, span] = n + np.arange(k)
                out["buffer_segments"][row, span] = segment
                out["buffer_parents"][row, span] = prompt_segment
                pairs = slice(head, head + k)
                predict = np.concatenate([[prompt_start + n - 1], slot + np.arange(k - 1)])
                out["buffer_predict"][row, pairs] = predict[:k]
                out["buffer_targets"][row, pairs] = completion_ids[p, g, :k]
                out["pack_logp_index"][p, g, :k] = q * heads + np.arange(head, head + k)
                if "pack_row_slots" in out:
                    out["pack_row_slots"][p, g, prompt_len - n:prompt_len] = q * length + prompt_start + np.arange(n)
                    out["pack_row_slots"][p, g, prompt_len:prompt_len + k] = q * length + slot + np.arange(k)
                slot += k
                head += k


def packer_for(config: Any, model_cfg: Any, batch_devices: int, pad_id: int) -> Packer | None:
    """The run's packer from the config (`train.packing`), or None (the padded layout) with a warning
    when the run has several host processes: the buffers' indices are global to the step's batch,
    which one process packs. The real-model recipes turn packing on, and the same recipe launched on
    several nodes should still train."""
    if jax.process_count() > 1:
        log.warning("train.packing=True: packing runs in one trainer process, and this run has %d; every step "
                    "is scored padded", jax.process_count())
        return None
    t, s = config.train, config.info_seed
    return Packer(t.pack_length, batch_devices, chunks=t.gradient_chunks, micro=t.gradient_accumulation_steps,
                  pad_id=pad_id, rows_for_pooling=s.enabled and s.lambda_ > 0, costs=Costs.of(model_cfg),
                  prompt_once=config.model.score_prompt_once)


def is_packed(batch: Mapping[str, Any]) -> bool:
    return "buffer_ids" in batch


def packed_logprobs_and_hidden(model: nnx.Module, batch: Mapping[str, Array], chunk_size: int,
                               return_entropy: bool = False) -> tuple[Any, Array]:
    """(completion log-probs `[P, G, Tc]` float32 in the padded layout, 0 on padding; the buffers'
    last hidden states `[B, L, D]`) for one piece's packed arrays and its grouped `completion_mask`.
    `return_entropy`: the first element is (log-probs, entropy at each position), both laid out so."""
    hidden = model.score_packed(batch["buffer_ids"], batch["buffer_positions"], batch["buffer_segments"],
                                batch["buffer_parents"])
    predicting = jnp.take_along_axis(hidden, batch["buffer_predict"][..., None], axis=1)
    predicting = constrain_activation(predicting, ("batch", "seq", "act_embed"))
    scores = token_logprobs(model, predicting, batch["buffer_targets"], chunk_size=chunk_size,
                            return_entropy=return_entropy)
    mask = batch["completion_mask"].astype(bool)

    def unpack(per_slot: Array) -> Array:
        return jnp.where(mask, jnp.take(per_slot.reshape(-1), batch["pack_logp_index"], mode="clip"), 0.0)

    return (tuple(map(unpack, scores)) if return_entropy else unpack(scores)), hidden


def packed_pooled(hidden: Array, batch: Mapping[str, Array], pooling: str) -> Array:
    """InfoSeed's pooled states `[P, G, D]` of each padded row, read from the buffers: the row's columns
    gathered from their slots (`pack_row_slots`), then `pool_hidden` over its attention mask, so the
    result is the padded path's."""
    flat = hidden.reshape(-1, hidden.shape[-1]).astype(jnp.float32)
    rows = jnp.take(flat, batch["pack_row_slots"], axis=0, mode="clip")  # [P, G, T, D]
    return pool_hidden(rows, batch["attention_mask"], pooling)


def in_pieces(score, batch: Mapping[str, Array], chunks: int, devices: int = 1) -> Array:
    """`score(piece) -> [P / chunks, G, ...]` or `[P, G / chunks, ...]` over a micro-batch's `chunks`
    pieces (sliced as `train.gradient_chunks` slices them: `piece_axis` over `devices` batch devices),
    joined back into `[P, G, ...]`."""
    if chunks == 1:
        return score(batch)
    axis = piece_axis({k: v.shape for k, v in batch.items()}, chunks, devices)
    stacked = jnp.stack([score(piece(dict(batch), c, chunks, axis)) for c in range(chunks)], axis=axis + 1)
    return stacked.reshape(*stacked.shape[:axis], -1, *stacked.shape[axis + 2:])


@dataclasses.dataclass(frozen=True)
class PackedLogprobFn:
    """`logp = fn(params, batch)` for micro-batched packed arrays `[m, ...]` (the train step's batch):
    `[m, P / m, G, Tc]` float32 (reference log-probs under `params`). On CPU it waits for the result."""

    jitted: Any
    rest: nnx.State
    blocking: bool

    def __call__(self, params: nnx.State, batch: Mapping[str, Array]) -> Array:
        out = self.jitted(params, self.rest, dict(batch))
        return jax.block_until_ready(out) if self.blocking else out


def make_packed_logprob_fn(graphdef: nnx.GraphDef, rest: nnx.State, params: nnx.State, mesh: Mesh,
                           rules: Rules = LOGICAL_AXIS_RULES, *, chunk_size: int, chunks: int = 1) -> PackedLogprobFn:
    """The packed counterpart of `parallel.forward.make_logprob_fn`: micro-batches one after the other."""
    sharding = NamedSharding(mesh, batch_spec(rules, micro_batched=True))
    devices = batch_divisor(mesh, rules)

    def forward(params: nnx.State, rest: nnx.State, batch: dict[str, Array]) -> Array:
        model = nnx.merge(graphdef, params, rest)
        score = lambda piece: packed_logprobs_and_hidden(model, piece, chunk_size)[0]  # noqa: E731
        with activation_sharding(mesh, rules):
            return jax.lax.map(lambda micro: in_pieces(score, micro, chunks, devices), batch)

    jitted = jax.jit(forward, in_shardings=(tree_shardings(params, mesh, rules), tree_shardings(rest, mesh, rules),
                                            sharding), out_shardings=sharding)
    return PackedLogprobFn(jitted, rest, mesh.devices.flat[0].platform == "cpu")
