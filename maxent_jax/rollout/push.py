"""The sending side of a weight push: which layout, what request, how the stream is written and timed.

`RolloutClient.push_weights` sends one `POST /weights` with these pieces; the framing of the
stream itself is `weights.py`'s. No jax here (the client imports this module).
"""

from __future__ import annotations

import socket
import time
import urllib.parse
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from maxent_jax.rollout.adapters import AdapterSpec
from maxent_jax.rollout.protocol import HF_LAYOUT, LAYOUT_PARAM, NATIVE_LAYOUT, WEIGHT_VERSION_HEADER
from maxent_jax.rollout.weights import iter_stream

_GATHER_BYTES = 1 << 16  # pieces smaller than this are copied into one write with their neighbours

NamedTensors = Iterable[tuple[str, np.ndarray]]


def push_layout(info: Mapping[str, Any]) -> str:
    """The layout to push our parameters in: `native` when the server's /info offers it, else `hf`.

    A server from before weight layouts (no `weight_layouts`) and a vLLM one take HF's only.
    """
    offered = info.get("weight_layouts")
    return NATIVE_LAYOUT if isinstance(offered, list) and NATIVE_LAYOUT in offered else HF_LAYOUT


def send_chunked(sock: socket.socket, pieces: Iterable[bytes | memoryview]) -> None:
    """Write `pieces` to the socket as an HTTP/1.1 chunked body, one chunk per non-empty piece.

    Why not http.client's own chunked encoding: it builds every chunk as size line + data +
    CRLF, a copy of each tensor before it is sent. Here a large piece goes to the kernel as the
    caller's buffer (a memoryview of the array), and small pieces (frame headers, size lines,
    small tensors) are gathered into one write, so a push costs few system calls.
    """
    pending = bytearray()
    for piece in pieces:
        size = piece.nbytes if isinstance(piece, memoryview) else len(piece)
        if not size:
            continue  # a zero-size chunk would end the body
        pending += b"%X\r\n" % size
        if size < _GATHER_BYTES:
            pending += piece
            pending += b"\r\n"
            continue
        sock.sendall(pending)
        sock.sendall(piece)
        pending = bytearray(b"\r\n")
    pending += b"0\r\n\r\n"
    sock.sendall(pending)


def push_request(token: str, version: int | None, layout: str, adapter: AdapterSpec | None) -> tuple[str, dict[str, str]]:
    """Path and headers of `POST /weights`: a layout other than `hf` (or an adapter's spec) rides in the query."""
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/octet-stream",
        "Transfer-Encoding": "chunked",
    }
    if version is not None:
        headers[WEIGHT_VERSION_HEADER] = str(int(version))
    query = adapter.query() if adapter is not None else {LAYOUT_PARAM: layout}
    path = "/weights" if layout == HF_LAYOUT else f"/weights?{urllib.parse.urlencode(query)}"
    return path, headers


class TimedUpload:
    """The framed stream of one push's tensors, timed: producing the tensors vs writing them.

    `tensors` is consumed lazily, one tensor at a time; a zero-argument callable returning the
    iterable is `replayable` (every attempt calls `body` afresh), a bare iterable can be sent once.
    The counts are those of the last attempt.
    """

    def __init__(self, tensors: NamedTensors | Callable[[], NamedTensors]):
        self._tensors = tensors
        self.replayable = callable(tensors)
        self.bytes = 0
        self.convert_seconds = 0.0  # producing host tensors (the caller's iterable)
        self.upload_seconds = 0.0  # the whole stream, convert_seconds included
        self.uploaded_at = 0.0  # perf_counter when the last byte was handed to the socket

    def _timed_source(self) -> Iterator[tuple[str, np.ndarray]]:
        source = iter(self._tensors() if self.replayable else self._tensors)
        while True:
            begin = time.perf_counter()
            item = next(source, None)
            self.convert_seconds += time.perf_counter() - begin
            if item is None:
                return
            yield item

    def body(self) -> Iterator[bytes | memoryview]:
        """The chunks of one attempt's body (`weights.iter_stream` framing)."""
        self.bytes, self.convert_seconds = 0, 0.0
        begin = time.perf_counter()
        for chunk in iter_stream(self._timed_source()):
            self.bytes += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            yield chunk
        self.uploaded_at = time.perf_counter()
        self.upload_seconds = self.uploaded_at - begin


def push_report(result: Mapping[str, Any], layout: str, upload: TimedUpload, start: float, answered_at: float) -> dict[str, Any]:
    """What `push_weights` returns: seconds, bytes, GB/s, the new version, the layout, the phases.

    `result` is the server's JSON answer, `start` and `answered_at` the perf_counter times of
    the request and of its answer.
    """
    seconds = answered_at - start
    apply = float(result.get("apply_seconds", 0.0))
    return {
        "weight_version": int(result["weight_version"]),
        "layout": layout,
        "base_id": result.get("base_id"),  # None from a server without adapter pushes
        "seconds": seconds,
        "bytes": float(upload.bytes),
        "gb_per_s": upload.bytes / 1e9 / max(seconds, 1e-9),
        # Where the time went: producing host tensors (the iterable), writing the stream
        # (framing + socket, including waits for the server to read), then the wait for the
        # reply: the server finishing what it received after the last byte (reading,
        # preparing tensors) and its apply phase (the swap under its lock).
        "convert_seconds": upload.convert_seconds,
        "send_seconds": upload.upload_seconds - upload.convert_seconds,
        "server_finish_seconds": answered_at - upload.uploaded_at - apply,
        "server_apply_seconds": apply,
    }
