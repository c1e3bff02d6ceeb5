"""The `jax` rollout backend: the in-process sampler behind the server protocol (CPUs, tests, one-box runs).

Weights are the decoder's NNX parameter state. A push arrives as HF-named numpy tensors, in HF
layout (converted to ours with `model.mapping`) or, when the client asks for it, already in our
layout (`native`: nothing to convert); each is placed with the sharding of the parameter it
replaces as soon as it has arrived (`prepare_weight`), into a *new* state; once the push is
complete and valid the server swaps the state reference under its engine lock, so a generate
call sees all old or all new weights.
An adapter-only push (`lora`, rollout/adapters.py) is merged here into a copy of the base of the
last full push: `W + (alpha / rank) * B A` per adapted kernel, the rest shared with the base.
Merged, because generation then runs the plain decoder at the base's speed (the in-process
sampler measured unmerged adapters no faster, docs/training.md), one compiled sampler serves
every rank and target set, and the merge is one small matmul per adapted kernel per push.
Stop strings are applied on the host after decoding (token-level stops run inside the loop).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import os
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxent_jax.model.decoder import Decoder
from maxent_jax.model import generation_config
from maxent_jax.model.mapping import tensor_maps
from maxent_jax.rollout.backend import Completion, SamplingParams
from maxent_jax.rollout.adapters import AdapterSpec, module_pairs
from maxent_jax.rollout.protocol import HF_LAYOUT, LORA_LAYOUT, NATIVE_LAYOUT, ProtocolError
from maxent_jax.rollout.sampler import Sampler
from maxent_jax.rollout.stop_strings import apply_stop_strings
from maxent_jax.rollout.weights import dtype_name


class JaxBackend:
    """RolloutBackend over a Decoder; `from_pretrained` builds it from an HF directory."""

    # It holds our own model, so it also takes pushes in our parameter layout (protocol.NATIVE_LAYOUT),
    # and adapter-only pushes (protocol.LORA_LAYOUT), merged into its own copy of the base.
    weight_layouts = (HF_LAYOUT, NATIVE_LAYOUT, LORA_LAYOUT)

    def __init__(
        self,
        model: Decoder,
        *,
        tokenizer=None,
        model_name: str = "maxent-jax",
        max_model_len: int | None = None,
        seed: int = 0,
        eos_token_ids: Sequence[int] | None = None,
    ):
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = int(max_model_len or self.cfg.max_position_embeddings)
        self.sampler, self.state = Sampler.for_model(model, eos_token_ids=eos_token_ids)
        self.base_state = self.state  # what an adapter push is merged into: the last full push
        self._maps = tensor_maps(self.cfg)
        self._base_key = jax.random.key(seed)
        self._requests = itertools.count()
        flat = dict(nnx.to_flat_state(self.state))
        self._expected: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {HF_LAYOUT: {}, NATIVE_LAYOUT: {}}
        self._by_name = {m.hf_name: m for m in self._maps}
        # Shape, dtype and sharding each pushed tensor must end up with (the state's are fixed).
        self._targets: dict[str, jax.ShapeDtypeStruct] = {}
        for m in self._maps:
            value = flat[m.path].get_value()
            hf = jax.eval_shape(m.to_hf, jax.ShapeDtypeStruct(value.shape, value.dtype))
            self._expected[HF_LAYOUT][m.hf_name] = (tuple(hf.shape), dtype_name(value.dtype))
            self._expected[NATIVE_LAYOUT][m.hf_name] = (tuple(value.shape), dtype_name(value.dtype))
            self._targets[m.hf_name] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, dtype: str = "float32", max_model_len: int | None = None, seed: int = 0) -> "JaxBackend":
        """Load config, weights (`model.hf_io`) and, when the directory has one, the tokenizer."""
        from maxent_jax.model.hf_io import load_hf_checkpoint

        path = Path(model_dir)
        _, model = load_hf_checkpoint(path, dtype=dtype, compute_dtype=dtype)
        tokenizer = None
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        eos = generation_config.eos_token_ids(path, model.cfg.eos_token_id, tokenizer)
        return cls(model, tokenizer=tokenizer, model_name=str(path), max_model_len=max_model_len, seed=seed, eos_token_ids=eos)

    def info(self) -> dict:
        return {
            "model": self.model_name,
            "backend": "jax",
            "max_model_len": self.max_model_len,
            "max_prompt_len": self.max_model_len - 1,
            "vocab_size": self.cfg.vocab_size,
            "dtype": self.cfg.param_dtype,
            "eos_token_ids": list(self.sampler.eos_token_ids),
            "has_tokenizer": self.tokenizer is not None,
        }

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise ProtocolError("this model directory has no tokenizer: send prompt_token_ids instead of prompts")
        return [list(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True) if self.tokenizer is not None else ""

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if params.stop and self.tokenizer is None:
            raise ProtocolError("stop strings need a tokenizer and this model directory has none; use stop_token_ids")
        if params.seed is not None:
            key = jax.random.key(params.seed)
        else:
            key = jax.random.fold_in(self._base_key, next(self._requests))
        batch = self.sampler.generate(self.state, prompt_token_ids, dataclasses.replace(params, stop=()), key)
        if params.stop:
            batch, texts = apply_stop_strings(batch, params.stop, self._decode, self.sampler.pad_token_id)
        else:
            texts = [self._decode(row[:length].tolist()) for row, length in zip(batch.tokens, batch.lengths)]
        groups: list[list[Completion]] = []
        for p in range(len(prompt_token_ids)):
            group = []
            for j in range(params.n):
                r = p * params.n + j
                length = int(batch.lengths[r])
                ids = batch.tokens[r, :length].tolist()
                lps = batch.logprobs[r, :length].tolist()
                slps = batch.sampling_logprobs[r, :length].tolist()
                reason = "stop" if batch.stopped[r] else "length"
                group.append(Completion(token_ids=ids, logprobs=lps, text=texts[r], finish_reason=reason, sampling_logprobs=slps))
            groups.append(group)
        return groups

    def _layout(self, layout: str) -> str:
        if layout not in self._expected:
            raise ValueError(f"layout={layout!r}: the jax backend takes {', '.join(map(repr, self.weight_layouts))}")
        return layout

    def expected_weights(self, layout: str = HF_LAYOUT) -> dict[str, tuple[tuple[int, ...], str]]:
        """HF name -> (shape, dtype) of a push in `layout`: HF shapes, or our parameters' own (`native`)."""
        return dict(self._expected[self._layout(layout)])

    def prepare_weight(self, name: str, array: np.ndarray, layout: str = HF_LAYOUT) -> jax.Array:
        """One received tensor in our layout, dtype and sharding, as a new device array.

        Called by the server as each tensor arrives (before the push is complete), so it must
        not touch `self.state`. A `native` tensor (shape and dtype validated by the server), or
        an HF one whose our-layout form is a view of its bytes (a reshape, or the identity),
        goes to the device as it is: on CPU the received 64-byte-aligned buffer is adopted, no
        copy. Otherwise the bytes are moved as they are and the relayout (a transpose) runs on
        the device, dispatched asynchronously so it overlaps the rest of the upload: a strided
        host transpose was most of a push's time.
        """
        var = self._targets[name]
        if self._layout(layout) == NATIVE_LAYOUT:
            return jax.device_put(array, var.sharding)
        m = self._by_name[name]
        view = m.from_hf(array)
        if view.flags.c_contiguous and view.dtype == var.dtype:
            return jax.device_put(view, var.sharding)
        relaid = m.from_hf(jax.device_put(array))
        return jax.device_put(relaid.astype(var.dtype), var.sharding)

    def load_weights(self, named_tensors: Iterable[tuple[str, np.ndarray | jax.Array]], layout: str = HF_LAYOUT) -> None:
        """Build a complete new state from the tensors, then swap it in (one reference assignment).

        Values are what `prepare_weight` returned (the server's path) or numpy arrays in
        `layout`, which are prepared here.

        After a `native` push the replaced state is collected at once. Why: on CPU every
        tensor of such a push is the server's receive buffer itself, so the replaced state
        holds the whole previous receive arena, and it is cyclic garbage (flax Variables) that
        only the cyclic collector frees; until then the next push cannot reuse that arena and
        receives into fresh memory, which runs at a third of the speed (page faults). The
        collection is cheap where the long-lived objects are frozen (`python -m maxent_jax.serve`
        calls `gc.freeze()`), and freeing a state of adopted buffers frees no device memory.
        Measured: 408 MB native pushes 0.63 -> 1.16 GB/s (interleaved, 2 loaded CPU cores).
        An HF push replaces transposed kernels that XLA owns, whose freeing on the push's path
        cost as much as the reuse saved, so it is left to the collector's own schedule.
        """
        flat = dict(nnx.to_flat_state(self.state))
        for name, value in named_tensors:
            if isinstance(value, np.ndarray):
                value = self.prepare_weight(name, value, layout)
            path = self._by_name[name].path
            flat[path] = flat[path].replace(value)
        new_state = nnx.from_flat_state(list(flat.items()))
        jax.block_until_ready(new_state)
        self.state = self.base_state = new_state
        if layout == NATIVE_LAYOUT:
            gc.collect()

    def load_adapter(self, tensors: dict[str, np.ndarray], spec: AdapterSpec) -> None:
        """Serve the base of the last full push with `spec`'s adapters merged in (replacing earlier adapters).

        Each adapted kernel becomes `W + scale * B A`, computed in float32 in HF layout on the
        device and relaid into ours (`from_hf` is linear); the other parameters stay the base's
        arrays. The base itself is kept untouched for the next adapter push.
        """
        flat = dict(nnx.to_flat_state(self.base_state))
        pairs = module_pairs(list(tensors))
        maps = [self._by_name[weight] for weight in pairs]
        merged = _merge(tuple(m.from_hf for m in maps), float(spec.scale),
                        [flat[m.path].get_value() for m in maps],
                        [tensors[a] for a, _ in pairs.values()], [tensors[b] for _, b in pairs.values()])
        for m, value in zip(maps, merged):
            flat[m.path] = flat[m.path].replace(jax.device_put(value, self._targets[m.hf_name].sharding))
        new_state = nnx.from_flat_state(list(flat.items()))
        jax.block_until_ready(new_state)
        self.state = new_state

    def reset_prefix_cache(self) -> None:
        """Nothing to forget: the sampler builds a fresh KV cache for every request."""


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merge(from_hf: tuple, scale: float, bases: list, a_s: list, b_s: list) -> list:
    """`base + scale * from_hf(B A)` per adapted kernel (float32 sum, the base's dtype), as one program.

    One compiled program for all kernels: merged op by op, a 100M-parameter model's 63 kernels
    took 2.2 s of dispatch per push on this 2-core machine.
    """
    return [(base.astype(jnp.float32) + scale * f(b @ a)).astype(base.dtype)
            for f, base, a, b in zip(from_hf, bases, a_s, b_s)]
