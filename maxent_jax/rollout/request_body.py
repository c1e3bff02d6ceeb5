"""The body of one request as the server reads it: Content-Length or chunked, never past a byte limit.

Refusals are `ProtocolError`s with their HTTP status (411 no length, 413 over the limit, 400 a
malformed length or chunk line); a body that ends early is a `WeightStreamError` (a truncated
upload). No jax here (the server imports this module).
"""

from __future__ import annotations

import re

from maxent_jax.rollout import protocol
from maxent_jax.rollout.protocol import ProtocolError
from maxent_jax.rollout.weights import WeightStreamError

# A decimal integer header (Content-Length, X-Weight-Version): ASCII digits only, as HTTP says;
# Python's int() would also take "-5", "1_0", " 12" and non-ASCII digits.
DECIMAL = re.compile(r"[0-9]{1,18}")


class RequestBody:
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
            if not DECIMAL.fullmatch(length.strip()):
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
