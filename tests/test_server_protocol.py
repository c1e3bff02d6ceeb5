"""The /generate request validator and the weight-stream framing, without a server (fast, no jax)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load as safetensors_load

from maxent_jax.rollout.backend import Completion
from maxent_jax.rollout.protocol import ProtocolError, generate_response, openapi_schema, parse_generate, parse_weight_layout
from maxent_jax.rollout.push import push_layout, send_chunked
from maxent_jax.rollout.request_body import RequestBody
from maxent_jax.rollout.weights import ReceiveBuffers, WeightStreamError, encode_frame, iter_stream, read_stream


def test_reference_client_payload_is_accepted():
    # The body the reference trainer sends (REFERENCE_SPEC 3.4), with every optional field present.
    payload = {
        "prompts": ["a", "b"], "temperature": 0.8, "top_p": 0.9, "n": 4, "max_tokens": 32, "stream": False,
        "request_id": "maxent-abc",
        "sampling_params": {"temperature": 0.8, "top_p": 0.9, "n": 4, "max_tokens": 32, "frequency_penalty": 0.0,
                            "presence_penalty": 0.0, "logprobs": 1},
        "return_logprobs": True, "logprobs": 1, "frequency_penalty": 0.0, "presence_penalty": 0.0,
        "stop": ["</answer>"], "client_tag": "rank-0-of-2",
    }
    req = parse_generate(payload, header_tag="ignored-when-payload-has-one")
    assert req.texts == ["a", "b"] and req.token_ids is None
    p = req.params
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.stop, p.logprobs) == (4, 32, 0.8, 0.9, ("</answer>",), True)
    assert req.client_tag == "rank-0-of-2" and req.request_id == "maxent-abc"


def test_header_tag_used_when_payload_has_none():
    req = parse_generate({"prompt_token_ids": [[1, 2]]}, header_tag="from-header")
    assert req.client_tag == "from-header" and req.token_ids == [[1, 2]]


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"prompt_token_ids": [[1]], "bogus": 1}, "unknown field 'bogus'"),
        ({"prompt_token_ids": [[1]], "sampling_params": {"tempreature": 1}}, "sampling_params.tempreature"),
        ({"prompt_token_ids": [[1]], "n": 0}, "'n': must be >= 1"),
        ({"prompt_token_ids": [[1]], "n": "4"}, "field 'n': expected int"),
        ({"prompt_token_ids": [[1]], "n": True}, "field 'n': expected int"),
        ({"prompt_token_ids": [[1]], "top_p": 0.0}, "'top_p': must be in (0, 1]"),
        ({"prompt_token_ids": [[1]], "temperature": -1}, "'temperature'"),
        ({"prompt_token_ids": [[1]], "max_tokens": 0}, "'max_tokens'"),
        ({"prompt_token_ids": [[1]], "n": 2, "sampling_params": {"n": 3}}, "top level says 2 but sampling_params says 3"),
        ({"prompt_token_ids": [[1]], "stream": True}, "'stream'"),
        ({"prompt_token_ids": [[1]], "frequency_penalty": 0.5}, "'frequency_penalty'"),
        ({"prompt_token_ids": [[1]], "best_of": 3}, "'best_of'"),
        ({"prompt_token_ids": [[1]], "guided_regex": "a+"}, "'guided_regex'"),
        ({"prompt_token_ids": [[1, -3]]}, "prompt_token_ids[0]"),
        ({"prompt_token_ids": [[]]}, "prompt_token_ids[0]"),
        ({"prompts": ["a"], "prompt_token_ids": [[1]]}, "exactly one of"),
        ({}, "exactly one of"),
        ({"prompts": [1, 2]}, "'prompts'"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_requests_name_the_field(payload, fragment):
    with pytest.raises(ProtocolError) as err:
        parse_generate(payload)
    assert fragment in str(err.value)
    assert err.value.status == 400


def test_response_tags_every_result_and_output_and_carries_reference_metadata():
    req = parse_generate({"prompt_token_ids": [[5], [6]], "n": 2, "client_tag": "t1", "request_id": "r"})
    comp = Completion(token_ids=[1, 2], logprobs=[-0.5, -0.25], text="xy", finish_reason="stop", sampling_logprobs=[-0.1, -0.2])
    body = generate_response(req, [[5], [6]], [[comp, comp], [comp, comp]], weight_version=3, model="m")
    json.dumps(body)  # serialisable
    assert body["client_tag"] == "t1" and body["weight_version"] == 3 and body["request_id"] == "r"
    assert [r["prompt_index"] for r in body["results"]] == [0, 1]
    for result in body["results"]:
        assert result["client_tag"] == "t1" and len(result["outputs"]) == 2
        for out in result["outputs"]:
            assert out["client_tag"] == "t1" and out["metadata"]["client_tag"] == "t1"
            assert out["metadata"]["logprob_sum"] == -0.75 and out["metadata"]["token_count"] == 2
            assert out["sampling_logprobs"] == [-0.1, -0.2]


def test_openapi_schema_lists_endpoints_and_request_fields():
    schema = openapi_schema()
    assert set(schema["paths"]) == {"/health", "/info", "/generate", "/weights", "/reset_prefix_cache", "/openapi.json"}
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"prompts", "prompt_token_ids", "n", "top_k", "client_tag", "sampling_params"} <= set(props)
    assert schema["components"]["schemas"]["GenerateRequest"]["additionalProperties"] is False


# -- weight stream framing ----------------------------------------------------------------


def _tensors():
    rng = np.random.default_rng(0)
    return [
        ("model.embed_tokens.weight", rng.normal(size=(6, 4)).astype(np.float32)),
        ("model.norm.weight", rng.normal(size=(4,)).astype(ml_dtypes.bfloat16)),
        ("lm_head.weight", rng.normal(size=(6, 4)).astype(np.float16)),
    ]


def _expected(tensors):
    return {name: (a.shape, str(a.dtype)) for name, a in tensors}


def _reader(stream: bytes):
    buf = io.BytesIO(stream)

    def readinto(view: memoryview) -> None:
        if buf.readinto(view) != len(view):
            raise WeightStreamError("stream ended early")

    return readinto


def _stream(tensors) -> bytes:
    return b"".join(bytes(chunk) for chunk in iter_stream(tensors))


def test_stream_round_trips_bit_exact_including_bfloat16():
    tensors = _tensors()
    got = read_stream(_reader(_stream(tensors)), _expected(tensors))
    for name, array in tensors:
        assert got[name].dtype == array.dtype
        np.testing.assert_array_equal(got[name].view(np.uint8), array.view(np.uint8))


def test_each_frame_is_a_valid_safetensors_file():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    header, data = encode_frame("w", array)
    loaded = safetensors_load(header + bytes(data))
    np.testing.assert_array_equal(loaded["w"], array)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda t: [("model.bogus", t[0][1])] + t[1:], "unknown tensor 'model.bogus'"),
        (lambda t: [(t[0][0], t[0][1][:5])] + t[1:], "shape [5, 4], expected [6, 4]"),
        (lambda t: [(t[0][0], t[0][1].astype(np.float16))] + t[1:], "dtype float16, expected float32"),
        (lambda t: t[:2], "missing 1 of 3 tensors: lm_head.weight"),
        (lambda t: t + t[:1], "sent twice"),
    ],
)
def test_wrong_pushes_are_refused_naming_the_tensor(mutate, fragment):
    tensors = _tensors()
    with pytest.raises(WeightStreamError) as err:
        read_stream(_reader(_stream(mutate(list(tensors)))), _expected(tensors))
    assert fragment in str(err.value)


def test_truncated_stream_and_wrong_end_count_are_refused():
    tensors = _tensors()
    stream = _stream(tensors)
    with pytest.raises(WeightStreamError, match="ended early"):
        read_stream(_reader(stream[:-40]), _expected(tensors))
    body = b"".join(bytes(c) for c in list(iter_stream(tensors))[:-1])
    from maxent_jax.rollout.weights import end_frame

    with pytest.raises(WeightStreamError, match="end frame says 2 tensors but the stream carried 3"):
        read_stream(_reader(body + end_frame(2)), _expected(tensors))


def test_received_tensors_are_fresh_64_byte_aligned_arrays_and_prepare_sees_each_one():
    # Alignment is what lets XLA:CPU adopt a received buffer without copying it.
    tensors = _tensors()
    seen = []

    def prepare(name, array):
        seen.append(name)
        return ("prepared", array)

    got = read_stream(_reader(_stream(tensors)), _expected(tensors), prepare)
    assert seen == [name for name, _ in tensors]
    for name, array in tensors:
        tag, received = got[name]
        assert tag == "prepared" and received.ctypes.data % 64 == 0 and received.flags.writeable
        np.testing.assert_array_equal(received.view(np.uint8), array.view(np.uint8))


def test_receive_buffers_are_reused_only_once_nothing_uses_them():
    tensors = _tensors()
    stream, expected = _stream(tensors), _expected(tensors)
    buffers = ReceiveBuffers()

    def push():
        return read_stream(_reader(stream), expected, buffers=buffers)

    def address(got):
        return got["model.embed_tokens.weight"].ctypes.data

    first = push()
    held = first["model.norm.weight"]  # one array of the first push is still in use ...
    first_address = address(first)
    del first
    second = push()
    assert address(second) != first_address  # ... so its arena is not overwritten
    np.testing.assert_array_equal(held.view(np.uint8), tensors[1][1].view(np.uint8))
    del held
    third = push()
    assert address(third) == first_address  # nothing refers to it any more: reused
    for name, array in tensors:
        np.testing.assert_array_equal(third[name].view(np.uint8), array.view(np.uint8))
        assert third[name].ctypes.data % 64 == 0


def _chunked(stream: bytes, sizes) -> bytes:
    """`stream` as an HTTP chunked body whose chunk sizes cycle through `sizes`."""
    out, pos, i = [], 0, 0
    while pos < len(stream):
        piece = stream[pos : pos + sizes[i % len(sizes)]]
        out.append(b"%X\r\n" % len(piece) + piece + b"\r\n")
        pos, i = pos + len(piece), i + 1
    return b"".join(out) + b"0\r\n\r\n"


def _body(raw: bytes, limit: int = 1 << 20, **headers) -> RequestBody:
    return RequestBody(io.BufferedReader(io.BytesIO(raw)), headers, limit)


@pytest.mark.parametrize("sizes", [(7,), (1, 300, 5000), (1 << 20,)])
def test_chunk_boundaries_anywhere_in_a_frame_parse_the_same(sizes):
    tensors = _tensors()
    body = _body(_chunked(_stream(tensors), sizes), **{"Transfer-Encoding": "chunked"})
    got = read_stream(body.readinto, _expected(tensors))
    assert body.at_end()
    for name, array in tensors:
        np.testing.assert_array_equal(got[name].view(np.uint8), array.view(np.uint8))


def test_content_length_body_and_its_truncation():
    tensors = _tensors()
    stream = _stream(tensors)
    body = _body(stream, **{"Content-Length": str(len(stream))})
    assert set(read_stream(body.readinto, _expected(tensors))) == {name for name, _ in tensors} and body.at_end()
    short = _body(stream[:-40], **{"Content-Length": str(len(stream))})  # the sender hung up early
    with pytest.raises(WeightStreamError, match="ended early"):
        read_stream(short.readinto, _expected(tensors))


def test_chunked_body_ending_mid_frame_or_over_the_limit_is_refused():
    tensors = _tensors()
    stream = _stream(tensors)
    with pytest.raises(WeightStreamError, match="ended early"):
        read_stream(_body(_chunked(stream[:-40], (64,)), **{"Transfer-Encoding": "chunked"}).readinto, _expected(tensors))
    with pytest.raises(ProtocolError, match=f"exceeds the limit of {len(stream) - 1} bytes") as err:
        read_stream(_body(_chunked(stream, (64,)), len(stream) - 1, **{"Transfer-Encoding": "chunked"}).readinto,
                    _expected(tensors))
    assert err.value.status == 413


class _RecordingSocket:
    def __init__(self):
        self.writes = []

    def sendall(self, data):
        self.writes.append(data)


def test_send_chunked_passes_tensor_buffers_through_and_gathers_small_pieces():
    big = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: sent as its own buffer
    pieces = list(iter_stream([("a", np.ones(3, np.float32)), ("big", big), ("c", np.zeros((2, 2), np.float16))]))
    sock = _RecordingSocket()
    send_chunked(sock, pieces + [b""])  # an empty piece must not end the body early
    big_view = next(p for p in pieces if isinstance(p, memoryview) and p.nbytes == big.nbytes)
    assert len(sock.writes) == 3 and sock.writes[1] is big_view  # gathered | the tensor itself | gathered
    raw = b"".join(bytes(w) for w in sock.writes)
    body = _body(raw, **{"Transfer-Encoding": "chunked"})
    expected = {"a": ((3,), "float32"), "big": (big.shape, "float32"), "c": ((2, 2), "float16")}
    got = read_stream(body.readinto, expected)
    assert body.at_end()
    np.testing.assert_array_equal(got["big"], big)


# -- what the server side imports, and the entry point's one-line errors -------------------


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_server_and_client_modules_do_not_import_jax():
    # The vLLM environment has no jax; the server, protocol, framing and client must not need it.
    code = (
        "import sys; import maxent_jax.serve, maxent_jax.rollout.server, maxent_jax.rollout.client; "
        "bad = sorted(m for m in ('jax', 'flax', 'vllm', 'torch') if m in sys.modules); print(bad); sys.exit(bool(bad))"
    )
    result = _python("-c", code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_reports_bad_flags_in_one_line(tmp_path):
    result = _python("-m", "maxent_jax.serve", "--model", str(tmp_path / "missing"))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: --model {str(tmp_path / 'missing')!r}: not a directory; expected a Hugging Face model directory"
    )
    empty = tmp_path / "token"
    empty.write_text("  \n")
    result = _python("-m", "maxent_jax.serve", "--model", str(tmp_path), "--token-file", str(empty))
    assert result.returncode == 2 and "the file is empty" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "query, offered, outcome",
    [
        ("", ("hf",), "hf"),
        ("layout=hf", ("hf",), "hf"),
        ("layout=native", ("hf", "native"), "native"),
        ("layout=transposed", ("hf", "native"), "layout='transposed' is not a weight layout; valid: 'hf', 'native'"),
        ("layout=native", ("hf",), "layout='native': the fake backend takes only 'hf'"),
        ("layout=hf&layout=native", ("hf", "native"), "'layout' given 2 times"),
        ("lay_out=native", ("hf", "native"), "unknown query parameter 'lay_out'"),
    ],
)
def test_weight_layout_query_parameter(query, offered, outcome):
    if outcome in ("hf", "native"):
        assert parse_weight_layout(query, offered, "fake") == outcome
        return
    with pytest.raises(ProtocolError) as err:
        parse_weight_layout(query, offered, "fake")
    assert err.value.status == 400 and outcome in str(err.value)


def test_client_pushes_native_only_where_the_server_offers_it():
    assert push_layout({"weight_layouts": ["hf", "native"]}) == "native"
    assert push_layout({"weight_layouts": ["hf"]}) == "hf"  # e.g. a vLLM server
    assert push_layout({"dtype": "float32"}) == "hf"  # a server from before weight layouts


class _HfOnlyBackend:
    """The weight side of a backend that takes HF layouts only (as vLLM's): one [2, 3] tensor."""

    def __init__(self):
        self.loaded: dict[str, np.ndarray] = {}

    def info(self) -> dict:
        return {"model": "fake", "backend": "fake", "dtype": "float32"}

    def expected_weights(self) -> dict:
        return {"w": ((2, 3), "float32")}

    def load_weights(self, named_tensors) -> None:
        self.loaded = dict(named_tensors)

    def reset_prefix_cache(self) -> None:
        pass


def test_a_server_without_native_layout_refuses_a_native_push_and_applies_nothing():
    from maxent_jax.rollout.client import RolloutClient
    from maxent_jax.rollout.completions import RolloutError
    from maxent_jax.rollout.server import RolloutServer

    backend = _HfOnlyBackend()
    server = RolloutServer(backend, port=0, token="t0k").start()
    try:
        client = RolloutClient(server.url, token="t0k", max_retries=1)
        assert client.info()["weight_layouts"] == ["hf"]
        weights = [("w", np.arange(6, dtype=np.float32).reshape(2, 3))]
        for layout, fragment in (("native", "the fake backend takes only 'hf'"), ("bogus", "valid: 'hf', 'native'")):
            with pytest.raises(RolloutError) as err:
                client.push_weights(weights, layout=layout)
            message = str(err.value)
            assert "HTTP 400" in message and "nothing applied" in message and fragment in message
        assert backend.loaded == {} and client.info()["weight_version"] == 0
        report = client.push_weights(weights)  # the same connection pattern still works in HF layout
        assert report["layout"] == "hf" and report["weight_version"] == 1
        np.testing.assert_array_equal(backend.loaded["w"], weights[0][1])
    finally:
        server.stop()
