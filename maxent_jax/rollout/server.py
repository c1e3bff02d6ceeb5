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
"""

from __future__ import annotations

import functools
import hmac
import io
import json
import logging
import re
import secrets
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

from maxent_jax.rollout import protocol
from maxent_jax.rollout.adapters import AdapterSpec, expected_adapter, parse_adapter_query
from maxent_jax.rollout.backend import RolloutBackend, SamplingParams
from maxent_jax.rollout.connections import (DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_DEADLINE_S,
                                            BoundedThreadingHTTPServer, DeadlineSocketReader, RequestDeadline)
from maxent_jax.rollout.fair_queue import FairQueue
from maxent_jax.rollout.limits import DEFAULT_READ_TIMEOUT_S, RequestLimits
from maxent_jax.rollout.protocol import HF_LAYOUT, LORA_LAYOUT, ProtocolError
from maxent_jax.rollout.weights import ReceiveBuffers, WeightStreamError, expected_nbytes, read_stream

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 << 20
_FRAME_OVERHEAD_BYTES = 4096  # generous per-frame allowance for the safetensors header
# Methods the server answers; any other is a 405 naming these.
_METHODS = ("GET", "POST")
# A decimal integer header (Content-Length, X-Weight-Version): ASCII digits only, as HTTP says;
# Python's int() would also take "-5", "1_0", " 12" and non-ASCII digits.
_DECIMAL = re.compile(r"[0-9]{1,18}")
# Queue key of weight pushes: their own client in the rotation, never refused for a full queue.
_PUSH_CLIENT = ("weights",)


class _Body:
    """Reads a request body (Content-Length or chunked) with a byte limit; `readinto` for the weight parser."""

    def __init__(self, rfile, headers, limit: int):
        self._rfile = rfile
        self._limit = limit
        self._consumed = 0
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._chunk_left = 0
        self._done = False
        if self._chunked:
            self._remaining = None
        else:
            length = headers.get("Content-Length")
            if length is None:
                raise ProtocolError("request has no body length: send Content-Length or Transfer-Encoding: chunked", 411)
            if not _DECIMAL.fullmatch(length.strip()):
                raise ProtocolError(f"bad Content-Length header {protocol.preview(length)}: expected a byte count")
            self._remaining = int(length)
            if self._remaining > limit:
                raise ProtocolError(f"request body of {self._remaining} bytes exceeds the limit of {limit} bytes", 413)

    def _count(self, n: int) -> None:
        self._consumed += n
        if self._consumed > self._limit:
            raise ProtocolError(f"request body exceeds the limit of {self._limit} bytes", 413)

    def _fill(self, view: memoryview) -> None:
        """Fill `view` from the socket (straight into the caller's buffer for large reads)."""
        got = 0
        while got < len(view):
            n = self._rfile.readinto(view[got:])
            if not n:
                raise WeightStreamError(f"request body ended early: wanted {len(view) - got} more bytes, got none")
            got += n

    def _next_chunk(self) -> None:
        line = self._rfile.readline(1024).strip()
        digits = line.split(b";")[0].strip()
        if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", digits):
            raise ProtocolError(f"bad chunk size line {line[:40]!r}")
        size = int(digits, 16)
        if self._consumed + size > self._limit:  # refused before anything is allocated for it
            raise ProtocolError(f"request body exceeds the limit of {self._limit} bytes", 413)
        if size == 0:
            while self._rfile.readline(1024).strip():  # trailers
                pass
            self._done = True
        self._chunk_left = size

    def readinto(self, view: memoryview) -> None:
        """Fill `view` with the next body bytes; a body that ends first raises WeightStreamError (a truncated upload)."""
        n = len(view)
        if not self._chunked:
            if n > self._remaining:
                raise WeightStreamError(f"request body ended early: wanted {n} bytes, {self._remaining} left")
            self._remaining -= n
            self._fill(view)
            return
        pos = 0
        while pos < n:
            if self._chunk_left == 0:
                if self._done:
                    raise WeightStreamError("request body ended early (last chunk received)")
                self._next_chunk()
                continue
            take = min(n - pos, self._chunk_left)
            self._count(take)
            self._fill(view[pos : pos + take])
            self._chunk_left -= take
            pos += take
            if self._chunk_left == 0:
                self._fill(memoryview(bytearray(2)))  # CRLF after chunk data

    def read_all(self) -> bytes:
        """The whole body (JSON endpoints)."""
        if not self._chunked:
            data = bytearray(self._remaining)
            self.readinto(memoryview(data))
            return bytes(data)
        parts = []
        while not self._done:
            if self._chunk_left == 0:
                self._next_chunk()
                continue
            part = bytearray(self._chunk_left)
            self.readinto(memoryview(part))
            parts.append(part)
        return b"".join(parts)

    def drain(self) -> None:
        """Discard what is left, 1 MiB at a time, so the connection can answer (and be reused)."""
        scratch = memoryview(bytearray(1 << 20))
        if self._chunked:
            while not self._done:
                if self._chunk_left == 0:
                    self._next_chunk()
                    continue
                self.readinto(scratch[: min(self._chunk_left, len(scratch))])
            return
        while self._remaining:
            self.readinto(scratch[: min(self._remaining, len(scratch))])

    def at_end(self) -> bool:
        """True when nothing but the chunked terminator is left."""
        if not self._chunked:
            return self._remaining == 0
        if self._chunk_left == 0 and not self._done:
            self._next_chunk()
        return self._done


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
        self._httpd = BoundedThreadingHTTPServer((host, port), _handler_class(self), max_connections=max_connections)
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

    def push_weights(self, body: _Body, version: int | None, layout: str = HF_LAYOUT,
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


def _handler_class(server: RolloutServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        rollout = server
        timeout = server.read_timeout  # per socket read/write (StreamRequestHandler.setup)

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Answers are written as headers, then body: with Nagle on, the body would wait for the
    # client's delayed ACK of the headers (tens of ms per request on loopback).
    disable_nagle_algorithm = True
    server_version = "maxent-jax-rollout/1"
    rollout: RolloutServer
    _reader: DeadlineSocketReader

    def setup(self) -> None:
        """Reads go through a `DeadlineSocketReader`: a per-read timeout and a whole-request deadline."""
        super().setup()
        self.rfile.close()  # the stdlib's reader: its reference would keep the socket open after close
        self._reader = DeadlineSocketReader(self.connection, read_timeout=self.rollout.read_timeout,
                                            deadline=self.rollout.request_deadline)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.next_request()
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def _send_json(self, status: int, obj: Any, close: bool = False, headers: dict | None = None) -> None:
        raw = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has headers only
            self.wfile.write(raw)

    def _error(self, status: int, message: str, close: bool = False, details: dict | None = None,
               headers: dict | None = None) -> None:
        self._send_json(status, {"error": message, "status": status, **(details or {})}, close=close, headers=headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (request line, headers, a method with no handler) as JSON 4xx too.

        It answers a method it has no `do_<METHOD>` for with 501 and an HTTP version it does not
        speak with 505; both are the request's fault, so they are 405 and 400 here.
        """
        # A request line it could not read leaves the version at HTTP/0.9, which has no status
        # line or headers: the refusal would arrive as a bare body no HTTP/1 client can read.
        self.request_version = self.protocol_version
        headers = None
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, headers = HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": ", ".join(_METHODS)}
            message = f"method {self.command!r} is not allowed; this server answers {' and '.join(_METHODS)} (see /openapi.json)"
        elif code >= 500:
            code = HTTPStatus.BAD_REQUEST
        self._error(int(code), message or explain or HTTPStatus(code).phrase, close=True, headers=headers)

    def _run(self, fn: Callable[[], Any], body: _Body | None = None) -> None:
        """Call an endpoint; map refusals to 4xx JSON and backend failures to 500, keep serving."""
        try:
            self._send_json(200, fn())
        except ProtocolError as err:
            self._refuse(err.status, str(err), body, err.details)
        except WeightStreamError as err:
            self._refuse(400, f"weight push refused, nothing applied: {err}", body)
        except TimeoutError as err:
            self._timed_out(err)
        except Exception as err:  # a backend failure must not take the server down
            log.exception("%s %s failed", self.command, self.path)
            self._error(500, f"{type(err).__name__}: {err}", close=True)

    def _refuse(self, status: int, message: str, body: _Body | None, details: dict | None = None) -> None:
        close = status in (411, 413)
        if body is not None and not close:
            try:
                body.drain()
            except (ProtocolError, WeightStreamError, OSError):
                close = True
        self._error(status, message, close=close, details=details)

    def _timed_out(self, err: TimeoutError) -> None:
        """A client that stopped sending mid-body (or sent it too slowly): answer if it still reads, and free the thread."""
        message = str(err) if isinstance(err, RequestDeadline) else (
            f"request body stalled: no bytes for {self.rollout.read_timeout:g} s (read_timeout_s in GET /info)")
        try:
            self._error(int(HTTPStatus.REQUEST_TIMEOUT), message, close=True)
        except OSError:
            self.close_connection = True

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self._path()
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/info":
            self._send_json(200, self.rollout.info())
        elif path == "/openapi.json":
            self._send_json(200, protocol.openapi_schema())
        else:
            self._error(404, f"no endpoint GET {path}; see /openapi.json")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        path = self._path()
        if path == "/weights":
            self._post_weights()
            return
        if path not in ("/generate", "/reset_prefix_cache"):
            self._error(404, f"no endpoint POST {path}; see /openapi.json", close=True)
            return
        try:
            body = _Body(self.rfile, self.headers, self.rollout.max_request_bytes)
            raw = body.read_all()
        except (ProtocolError, WeightStreamError) as err:
            self._error(getattr(err, "status", 400), str(err), close=True)
            return
        except TimeoutError as err:
            self._timed_out(err)
            return
        peer = self.client_address[0]
        if path == "/reset_prefix_cache":
            self._run(lambda: self.rollout.reset_prefix_cache(peer))
            return
        tag = self.headers.get(protocol.CLIENT_TAG_HEADER)
        self._run(lambda: self.rollout.generate(protocol.decode_json(raw), tag, peer))

    def _post_weights(self) -> None:
        # The body is drained (within the size bound) before any refusal, so a client streaming
        # a push always reads the answer instead of a reset connection.
        rollout = self.rollout
        layout, layout_error, adapter = HF_LAYOUT, None, None
        try:
            query = urllib.parse.urlsplit(self.path).query
            layout = protocol.parse_weight_layout(query, rollout.weight_layouts, str(rollout.info().get("backend")))
            if layout == LORA_LAYOUT:
                adapter = parse_adapter_query(urllib.parse.parse_qs(query, keep_blank_values=True))
        except ProtocolError as err:
            layout, layout_error = HF_LAYOUT, err
        try:
            limit = rollout.weights_limit(rollout.expected_weights(layout, adapter))
            body = _Body(self.rfile, self.headers, limit)
        except ProtocolError as err:
            self._error(err.status, str(err), close=True)
            return
        token = self.rollout.token
        if token is None:
            self._refuse(403, "weight push disabled: the server was started without --token-file", body)
            return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not hmac.compare_digest(auth[len("Bearer ") :].strip().encode(), token.encode()):
            self._refuse(401, "weight push needs 'Authorization: Bearer <token>' with the server's token", body)
            return
        self._reader.lift()  # the trainer's push: gigabytes, no total deadline (each read still times out)
        raw_version = self.headers.get(protocol.WEIGHT_VERSION_HEADER)
        version = None
        if raw_version is not None:
            version = int(raw_version) if _DECIMAL.fullmatch(raw_version.strip()) else None
            if version is None:
                self._refuse(400, f"header {protocol.WEIGHT_VERSION_HEADER}: expected an integer >= 0, got {raw_version!r}", body)
                return
        if layout_error is not None:
            self._refuse(layout_error.status, f"weight push refused, nothing applied: {layout_error}", body)
            return
        self._run(lambda: rollout.push_weights(body, version, layout, adapter), body)
