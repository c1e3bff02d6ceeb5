"""The rollout server's HTTP side: routes, authorization, and every answer as a JSON body.

One `_Handler` per connection (stdlib `BaseHTTPRequestHandler`): reads go through the
connection's `DeadlineSocketReader`, bodies through `RequestBody`, and the endpoints' logic is
the `RolloutServer`'s. Refusals (`ProtocolError`, `WeightStreamError`, timeouts, the stdlib's own)
become 4xx JSON, a backend failure a 500, and the server keeps serving. No jax here.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Callable

from maxent_jax.rollout import protocol
from maxent_jax.rollout.adapters import parse_adapter_query
from maxent_jax.rollout.connections import DeadlineSocketReader, RequestDeadline
from maxent_jax.rollout.protocol import HF_LAYOUT, LORA_LAYOUT, ProtocolError
from maxent_jax.rollout.request_body import DECIMAL, RequestBody
from maxent_jax.rollout.weights import WeightStreamError

if TYPE_CHECKING:
    from maxent_jax.rollout.server import RolloutServer

log = logging.getLogger(__name__)

# Methods the server answers; any other is a 405 naming these.
_METHODS = ("GET", "POST")


def handler_class(server: RolloutServer) -> type[BaseHTTPRequestHandler]:
    """The handler class of one server: every connection it accepts reaches `server` and its read timeout."""
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

    def _run(self, fn: Callable[[], Any], body: RequestBody | None = None) -> None:
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

    def _refuse(self, status: int, message: str, body: RequestBody | None, details: dict | None = None) -> None:
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
            body = RequestBody(self.rfile, self.headers, self.rollout.max_request_bytes)
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
            body = RequestBody(self.rfile, self.headers, limit)
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
            version = int(raw_version) if DECIMAL.fullmatch(raw_version.strip()) else None
            if version is None:
                self._refuse(400, f"header {protocol.WEIGHT_VERSION_HEADER}: expected an integer >= 0, got {raw_version!r}", body)
                return
        if layout_error is not None:
            self._refuse(layout_error.status, f"weight push refused, nothing applied: {layout_error}", body)
            return
        self._run(lambda: rollout.push_weights(body, version, layout, adapter), body)
