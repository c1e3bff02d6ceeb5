"""The weight-push stream: HF-named tensors framed as a sequence of one-tensor safetensors files.

Why this framing: every frame is a valid safetensors file, so any safetensors reader can
inspect a captured stream, and the receiver learns a tensor's name, dtype and shape from
the frame header *before* its bytes arrive, so a wrong push is rejected without buffering
it. The sender never holds more than one tensor in host memory.

Stream (the HTTP body of `POST /weights`, Content-Length or chunked):

    frame*  end-frame
    frame     = u64-LE header_len | header (UTF-8 JSON, space-padded to a multiple of 8)
                | tensor bytes (little-endian, C order)
    header    = {"<hf name>": {"dtype": "BF16", "shape": [..], "data_offsets": [0, nbytes]}}
    end-frame = a safetensors file with no tensors whose header is
                {"__metadata__": {"end_of_weights": "<number of tensor frames>"}}

Dtype names on the Python side are numpy's (`float32`, `bfloat16` from ml_dtypes, ...);
a backend may report them with a `torch.` prefix, which is ignored.

This module must not import jax: the vLLM server environment has none.
"""

from __future__ import annotations

import json
import struct
import sys
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

# numpy dtype name <-> safetensors dtype code.
_DTYPE_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
_CODE_DTYPES = {code: name for name, code in _DTYPE_CODES.items()}
_MAX_HEADER_BYTES = 1 << 20
_ALIGN = 64
END_KEY = "end_of_weights"


class WeightStreamError(ValueError):
    """A push that does not match what the backend expects; nothing of it was applied."""


def dtype_name(dtype: object) -> str:
    """Canonical dtype name: `np.dtype('float32')`, `'torch.bfloat16'`, `'bfloat16'` -> `'float32'`/`'bfloat16'`."""
    text = str(dtype)
    if text.startswith("torch."):
        text = text[len("torch.") :]
    return str(np.dtype(_numpy_dtype(text)))


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def expected_nbytes(expected: Mapping[str, tuple[tuple[int, ...], str]]) -> int:
    """Total tensor bytes of a push matching `expected` (name -> (shape, dtype name))."""
    return sum(
        int(np.prod(shape, dtype=np.int64)) * _numpy_dtype(dtype_name(dtype)).itemsize
        for shape, dtype in expected.values()
    )


def _header_bytes(header: dict) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def encode_frame(name: str, array: np.ndarray) -> tuple[bytes, memoryview]:
    """One tensor frame as (length-prefixed header, tensor bytes); the bytes are a view, not a copy."""
    kind = dtype_name(array.dtype)
    if kind not in _DTYPE_CODES:
        raise WeightStreamError(f"tensor {name!r}: dtype {kind} cannot be sent; valid: {sorted(_DTYPE_CODES)}")
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    header = {name: {"dtype": _DTYPE_CODES[kind], "shape": list(array.shape), "data_offsets": [0, array.nbytes]}}
    return _header_bytes(header), memoryview(array.reshape(-1).view(np.uint8))


def end_frame(count: int) -> bytes:
    """The closing frame: a tensor-less safetensors file carrying the number of tensor frames."""
    return _header_bytes({"__metadata__": {END_KEY: str(count)}})


def iter_stream(named_tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[bytes | memoryview]:
    """The whole push as byte chunks, one tensor at a time (for a chunked HTTP body)."""
    count = 0
    for name, array in named_tensors:
        header, data = encode_frame(name, np.asarray(array))
        yield header
        if data.nbytes:
            yield data
        count += 1
    yield end_frame(count)


def _padded(nbytes: int) -> int:
    return nbytes + (-nbytes % _ALIGN)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-order array whose data starts on a 64-byte boundary.

    Why: XLA:CPU adopts a host buffer without copying only when it is 64-byte aligned, so a
    tensor received into such an array reaches the device for free (`jax.device_put` aliases it).
    numpy's own large allocations start 16 bytes past a page boundary.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class _Arena:
    """One push's worth of host memory, handed out as 64-byte-aligned tensor views in order."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._raw = np.empty(capacity + _ALIGN, dtype=np.uint8)
        self._idle_refs = sys.getrefcount(self._raw)  # every live view adds one (numpy views keep their base)
        self._next = 0
        self.leased = False

    def idle(self) -> bool:
        """No push is filling it and no array anywhere (numpy view, adopted device buffer) still uses it."""
        return not self.leased and sys.getrefcount(self._raw) <= self._idle_refs

    def lease(self) -> None:
        self.leased = True
        self._next = -self._raw.ctypes.data % _ALIGN

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        start = self._next
        if start + nbytes > len(self._raw):  # the caller sized the arena for the validated tensors
            raise RuntimeError(f"receive arena of {self.capacity} bytes overflowed")
        self._next = start + _padded(nbytes)
        return self._raw[start : start + nbytes].view(dtype).reshape(shape)


class ReceiveBuffers:
    """Host memory for incoming pushes, reused from one push to the next.

    Why: receiving into memory the process has never touched runs at a third of the speed of
    receiving into memory it has (every page faults inside the socket read). A push fills one
    arena sized for the whole model; an arena is reused only once nothing refers to any array
    cut from it, checked with CPython reference counts, so memory still in use is never
    overwritten. A backend that copies the tensors (vLLM) leaves its arena idle after each
    push. The jax backend (CPU) adopts untransposed tensors into its state, so that arena stays
    in use until the replaced state is freed, which for flax Variables (reference cycles) is
    the next full run of Python's cyclic collector; until then a push gets a new arena. At most
    `keep` arenas are held: between pushes the server keeps up to one spare copy of the model.
    """

    def __init__(self, keep: int = 2):
        self._keep = keep
        self._arenas: list[_Arena] = []
        self._lock = threading.Lock()

    def lease(self, capacity: int) -> _Arena:
        """An idle arena of at least `capacity` bytes (a new one when none is free); `release` it after the push."""
        with self._lock:
            arena = next((a for a in self._arenas if a.capacity >= capacity and a.idle()), None)
            if arena is None:
                arena = _Arena(capacity)
            else:
                self._arenas.remove(arena)
            self._arenas.insert(0, arena)
            del self._arenas[self._keep :]
            arena.lease()
            return arena

    def release(self, arena: _Arena) -> None:
        with self._lock:
            arena.leased = False


def stream_capacity(expected: Mapping[str, tuple[tuple[int, ...], str]]) -> int:
    """Arena bytes for one push matching `expected`: every tensor, each padded to 64 bytes."""
    return sum(
        _padded(int(np.prod(shape, dtype=np.int64)) * _numpy_dtype(dtype_name(dtype)).itemsize)
        for shape, dtype in expected.values()
    )


def read_stream(
    readinto: Callable[[memoryview], None],
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    prepare: Callable[[str, np.ndarray], Any] | None = None,
    buffers: ReceiveBuffers | None = None,
) -> dict[str, Any]:
    """Parse and validate a whole push; returns name -> tensor only if it is complete and exact.

    `readinto(view)` fills the whole view with the next body bytes or raises (EOF mid-frame
    is a truncated push). Every frame is checked against `expected` (name -> (shape, dtype
    name)) from its header, before its data is read, and its data is then read straight into
    a 64-byte-aligned array of that shape (no intermediate bytes objects), cut from an arena
    of `buffers` when given, else freshly allocated. `prepare`,
    when given, is called with each tensor as soon as it is complete (a backend starts its
    layout/device work while the rest still arrives) and its result is what is returned for
    that name. Raises WeightStreamError naming the first problem.
    """
    if buffers is None:
        return _read_frames(readinto, expected, prepare, aligned_empty)
    arena = buffers.lease(stream_capacity(expected))
    try:
        return _read_frames(readinto, expected, prepare, arena.take)
    finally:
        buffers.release(arena)


def _read_frames(
    readinto: Callable[[memoryview], None],
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    prepare: Callable[[str, np.ndarray], Any] | None,
    allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray],
) -> dict[str, Any]:
    want = {name: (tuple(shape), dtype_name(dtype)) for name, (shape, dtype) in expected.items()}
    received: dict[str, Any] = {}
    while True:
        header = _read_header(readinto)
        if "__metadata__" in header and len(header) == 1:
            meta = header["__metadata__"]
            if not isinstance(meta, dict) or END_KEY not in meta:
                raise WeightStreamError(f"frame with no tensor and no {END_KEY!r} metadata: {meta!r}")
            if str(meta[END_KEY]) != str(len(received)):
                raise WeightStreamError(
                    f"end frame says {meta[END_KEY]} tensors but the stream carried {len(received)}"
                )
            break
        name, array = _read_tensor(readinto, header, want, received, allocate)
        received[name] = array if prepare is None else prepare(name, array)
    missing = sorted(set(want) - set(received))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightStreamError(f"push is missing {len(missing)} of {len(want)} tensors: {shown}")
    return received


def _read_bytes(readinto: Callable[[memoryview], None], n: int) -> bytearray:
    data = bytearray(n)
    if n:
        readinto(memoryview(data))
    return data


def _read_header(readinto: Callable[[memoryview], None]) -> dict:
    (size,) = struct.unpack("<Q", _read_bytes(readinto, 8))
    if size > _MAX_HEADER_BYTES:
        raise WeightStreamError(f"frame header of {size} bytes exceeds the {_MAX_HEADER_BYTES}-byte limit")
    try:
        header = json.loads(_read_bytes(readinto, size).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightStreamError(f"frame header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise WeightStreamError(f"frame header must be a JSON object, got {type(header).__name__}")
    return header


def _read_tensor(
    readinto: Callable[[memoryview], None],
    header: dict,
    want: Mapping[str, tuple[tuple[int, ...], str]],
    received: Mapping[str, Any],
    allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray],
) -> tuple[str, np.ndarray]:
    names = [key for key in header if key != "__metadata__"]
    if len(names) != 1:
        raise WeightStreamError(f"each frame must hold exactly one tensor, this one holds {len(names)}: {names[:5]}")
    (name,) = names
    info = header[name]
    if name not in want:
        raise WeightStreamError(f"unknown tensor {name!r}: the model has no weight of that name")
    if name in received:
        raise WeightStreamError(f"tensor {name!r} sent twice")
    try:
        kind = _CODE_DTYPES[info["dtype"]]
        shape = tuple(int(dim) for dim in info["shape"])
        start, stop = (int(offset) for offset in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise WeightStreamError(f"tensor {name!r}: malformed header entry {info!r}") from None
    want_shape, want_dtype = want[name]
    if shape != want_shape:
        raise WeightStreamError(f"tensor {name!r}: shape {list(shape)}, expected {list(want_shape)}")
    if kind != want_dtype:
        raise WeightStreamError(f"tensor {name!r}: dtype {kind}, expected {want_dtype}")
    dtype = _numpy_dtype(kind)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if (start, stop) != (0, nbytes):
        raise WeightStreamError(f"tensor {name!r}: data_offsets [{start}, {stop}], expected [0, {nbytes}]")
    # Little-endian on the wire; on a little-endian host both astype calls below are no-ops.
    array = allocate(shape, dtype.newbyteorder("<"))
    if nbytes:
        readinto(memoryview(array.reshape(-1).view(np.uint8)))
    return name, array.astype(dtype, copy=False)
