"""A real tiny jax-backend rollout server on loopback under hostile input: every request the
issue found crashing or monopolising it, and a property-based fuzz of the whole protocol.

One server for the module (thread mode, so its parameter state can be compared), with small
limits so that whatever the fuzz makes valid compiles only a few small programs, a 1 s
read timeout so stalled connections are seen to be closed, and a 3 s request deadline and 6
connection threads so a client that dribbles its request is seen to be cut off.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
import urllib.parse

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.client import RolloutClient
from maxent_jax.rollout.limits import RequestLimits
from tests.rollout_fixtures import TOKEN, rollout_model_dirs, start_rollout_server  # noqa: F401 - fixtures

LIMITS = RequestLimits(max_completions_per_request=4, max_request_tokens=40, max_queued_requests=8)
READ_TIMEOUT_S = 1.0
REQUEST_DEADLINE_S = 3.0
MAX_CONNECTIONS = 6
JSON_HEADERS = {"Content-Type": "application/json"}
# The one shape of valid request the module runs (the split test's too), so the server compiles
# one program per prompt count (1 and 2).
_VALID = {"prompt_token_ids": [[1, 20, 30]], "n": 2, "max_tokens": 4, "temperature": 0.9, "seed": 1}


@pytest.fixture(scope="module")
def server(rollout_model_dirs):
    with start_rollout_server("jax", rollout_model_dirs[0], limits=LIMITS, read_timeout=READ_TIMEOUT_S,
                              request_deadline=REQUEST_DEADLINE_S, max_connections=MAX_CONNECTIONS) as (url, srv):
        for prompts in (1, 2):  # compile the module's two programs here, not inside whichever test is first
            payload = json.dumps({**_VALID, "prompt_token_ids": _VALID["prompt_token_ids"] * prompts}).encode()
            assert _request(url, "POST", "/generate", payload, JSON_HEADERS)[0] == 200
        yield url, srv


def _weights(srv) -> list[np.ndarray]:
    import jax

    return [np.array(leaf) for leaf in jax.tree_util.tree_leaves(srv.backend.state)]


def _request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of one request on a fresh connection."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def _assert_json_answer(method: str, status: int, headers, raw: bytes) -> None:
    """A 2xx, or a 4xx with the JSON error body every refusal uses."""
    assert 200 <= status < 300 or 400 <= status < 500, (status, raw[:300])
    assert headers.get("Content-Type") == "application/json", (status, headers.get("Content-Type"), raw[:200])
    if method == "HEAD":
        assert raw == b""
        return
    body = json.loads(raw)
    if status >= 400:
        assert isinstance(body.get("error"), str) and body["error"] and body["status"] == status, body


def _healthy(url: str) -> bool:
    return _request(url, "GET", "/health")[:1] == (200,)


# -- the issue's findings, one by one (each was a 500, a dropped connection or an HTML page) ---

BIG = 2**70


# (method, body, extra headers, status, what the error says); tests/test_vllm_backend.py sends them to vLLM too.
HOSTILE = [
        ("POST", {"prompts": [""]}, {}, 400, "prompt 0 is empty after tokenization"),
        ("POST", {"prompt_token_ids": [[1, 2]], "seed": BIG}, {}, 400, "'seed': must be in [0, 2**63)"),
        ("POST", {"prompt_token_ids": [[1, 2]], "top_k": BIG}, {}, 400, "'top_k': must fit in a 32-bit integer"),
        ("POST", {"prompt_token_ids": [[1, 2]], "stop_token_ids": [BIG]}, {}, 400, "'stop_token_ids': token ids must be in"),
        ("POST", {"prompt_token_ids": [[1, 2]], "stop_token_ids": [10**6]}, {}, 400, "token id 1000000 is outside the vocabulary"),
        ("POST", b"[" * 200_000 + b"]" * 200_000, {}, 400, "nests JSON arrays/objects too deeply"),
        ("POST", {"prompts": ["a\ud800"]}, {}, 400, "'prompts[0]': not valid Unicode text"),
        ("POST", b"{}", {"Content-Length": "-5"}, 400, "bad Content-Length header '-5'"),
        ("PUT", {"prompt_token_ids": [[1]]}, {}, 405, "method 'PUT' is not allowed; this server answers GET and POST"),
        ("DELETE", None, {}, 405, "method 'DELETE' is not allowed"),
        ("FROB", None, {}, 405, "method 'FROB' is not allowed"),
]


@pytest.mark.parametrize("method, body, headers, status, fragment", HOSTILE)
def test_hostile_requests_get_a_json_4xx_and_the_server_keeps_serving(server, method, body, headers, status, fragment):
    url, _ = server
    raw = body if isinstance(body, bytes) or body is None else json.dumps({"max_tokens": 2, **body}).encode()  # within LIMITS
    got, response_headers, reply = _request(url, method, "/generate", raw, {**JSON_HEADERS, **headers})
    _assert_json_answer(method, got, response_headers, reply)
    assert got == status and fragment in json.loads(reply)["error"]
    if status == 405:
        assert response_headers["Allow"] == "GET, POST"
    assert _healthy(url)


def _raw_exchange(url: str, data: bytes, wait_s: float) -> bytes:
    """Send `data` on a raw socket, then read until the server closes it (or `wait_s` passes)."""
    port = urllib.parse.urlsplit(url).port
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        chunks, deadline = [], time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    raise AssertionError(f"the server kept the connection open for {wait_s} s; got {b''.join(chunks)[:200]!r}")


def test_an_http_version_it_does_not_speak_is_a_json_400(server):
    url, _ = server
    reply = _raw_exchange(url, b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", wait_s=10)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Content-Type: application/json" in head  # was 505, HTML
    assert json.loads(body)["status"] == 400


def test_stalled_connections_are_closed_after_the_read_timeout(server):
    url, _ = server
    start = time.monotonic()
    # Headers promise 100 bytes, one arrives: a JSON 408, then the connection closes.
    reply = _raw_exchange(url, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", wait_s=10)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and "no bytes for 1 s" in json.loads(body)["error"]
    # Half a request line: closed without an answer (there is no request to answer).
    assert _raw_exchange(url, b"POST /gen", wait_s=10) == b""
    assert time.monotonic() - start < 8 and _healthy(url)


class _Dribbler(threading.Thread):
    """A slowloris: sends `data` one byte every `interval` s (each read gets its byte long before
    the 1 s read timeout) until the server answers or closes; records when and what came back."""

    def __init__(self, url: str, data: bytes, interval: float = 0.3):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", urllib.parse.urlsplit(url).port), timeout=30)
        self.data, self.interval = data, interval
        self.reply, self.seconds = b"", None

    def run(self) -> None:
        start = time.monotonic()
        with self.sock:
            for byte in self.data:
                try:
                    self.sock.sendall(bytes([byte]))
                except OSError:  # reset: the server closed it
                    break
                readable, _, _ = select.select([self.sock], [], [], self.interval)
                if readable:
                    break
            chunks = []
            try:
                while chunk := self.sock.recv(65536):
                    chunks.append(chunk)
            except OSError:
                pass
            self.reply, self.seconds = b"".join(chunks), time.monotonic() - start


def test_a_client_dribbling_its_request_is_cut_off_at_the_deadline_and_others_are_served(server):
    """One byte every 0.3 s never trips the 1 s read timeout; the 3 s request deadline ends it,
    in the headers (closed: no request to answer) or in the body (a JSON 408 naming the deadline)."""
    url, _ = server
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n"
    in_headers = _Dribbler(url, head * 4)
    in_body = _Dribbler(url, b"{" * 200)
    in_body.sock.sendall(head)
    in_headers.start(), in_body.start()
    served = 0
    while in_headers.is_alive() or in_body.is_alive():
        assert _healthy(url)  # the server answers others meanwhile
        served += 1
        time.sleep(0.2)
    assert served >= 5
    assert REQUEST_DEADLINE_S - 0.5 < in_headers.seconds < REQUEST_DEADLINE_S + 4 and in_headers.reply == b""
    assert REQUEST_DEADLINE_S - 0.5 < in_body.seconds < REQUEST_DEADLINE_S + 4
    status_line, _, body = in_body.reply.partition(b"\r\n\r\n")
    assert status_line.startswith(b"HTTP/1.1 408 "), in_body.reply[:300]
    assert "within the server's deadline of 3 s" in json.loads(body)["error"]


def test_connections_beyond_the_bound_get_a_503_and_the_server_recovers(server):
    url, _ = server
    dribblers = [_Dribbler(url, b"GET /health HTTP/1.1\r\nHost: x\r\n" * 4) for _ in range(MAX_CONNECTIONS)]
    for d in dribblers:
        d.start()
    time.sleep(0.5)  # every dribbler holds a connection thread now
    status, headers, raw = _request(url, "GET", "/health")
    assert status == 503 and "max_connections=6" in json.loads(raw)["error"], raw[:300]
    assert headers.get("Content-Type") == "application/json" and headers.get("Retry-After") == "1"
    for d in dribblers:
        d.join(timeout=REQUEST_DEADLINE_S + 5)
        assert not d.is_alive() and d.seconds < REQUEST_DEADLINE_S + 4
    assert _healthy(url)


def test_work_per_request_is_bounded_and_a_small_request_does_not_wait_behind_it(server):
    url, _ = server
    cases = [
        ({"prompt_token_ids": [[1, 2]], "n": 200_000, "max_tokens": 1}, "200000 completions (1 prompts x n=200000)",
         "max_completions_per_request=4"),
        ({"prompt_token_ids": [[7]] * 200_000, "max_tokens": 1}, "200000 completions", "max_completions_per_request=4"),
        ({"prompts": ["x"] * 200_000, "max_tokens": 1}, "200000 completions", "max_completions_per_request=4"),
        ({"prompt_token_ids": [[1, 2, 3]] * 2, "n": 2, "max_tokens": 8}, "needs 44 tokens", "max_request_tokens=40"),
    ]
    for payload, asked, limit in cases:
        start = time.monotonic()
        status, headers, raw = _request(url, "POST", "/generate", json.dumps(payload).encode(), JSON_HEADERS)
        _assert_json_answer("POST", status, headers, raw)
        body = json.loads(raw)
        assert status == 413 and asked in body["error"] and limit in body["error"] and body["limits"] == LIMITS.as_json()
        assert time.monotonic() - start < 30  # refused before any engine work (n=200000 held it 91 s)
    info = json.loads(_request(url, "GET", "/info")[2])
    assert info["limits"] == {**LIMITS.as_json(), "max_request_bytes": 16 << 20, "read_timeout_s": READ_TIMEOUT_S,
                              "request_deadline_s": REQUEST_DEADLINE_S, "max_connections": MAX_CONNECTIONS}
    status, _, raw = _request(url, "POST", "/generate", json.dumps(_VALID).encode(), JSON_HEADERS)
    assert status == 200 and len(json.loads(raw)["results"][0]["outputs"]) == 2


def test_the_client_splits_a_request_over_the_limits_and_keeps_piece_one_as_sent(server):
    url, _ = server
    client = RolloutClient(url, client_tag="splitter")
    prompts = [[1, 20 + i, 30] for i in range(5)]
    params = SamplingParams(n=2, max_tokens=4, temperature=0.9, seed=5)
    batch = client.generate(prompts, params)  # 10 completions > 4: refused once, then 3 pieces
    assert client.server_limits == LIMITS and batch.metrics["rollout/request_pieces"] == 3
    assert [len(g) for g in batch.groups] == [2] * 5 and batch.metrics["rollout/completions"] == 10
    alone = client.generate(prompts[:2], params)  # the first piece is the request it would have been
    assert [[s.token_ids.tolist() for s in g] for g in alone.groups] == [[s.token_ids.tolist() for s in g] for g in batch.groups[:2]]
    later = [[s.token_ids.tolist() for s in g] for g in batch.groups[2:]]
    assert later != [[s.token_ids.tolist() for s in g] for g in client.generate(prompts[2:4], params).groups] + later[2:]


# -- property-based fuzz of the protocol ----------------------------------------------------

_FIELDS = ["prompts", "prompt_token_ids", "sampling_params", "n", "max_tokens", "temperature", "top_p", "top_k", "stop",
           "stop_token_ids", "ignore_eos", "seed", "logprobs", "best_of", "frequency_penalty", "presence_penalty",
           "return_logprobs", "client_tag", "request_id", "stream", "logit_bias", "guided_json", "guided_regex"]
_TEXT = st.text(max_size=12) | st.sampled_from(["", "\ud800", "a\udfffb", "</answer>", "x" * 300])
_SCALARS = (st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.integers(-3, 40)
            | st.floats(allow_nan=True, allow_infinity=True) | _TEXT)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_TEXT, inner, max_size=4), max_leaves=24)
# Valid changes to _VALID that keep its compiled program (no greedy, no top-k/top-p, same shapes).
_VARIANTS = [{"stop": ["a"]}, {"stop": "e"}, {"stop_token_ids": [5, 6]}, {"ignore_eos": True}, {"logprobs": 0},
             {"logprobs": None}, {"return_logprobs": False}, {"client_tag": "fuzz"}, {"request_id": "r1"},
             {"sampling_params": {"n": 2, "max_tokens": 4}}, {"prompt_token_ids": None, "prompts": ["What is 2 + 3?"]},
             {"seed": 2**62}, {"seed": None}, {"best_of": 2}, {"frequency_penalty": 0}, {"stream": False},
             {"logit_bias": {}}, {"guided_json": None}]
_VALID_BODIES = st.lists(st.sampled_from(_VARIANTS), max_size=3).map(lambda changes: {k: v for k, v in {
    **_VALID, **{k: v for change in changes for k, v in change.items()}}.items() if v is not None or k != "prompt_token_ids"})
_BODIES = st.one_of(
    _JSON.map(json.dumps),  # any JSON value
    st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=6).map(json.dumps),  # known fields, any values
    _VALID_BODIES.map(json.dumps),  # valid requests
    st.tuples(_VALID_BODIES, st.sampled_from(_FIELDS), _JSON).map(lambda b: json.dumps({**b[0], b[1]: b[2]})),  # one field off
    st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),
    st.binary(max_size=80),
)


def _mostly(common: st.SearchStrategy, rare: st.SearchStrategy, percent: int) -> st.SearchStrategy:
    """`common` in about `percent`% of draws, else `rare` (one_of would split evenly)."""
    return st.integers(0, 99).flatmap(lambda i: common if i < percent else rare)


_PATHS = _mostly(st.just("/generate"), st.sampled_from(
    ["/weights", "/weights?layout=native", "/weights?layout=x&y=1", "/health", "/info", "/openapi.json",
     "/reset_prefix_cache", "/", "/generate/", "/generate?x=1", "//", "/%00"]) | st.from_regex(r"\A/[A-Za-z0-9_./?=&%-]{0,24}\Z"), 70)
_METHODS = _mostly(st.just("POST"), st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"])
                   | st.from_regex(r"\A[A-Z]{1,8}\Z"), 80)
_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=30)
_HEADERS = st.dictionaries(
    st.sampled_from(["X-VLLM-Client-Tag", "Content-Type", "X-Weight-Version", "Accept", "Expect", "X-Other"])
    | st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z").filter(
        lambda k: k.lower() not in ("content-length", "transfer-encoding", "host", "connection")),
    _HEADER_TEXT, max_size=4)
_AUTH = st.sampled_from([None, f"Bearer {TOKEN}", "Bearer wrong", "Basic x"])


@settings(max_examples=150, deadline=30_000, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=_METHODS, path=_PATHS, body=_BODIES, headers=_HEADERS, auth=_AUTH)
def test_fuzz_every_answer_is_2xx_or_json_4xx_and_the_server_is_unharmed(server, baseline_weights, method, path, body, headers, auth):
    url, srv = server
    raw = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
    if auth is not None:
        headers = {**headers, "Authorization": auth}
    status, response_headers, reply = _request(url, method, path, raw, headers)
    event(f"HTTP {status}")  # --hypothesis-show-statistics: how the examples were answered
    _assert_json_answer(method, status, response_headers, reply)
    assert _healthy(url) and srv.weight_version == 0
    for old, new in zip(baseline_weights, _weights(srv), strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.fixture(scope="module")
def baseline_weights(server):
    """The server's parameters before the fuzz: every example must leave them exactly so."""
    return _weights(server[1])
