"""How long a request may take to arrive, and how many connections the rollout server serves at once.

A per-read socket timeout frees a thread whose client stops sending, but a client that sends
one byte every few seconds never trips it: each read gets its byte in time, so the request (its
headers, its body) can take hours to arrive while the connection holds a server thread. Two
bounds close that:

- a deadline for the whole request (request line, headers and body), counted from its first
  byte: `DeadlineSocketReader` checks it before every socket read and shortens the read's
  timeout to what is left, so a dribbling client is cut off at the deadline. An authenticated
  weight push lifts it for its body (gigabytes from the trainer; its reads still time out);
- a bound on connection threads: `BoundedThreadingHTTPServer` answers a connection beyond
  `max_connections` with a 503 JSON body and closes it, so no number of slow clients can
  exhaust the process's threads; the connections being served keep theirs.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from http.server import ThreadingHTTPServer

DEFAULT_REQUEST_DEADLINE_S = 120.0
DEFAULT_MAX_CONNECTIONS = 128
# Rejections being written at once (each on a short-lived thread that reads what the client sent,
# so closing does not reset the connection before the 503 is read); beyond it, a plain close.
_MAX_REJECTING = 16
_REJECT_LINGER_S = 1.0


class RequestDeadline(TimeoutError):
    """The request did not arrive within the server's total deadline (a `TimeoutError`, like a stalled read)."""


class DeadlineSocketReader(io.RawIOBase):
    """The raw reader under a handler's `rfile`: every socket read waits at most `read_timeout`
    and, once a request's first byte has arrived, no later than that byte's time + `deadline`."""

    def __init__(self, sock: socket.socket, *, read_timeout: float, deadline: float):
        self._sock = sock
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._expires: float | None = None  # None: no request byte read yet (or the deadline lifted)
        self._lifted = False

    def readable(self) -> bool:
        return True

    def next_request(self) -> None:
        """A new request starts: its deadline starts with its first byte."""
        self._expires, self._lifted = None, False

    def lift(self) -> None:
        """No total deadline for the rest of this request (per-read timeouts still apply)."""
        self._expires, self._lifted = None, True

    def readinto(self, buffer) -> int:
        timeout = self._read_timeout
        if self._expires is not None:
            left = self._expires - time.monotonic()
            if left <= 0:
                raise RequestDeadline(f"request not received within the server's deadline of {self._deadline:g} s "
                                      "(request_deadline_s in GET /info)")
            timeout = min(timeout, left)
        self._sock.settimeout(timeout)
        try:
            n = self._sock.recv_into(buffer)
        except TimeoutError:
            if self._expires is not None and self._expires - time.monotonic() <= 0:
                raise RequestDeadline(f"request not received within the server's deadline of {self._deadline:g} s "
                                      "(request_deadline_s in GET /info)") from None
            raise
        if n and self._expires is None and not self._lifted:
            self._expires = time.monotonic() + self._deadline
        return n


class BoundedThreadingHTTPServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` with at most `max_connections` connection threads; the next gets a 503."""

    daemon_threads = True

    def __init__(self, address, handler, *, max_connections: int):
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._rejecting = threading.BoundedSemaphore(_MAX_REJECTING)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._reject(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _reject(self, sock: socket.socket) -> None:
        body = json.dumps({"error": f"server busy: it serves at most max_connections={self.max_connections} "
                                    "connections at once (--max-connections); retry later", "status": 503}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
        if not self._rejecting.acquire(blocking=False):
            self.shutdown_request(sock)
            return
        threading.Thread(target=self._answer_and_close, args=(sock, head + body), daemon=True,
                         name="rollout-reject").start()

    def _answer_and_close(self, sock: socket.socket, answer: bytes) -> None:
        """Send the 503, then read (and drop) what the client sends for a moment before closing:
        closing a socket with unread bytes resets the connection, which can discard the answer."""
        try:
            sock.settimeout(_REJECT_LINGER_S)
            sock.sendall(answer)
            sock.shutdown(socket.SHUT_WR)
            end = time.monotonic() + _REJECT_LINGER_S
            while time.monotonic() < end and sock.recv(65536):
                pass
        except OSError:
            pass
        finally:
            sock.close()
            self._rejecting.release()
