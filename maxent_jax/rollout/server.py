"""The rollout HTTP server: the protocol of docs/rollout.md in front of any RolloutBackend.

Built on the standard library's ThreadingHTTPServer so it runs unchanged in the trainer's
environment and in the vLLM environment (which has no jax): this module imports neither.
One engine turn (`fair_queue.FairQueue`) serialises every call into the backend, which is what
makes a weight push atomic for generation: a generate call runs entirely under the old or
entirely under the new weights. The turn passes round-robin between clients and its queue is
bounded; `limits.RequestLimits` bounds the work of one request; every socket read has a timeout,
a whole request a deadline and the connection threads a bound (`connections`).
Whatever a request holds, the answer is a JSON body: 2xx, a 4xx naming what is wrong, or a 500
for a backend failure.

This module is the endpoints' logic (generate, weight pushes, the prefix cache) with no HTTP
details; the HTTP side is `handler.py`, the reading of request bodies `request_body.py`.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from maxent_jax.rollout import protocol
from maxent_jax.rollout.adapters import AdapterSpec, expected_adapter
from maxent_jax.rollout.backend import RolloutBackend, SamplingParams
from maxent_jax.rollout.connections import DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_DEADLINE_S, BoundedThreadingHTTPServer
from maxent_jax.rollout.fair_queue import FairQueue
from maxent_jax.rollout.handler import handler_class
from maxent_jax.rollout.limits import DEFAULT_READ_TIMEOUT_S, RequestLimits
from maxent_jax.rollout.protocol import HF_LAYOUT, LORA_LAYOUT, ProtocolError
from maxent_jax.rollout.request_body import RequestBody
from maxent_jax.rollout.weights import ReceiveBuffers, WeightStreamError, expected_nbytes, read_stream

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 << 20
_FRAME_OVERHEAD_BYTES = 4096  # generous per-frame allowance for the safetensors header
# Queue key of weight pushes: their own client in the rotation, never refused for a full queue.
_PUSH_CLIENT = ("weights",)


class RolloutServer:
    """Serves one backend over HTTP; `start()` runs it on a daemon thread, `serve_forever()` in the caller's."""

    def __init__(
        self,
        backend: RolloutBackend,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        limits: RequestLimits | None = None,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        request_deadline: float = DEFAULT_REQUEST_DEADLINE_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ):
        """`limits` None: the backend's defaults, `RequestLimits.for_backend`.

        `read_timeout`: seconds one socket read (or write) may wait, so a client that stalls
        mid-request releases its thread instead of holding it forever. `request_deadline`: seconds
        a whole request (line, headers, body) may take from its first byte, so one that trickles in
        cannot either; `max_connections`: connection threads at once (`connections`).
        """
        self.backend = backend
        self.token = token
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout
        self.request_deadline = request_deadline
        self.weight_version = 0
        # The base the served weights stand on (fresh at start and on every full push) and the
        # version of the adapters applied to it (None: none); see rollout/adapters.py.
        self.base_id = secrets.token_hex(8)
        self.adapter_version: int | None = None
        self.receive_buffers = ReceiveBuffers()
        self.weight_layouts = tuple(getattr(backend, "weight_layouts", (HF_LAYOUT,)))
        backend_info = backend.info()
        self.limits = limits or RequestLimits.for_backend(backend)
        self.engine = FairQueue(self.limits.max_queued_requests)
        self._info = {**backend_info, "weight_layouts": list(self.weight_layouts),
                      "limits": {**self.limits.as_json(), "max_request_bytes": max_request_bytes,
                                 "read_timeout_s": read_timeout, "request_deadline_s": request_deadline,
                                 "max_connections": max_connections}}
        self._httpd = BoundedThreadingHTTPServer((host, port), handler_class(self), max_connections=max_connections)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def info(self) -> dict:
        return {**self._info, "weight_version": self.weight_version, "base_id": self.base_id,
                "adapter_version": self.adapter_version}

    def serve_forever(self) -> None:
        log.info("rollout server (%s backend) listening on %s", self._info.get("backend"), self.url)
        self._httpd.serve_forever()

    def start(self) -> "RolloutServer":
        self._thread = threading.Thread(target=self.serve_forever, name="rollout-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close the socket; in-flight requests on daemon threads are abandoned."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- endpoint logic (no HTTP details below this line) ---------------------------------

    def generate(self, payload: Any, header_tag: str | None, peer: str = "") -> dict:
        """Validate, check the limits, wait for this client's engine turn, generate.

        Token-id requests are checked against the limits before they queue; text requests are
        checked on a lower bound (a prompt is at least one token) before, exactly after encoding.
        """
        request = protocol.parse_generate(payload, header_tag)
        params = request.params
        encode = getattr(self.backend, "encode", None)
        if request.texts is not None and encode is None:
            raise ProtocolError(f"the {self._info.get('backend')} backend takes prompt_token_ids only, not text prompts")
        self.limits.check([len(ids) for ids in request.token_ids] if request.texts is None else [1] * request.num_prompts,
                          params.n, params.max_tokens)
        # Fair between clients by tag; untagged callers by address.
        with self.engine.hold(request.client_tag or peer):  # also serialises the tokenizer, which is not thread-safe
            prompt_ids = request.token_ids if request.texts is None else [list(ids) for ids in encode(request.texts)]
            self._check_lengths(prompt_ids, params)
            self.limits.check([len(ids) for ids in prompt_ids], params.n, params.max_tokens)
            version = self.weight_version
            completions = self.backend.generate(prompt_ids, params)
        return protocol.generate_response(request, prompt_ids, completions, version, str(self._info.get("model")))

    def _check_lengths(self, prompt_ids: list[list[int]], params: SamplingParams) -> None:
        max_tokens = params.max_tokens
        max_prompt = self._info.get("max_prompt_len")
        max_total = self._info.get("max_model_len")
        vocab = self._info.get("vocab_size")
        if vocab is not None and params.stop_token_ids and max(params.stop_token_ids) >= vocab:
            raise ProtocolError(f"field 'stop_token_ids': token id {max(params.stop_token_ids)} is outside the vocabulary (size {vocab})")
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ProtocolError(f"prompt {i} is empty after tokenization; a prompt needs at least one token")
            if max_prompt is not None and len(ids) > max_prompt:
                raise ProtocolError(f"prompt {i} has {len(ids)} tokens; this server accepts at most max_prompt_len={max_prompt}")
            if max_total is not None and len(ids) + max_tokens > max_total:
                raise ProtocolError(
                    f"prompt {i}: {len(ids)} prompt tokens + max_tokens {max_tokens} exceeds max_model_len={max_total}"
                )
            if vocab is not None and ids and max(ids) >= vocab:
                raise ProtocolError(f"prompt {i}: token id {max(ids)} is outside the vocabulary (size {vocab})")

    def expected_weights(self, layout: str = HF_LAYOUT, adapter: AdapterSpec | None = None) -> dict:
        """Name -> (shape, dtype) a push in `layout` must match; a backend is asked for a layout only if it lists it.

        An adapter push (`lora`, with its `adapter` spec) is checked against the PEFT tensors of
        that rank and those targets on the backend's HF weights.
        """
        if layout == LORA_LAYOUT:
            return expected_adapter(self.backend.expected_weights(), adapter)
        if layout == HF_LAYOUT:
            return self.backend.expected_weights()
        return self.backend.expected_weights(layout=layout)

    def weights_limit(self, expected: dict) -> int:
        """Largest acceptable /weights body: the model's bytes plus a header allowance per frame."""
        return expected_nbytes(expected) + _FRAME_OVERHEAD_BYTES * (len(expected) + 1)

    def push_weights(self, body: RequestBody, version: int | None, layout: str = HF_LAYOUT,
                     adapter: AdapterSpec | None = None) -> dict:
        """Receive, validate and apply one push; the reply splits the server's time into its phases.

        `layout` (one of `weight_layouts`, checked by the caller) picks the shapes the push is
        validated against and is passed on to the backend's `prepare_weight`; the HF layout
        calls the backend exactly as a backend without layouts expects.

        `receive_seconds` runs from the first body byte to the end frame (it includes waiting
        for the sender), `apply_seconds` is the backend's `load_weights` under the engine lock.
        A backend with `prepare_weight` gets each tensor as soon as it has arrived, on a worker
        thread, so its layout/device work (XLA:CPU runs it on the calling thread) overlaps
        reading the rest of the upload; nothing reaches generation before the whole push is
        validated and `load_weights` swaps it in.

        An adapter push (`lora`) is applied by the backend's `load_adapter` on the base it holds,
        only if `adapter.base` names that base (else 409: push the base in full first); a full
        push gives the server a new base id and clears the adapter version.
        """
        start = time.perf_counter()
        expected = self.expected_weights(layout, adapter)
        prepare = None if layout == LORA_LAYOUT else getattr(self.backend, "prepare_weight", None)
        if prepare is not None and layout != HF_LAYOUT:
            prepare = functools.partial(prepare, layout=layout)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-weights")
        try:
            submit = None if prepare is None else (lambda name, array: pool.submit(prepare, name, array))
            tensors = read_stream(body.readinto, expected, submit, self.receive_buffers)
            if not body.at_end():
                raise WeightStreamError("bytes after the end frame")
            if prepare is not None:
                tensors = {name: future.result() for name, future in tensors.items()}
        except WeightStreamError as err:
            if layout == HF_LAYOUT:
                raise
            raise WeightStreamError(f"{err} (push in layout {layout!r})") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a refused push drops what was queued
        received = time.perf_counter()
        nbytes = expected_nbytes({name: expected[name] for name in tensors})
        with self.engine.hold(_PUSH_CLIENT, bounded=False):
            if version is not None and version < self.weight_version:
                raise ProtocolError(
                    f"header {protocol.WEIGHT_VERSION_HEADER}: {version} is older than the current weight version {self.weight_version}",
                    409,
                )
            if layout == LORA_LAYOUT and adapter.base != self.base_id:
                raise ProtocolError(f"query parameter base={adapter.base!r}: this server holds base {self.base_id!r} "
                                    "(GET /info base_id); push the base in full first, then the adapters", 409)
            locked = time.perf_counter()
            if layout == LORA_LAYOUT:
                self.backend.load_adapter(tensors, adapter)
            elif layout == HF_LAYOUT:
                self.backend.load_weights(tensors.items())
            else:
                self.backend.load_weights(tensors.items(), layout=layout)
            self.backend.reset_prefix_cache()
            self.weight_version = self.weight_version + 1 if version is None else version
            new_version = self.weight_version
            if layout == LORA_LAYOUT:
                self.adapter_version = new_version
            else:
                self.base_id, self.adapter_version = secrets.token_hex(8), None
            base_id, adapter_version = self.base_id, self.adapter_version
            applied = time.perf_counter()
        seconds = applied - start
        log.info("weights v%d applied: %d tensors, %.1f MB in %.2fs", new_version, len(tensors), nbytes / 1e6, seconds)
        return {"weight_version": new_version, "tensors": len(tensors), "bytes": nbytes, "seconds": seconds,
                "receive_seconds": received - start, "apply_seconds": applied - locked, "layout": layout,
                "base_id": base_id, "adapter_version": adapter_version}

    def reset_prefix_cache(self, peer: str = "") -> dict:
        with self.engine.hold(peer):
            self.backend.reset_prefix_cache()
        return {"ok": True}
