"""The rollout client against scripted servers: tags, retries, garbage, timeouts (fast, no jax, no model)."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.client import RolloutClient, base_url
from maxent_jax.rollout.completions import ClientTagError, RolloutError, prompt_char_limit, resolve_client_tag

PARAMS = SamplingParams(n=2, max_tokens=4)


def _output(tag, ids=(4, 5), version=0):
    out = {"text": "x", "token_ids": list(ids), "logprobs": [-0.5] * len(ids), "finish_reason": "length"}
    if tag is not None:
        out["client_tag"] = tag
        out["metadata"] = {"client_tag": tag, "weight_version": version}
    return out


def _body(groups, version=0, tag_results=True):
    results = []
    for i, outputs in enumerate(groups):
        result = {"prompt_index": i, "outputs": outputs}
        tags = {o.get("client_tag") for o in outputs}
        if tag_results and len(tags) == 1 and None not in tags:
            result["client_tag"] = tags.pop()
        results.append(result)
    return {"weight_version": version, "results": results}


class Scripted:
    """A loopback HTTP server answering each request with the next (status, body bytes, delay) of a script."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                outer.requests.append((dict(self.headers), json.loads(self.rfile.read(length) or b"null")))
                status, body, delay = outer.script.pop(0) if outer.script else (500, b"script exhausted", 0)
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(*script):
        server = Scripted([(s, json.dumps(b).encode() if not isinstance(b, bytes) else b, d) for s, b, d in script])
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def _client(url, **kw):
    kw.setdefault("backoff", 0.01)
    return RolloutClient(url, client_tag=kw.pop("client_tag", "me"), **kw)


def test_tag_is_sent_in_payload_and_header_and_results_are_grouped(scripted):
    server = scripted((200, _body([[_output("me"), _output("me", (7,))], [_output("me"), _output("me")]], version=3), 0))
    batch = _client(server.url).generate(["p0", "p1"], PARAMS, current_step=5)
    headers, payload = server.requests[0]
    assert payload["client_tag"] == "me" and headers["X-VLLM-Client-Tag"] == "me"
    assert payload["prompts"] == ["p0", "p1"] and payload["n"] == 2 and payload["request_id"].startswith("maxent-")
    assert len(headers["X-VLLM-Group-Request-ID"]) == 64
    assert [len(g) for g in batch.groups] == [2, 2] and batch.groups[0][1].token_ids.tolist() == [7]
    assert batch.groups[0][0].logprobs.dtype == np.float32
    assert batch.weight_version == 3 and batch.metrics["rollout/weight_staleness_steps"] == 2.0


def test_foreign_tags_are_dropped_and_counted(scripted):
    body = _body([[_output("me"), _output("other")], [_output("other"), _output("other")], [_output("me"), _output("me")]])
    server = scripted((200, body, 0))
    client = _client(server.url)
    batch = client.generate(["a", "b", "c"], PARAMS)
    assert [len(g) for g in batch.groups] == [1, 0, 2]
    assert batch.metrics["rollout/foreign_tag_dropped"] == 2.0  # one output, plus one whole result
    assert batch.metrics["rollout/partial_prompts"] == 1.0 and batch.metrics["rollout/empty_prompts"] == 1.0
    assert client.dropped_foreign == 2


def test_all_foreign_is_an_error(scripted):
    server = scripted((200, _body([[_output("other")]]), 0))
    with pytest.raises(ClientTagError, match="no completions for client_tag 'me'"):
        _client(server.url).generate(["a"], PARAMS)


def test_server_without_tag_echo_is_an_error_unless_allowed(scripted):
    untagged = _body([[_output(None), _output(None)]])
    server = scripted((200, untagged, 0), (200, untagged, 0))
    with pytest.raises(ClientTagError, match="without a client_tag echo"):
        _client(server.url).generate(["a"], PARAMS)
    assert len(server.requests) == 1  # a protocol mismatch is not retried
    batch = _client(server.url, require_tag_echo=False).generate(["a"], PARAMS)
    assert len(batch.groups[0]) == 2


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"<html>oops</html>", "non-JSON body"),
        ({"choices": []}, "without a 'results' list"),
        ({"results": [], "weight_version": "v1"}, "integer 'weight_version'"),
        ({"results": [{"outputs": [{"client_tag": "me", "token_ids": "abc"}]}], "weight_version": 0}, "integer 'token_ids'"),
        ({"results": [{"outputs": [{"client_tag": "me", "token_ids": [1, 2], "logprobs": [0.0]}]}], "weight_version": 0},
         "do not match its 2 tokens"),
        ({"results": [{"prompt_index": 9, "outputs": []}], "weight_version": 0}, "prompt_index 9"),
    ],
)
def test_garbage_responses_fail_clearly_without_retrying(scripted, body, fragment):
    server = scripted((200, body, 0))
    with pytest.raises(RolloutError) as err:
        _client(server.url).generate(["a"], PARAMS)
    assert fragment in str(err.value) and server.url in str(err.value)
    assert len(server.requests) == 1


def test_5xx_is_retried_with_backoff_then_succeeds(scripted):
    server = scripted((503, b"busy", 0), (500, b"{}", 0), (200, _body([[_output("me")]]), 0))
    batch = _client(server.url, max_retries=3).generate(["a"], PARAMS)
    assert batch.metrics["rollout/attempts"] == 3.0 and len(server.requests) == 3


def test_after_the_last_attempt_the_error_names_url_attempts_and_status(scripted):
    server = scripted(*[(502, b"bad gateway", 0)] * 3)
    with pytest.raises(RolloutError) as err:
        _client(server.url, max_retries=3).generate(["a"], PARAMS)
    message = str(err.value)
    assert f"{server.url}/generate failed after 3 attempt(s)" in message and "HTTP 502: bad gateway" in message


def test_4xx_fails_at_once_with_the_servers_message(scripted):
    server = scripted((400, {"error": "field 'n': must be >= 1", "status": 400}, 0))
    with pytest.raises(RolloutError, match=r"refused \(HTTP 400\): field 'n': must be >= 1"):
        _client(server.url).generate(["a"], PARAMS)
    assert len(server.requests) == 1


def test_timeout_is_retried_and_reported(scripted):
    server = scripted((200, b"{}", 1.0), (200, b"{}", 1.0))
    with pytest.raises(RolloutError, match="failed after 2 attempt\\(s\\); last: (TimeoutError|timeout)"):
        _client(server.url, timeout=0.2, max_retries=2).generate(["a"], PARAMS)


def test_dead_server_connection_refused_after_retries():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(RolloutError, match=f"127.0.0.1:{port}/generate failed after 3 attempt\\(s\\); last: ConnectionRefusedError"):
        _client(f"http://127.0.0.1:{port}", max_retries=3, backoff=0.05, backoff_multiplier=2.0).generate(["a"], PARAMS)
    assert time.monotonic() - start >= 0.05 + 0.1  # slept backoff * multiplier^k between attempts


def test_prompts_are_clipped_by_characters(scripted, monkeypatch):
    server = scripted((200, _body([[_output("me")], [_output("me")]]), 0))
    client = RolloutClient(server.url, client_tag="me", max_prompt_length=8, env={"MAX_PROMPT_CHARS": "40"})
    batch = client.generate(["x" * 100, "short"], PARAMS)
    assert server.requests[0][1]["prompts"] == ["x" * 40, "short"]
    assert batch.metrics["rollout/clipped_prompts"] == 1.0


def test_tag_resolution_order():
    assert resolve_client_tag("explicit", {"VLLM_CLIENT_TAG": "env"}) == "explicit"
    assert resolve_client_tag(None, {"VLLM_CLIENT_TAG": "env", "SLURM_PROCID": "3"}) == "env"
    assert resolve_client_tag(None, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == "rank-3-of-4"
    assert resolve_client_tag(None, {}) == "rank-0-of-1"


def test_char_limit_and_url_forms():
    assert prompt_char_limit(512, {}) == 2048
    assert prompt_char_limit(1024, {}) == 4096
    assert prompt_char_limit(100, {"MAX_PROMPT_CHARS": "5000"}) == 5000
    with pytest.raises(ValueError, match="MAX_PROMPT_CHARS='lots'"):
        prompt_char_limit(100, {"MAX_PROMPT_CHARS": "lots"})
    assert base_url("http://localhost:8000/generate") == "http://localhost:8000"
    assert base_url("127.0.0.1:9000") == "http://127.0.0.1:9000"
    with pytest.raises(ValueError, match="expected http://host:port"):
        base_url("https://example.com")


def test_flat_results_are_regrouped_in_blocks_of_n(scripted):
    flat = {"weight_version": 0, "results": [{"client_tag": "me", "outputs": [_output("me", (i,))]} for i in range(4)]}
    server = scripted((200, flat, 0))
    batch = _client(server.url).generate(["a", "b"], PARAMS)
    assert [[s.token_ids.tolist() for s in g] for g in batch.groups] == [[[0], [1]], [[2], [3]]]


def test_short_groups_are_filled_in_further_rounds(scripted):
    first = _body([[_output("me"), _output("other")], [_output("me"), _output("me")]])
    second = _body([[_output("me", (9,))]])
    server = scripted((200, first, 0), (200, second, 0))
    batch = _client(server.url).generate_groups(["a", "b"], dataclasses.replace(PARAMS, seed=5), retry_sleep=0.0)
    assert [len(g) for g in batch.groups] == [2, 2] and batch.groups[0][1].token_ids.tolist() == [9]
    payload = server.requests[1][1]
    assert payload["prompts"] == ["a"] and payload["n"] == 1 and payload["seed"] == 6  # only the need, a new seed
    assert batch.metrics["rollout/rounds"] == 2.0 and batch.metrics["rollout/partial_prompts"] == 0.0


def test_client_from_config(tmp_path):
    from maxent_jax.config import get_base_config

    config = get_base_config()
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    config.vllm.url, config.vllm.client_tag, config.vllm.token_file = "http://127.0.0.1:9001/generate", "tag-x", str(token)
    client = RolloutClient.from_config(config)
    assert (client.url, client.client_tag, client.token, client.max_retries) == ("http://127.0.0.1:9001", "tag-x", "s3cret", 3)
    assert client.char_limit == max(2048, 4 * config.rollout.max_prompt_length)


def test_429_server_busy_is_retried(scripted):
    server = scripted((429, {"error": "server busy", "status": 429}, 0), (200, _body([[_output("me")] * 2]), 0))
    batch = _client(server.url, max_retries=2).generate(["a"], PARAMS)
    assert batch.metrics["rollout/attempts"] == 2.0 and len(server.requests) == 2


def test_a_request_over_the_servers_limits_is_split_and_later_ones_before_sending(scripted):
    from maxent_jax.rollout.limits import piece_seed

    limits = {"max_completions_per_request": 2, "max_request_tokens": 1000, "max_queued_requests": 4}
    refusal = {"error": "request asks for 4 completions", "status": 413, "limits": limits}
    piece = _body([[_output("me", ids=(7,)), _output("me", ids=(8,))]])
    server = scripted((413, refusal, 0), (200, piece, 0), (200, piece, 0), (200, piece, 0), (200, piece, 0))
    client = _client(server.url)
    params = dataclasses.replace(PARAMS, seed=5)
    batch = client.generate([[1, 2], [3]], params)
    sent = [payload for _, payload in server.requests]
    assert [p["prompt_token_ids"] for p in sent] == [[[1, 2], [3]], [[1, 2]], [[3]]]
    assert [p["seed"] for p in sent] == [5, 5, piece_seed(5, 1)] and piece_seed(5, 1) != 5
    assert [[s.token_ids.tolist() for s in g] for g in batch.groups] == [[[7], [8]], [[7], [8]]]
    assert batch.metrics["rollout/request_pieces"] == 2 and batch.metrics["rollout/completions"] == 4
    client.generate([[1, 2], [3]], params)  # known limits: split at once, no refused attempt
    assert len(server.requests) == 5
    with pytest.raises(RolloutError, match=r"refused \(HTTP 413\): too big"):  # a 413 without limits: no split
        _client(scripted((413, {"error": "too big", "status": 413}, 0)).url).generate([[1]], PARAMS)
