"""Server + client end to end on loopback, for every backend in $MAXENT_ROLLOUT_BACKENDS (default: jax).

Backend-generic on purpose: no jax here (weights for pushes come from safetensors files), so
the vLLM environment runs this same module with MAXENT_ROLLOUT_BACKENDS=vllm and pre-exported
model directories in MAXENT_ROLLOUT_MODEL_DIRS (see docs/rollout.md).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import threading
import urllib.parse

import numpy as np
import pytest

from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.client import RolloutClient
from maxent_jax.rollout.completions import RolloutError
from tests.rollout_fixtures import (  # noqa: F401 - fixtures
    TOKEN,
    backends,
    model_tensors,
    rollout_backend,
    rollout_model_dirs,
    start_rollout_server,
)

# Every test uses 2 prompts of <= 16 tokens, n=2, max_tokens <= 16, and one of two modes, so a
# jax server compiles just two programs (greedy, sampled) for the whole module.
PROMPTS = [[1, 20, 30, 40], [1, 50, 60]]
GREEDY = SamplingParams(n=2, max_tokens=8, temperature=0.0)
SAMPLED = SamplingParams(n=2, max_tokens=8, temperature=0.9, top_p=0.95)


@pytest.fixture(scope="module", params=backends())
def server_a(request, rollout_model_dirs):
    with start_rollout_server(request.param, rollout_model_dirs[0]) as (url, server):
        yield request.param, url


def _raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _ids(batch) -> list[list[list[int]]]:
    return [[s.token_ids.tolist() for s in group] for group in batch.groups]


def test_health_info_and_openapi(server_a):
    backend, url = server_a
    assert _raw(url, "GET", "/health") == (200, {"status": "ok"})
    status, info = _raw(url, "GET", "/info")
    assert status == 200 and info["backend"] == backend and info["weight_version"] == 0
    assert info["max_model_len"] >= info["max_prompt_len"] > 0
    status, schema = _raw(url, "GET", "/openapi.json")
    assert status == 200 and "/generate" in schema["paths"]


def test_generate_groups_logprobs_and_echoed_tags(server_a):
    _, url = server_a
    client = RolloutClient(url, client_tag="trainer-a")
    params = dataclasses.replace(SAMPLED, seed=3)
    batch = client.generate(PROMPTS, params, current_step=2)
    assert len(batch.groups) == 2 and all(len(g) == 2 for g in batch.groups)
    for group in batch.groups:
        for sample in group:
            assert 1 <= len(sample.token_ids) <= 8 and sample.logprobs.shape == sample.token_ids.shape
            assert np.all(sample.logprobs <= 0) and sample.finish_reason in ("stop", "length")
            assert sample.weight_version == 0
    assert batch.metrics["rollout/weight_staleness_steps"] == 2.0
    assert batch.metrics["rollout/foreign_tag_dropped"] == 0.0 and batch.metrics["rollout/latency_s"] > 0
    again = client.generate(PROMPTS, params)
    assert _ids(again) == _ids(batch)  # a seed makes a request reproducible


def test_text_prompts_and_stop_strings(server_a):
    _, url = server_a
    client = RolloutClient(url, client_tag="text")
    prompts = ["What is 2 + 3?", "Compute 7 * 6."]
    params = dataclasses.replace(SAMPLED, max_tokens=12, ignore_eos=True, seed=11)
    full = client.generate(prompts, params).groups[0][0]
    assert len(full.token_ids) == 12 and full.finish_reason == "length"
    text = full.text
    visible = [i for i in range(len(text) // 2, len(text)) if not text[i].isspace()]
    assert visible, f"need a visible stop string in {text!r}"
    stop = text[visible[0]]
    cut = client.generate(prompts, dataclasses.replace(params, stop=(stop,))).groups[0][0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    assert len(cut.token_ids) < 12 and cut.token_ids.tolist() == full.token_ids[: len(cut.token_ids)].tolist()
    np.testing.assert_allclose(cut.logprobs, full.logprobs[: len(cut.token_ids)], atol=1e-6)


@pytest.mark.parametrize(
    "body, headers, status, fragment",
    [
        (b"{not json", {}, 400, "not valid JSON"),
        (json.dumps({"prompt_token_ids": [[1, 2]], "temprature": 1.0}).encode(), {}, 400, "unknown field 'temprature'"),
        (json.dumps({"prompt_token_ids": [[1, 2]], "n": 0}).encode(), {}, 400, "'n': must be >= 1"),
        (json.dumps({"prompt_token_ids": [[1] * 300]}).encode(), {}, 400, "max_prompt_len"),
        (json.dumps({"prompt_token_ids": [[1, 2]], "max_tokens": 10_000}).encode(), {}, 400, "max_model_len"),
        (json.dumps({"prompt_token_ids": [[1, 99999]], "max_tokens": 4}).encode(), {}, 400, "outside the vocabulary"),
        (b"{}", {"Content-Length": str(1 << 30)}, 413, "exceeds the limit"),
    ],
)
def test_malformed_requests_get_json_4xx_and_server_keeps_serving(server_a, body, headers, status, fragment):
    _, url = server_a
    got_status, got = _raw(url, "POST", "/generate", body, {"Content-Type": "application/json", **headers})
    assert got_status == status and fragment in got["error"]
    assert _raw(url, "GET", "/health")[0] == 200


def test_weight_push_needs_the_token(server_a, rollout_model_dirs):
    _, url = server_a
    status, body = _raw(url, "POST", "/weights", b"", {"Content-Length": "0"})
    assert status == 401 and "Bearer" in body["error"]
    with pytest.raises(RolloutError, match="HTTP 401"):
        RolloutClient(url, client_tag="push", token="wrong-token").push_weights(model_tensors(rollout_model_dirs[1]))
    assert _raw(url, "GET", "/info")[1]["weight_version"] == 0
    assert _raw(url, "GET", "/health")[0] == 200


def test_bad_weight_pushes_are_refused_and_nothing_is_applied(server_a, rollout_model_dirs):
    _, url = server_a
    client = RolloutClient(url, client_tag="push", token=TOKEN)
    before = client.generate(PROMPTS, GREEDY)
    tensors = model_tensors(rollout_model_dirs[1])
    name, array = tensors[1]
    cases = [
        ([(name, array[:-1])] + tensors[2:] + tensors[:1], f"tensor {name!r}: shape"),
        (tensors[:-1], "missing 1 of"),
        ([("model.not_a_weight", array)] + tensors, "unknown tensor 'model.not_a_weight'"),
        ([(name, array.astype(np.float16))] + [t for t in tensors if t[0] != name], f"tensor {name!r}: dtype float16"),
    ]
    for bad, fragment in cases:
        with pytest.raises(RolloutError) as err:
            client.push_weights(bad)
        assert "HTTP 400" in str(err.value) and fragment in str(err.value) and "nothing applied" in str(err.value)
    after = client.generate(PROMPTS, GREEDY)
    assert _ids(after) == _ids(before) and after.weight_version == 0


def test_weight_layouts_are_advertised_and_a_layout_not_offered_is_refused(server_a, rollout_model_dirs):
    backend, url = server_a
    offered = _raw(url, "GET", "/info")[1]["weight_layouts"]
    # native: only servers holding our model; lora (adapter pushes): the jax one, and vLLM with enable_lora
    assert offered == (["hf", "native", "lora"] if backend == "jax" else ["hf"])
    client = RolloutClient(url, client_tag="push", token=TOKEN)
    tensors = model_tensors(rollout_model_dirs[1])
    refused = [("transposed", "is not a weight layout; valid: 'hf', 'native', 'lora'")]
    if "native" not in offered:
        refused.append(("native", f"the {backend} backend takes only 'hf'"))
    for layout, fragment in refused:
        with pytest.raises(RolloutError) as err:
            client.push_weights(tensors, layout=layout)
        assert "HTTP 400" in str(err.value) and fragment in str(err.value) and "nothing applied" in str(err.value)
    assert _raw(url, "GET", "/info")[1]["weight_version"] == 0


def test_weight_push_gives_exactly_a_fresh_server_on_the_new_weights(rollout_backend, rollout_model_dirs):
    dir_a, dir_b = rollout_model_dirs
    with start_rollout_server(rollout_backend, dir_b) as (url_b, _):
        fresh = RolloutClient(url_b, client_tag="fresh").generate(PROMPTS, GREEDY)
    with start_rollout_server(rollout_backend, dir_a) as (url_a, _):
        client = RolloutClient(url_a, client_tag="pushed", token=TOKEN)
        old = client.generate(PROMPTS, GREEDY)
        assert _ids(old) != _ids(fresh)  # the two checkpoints really differ
        report = client.push_weights(lambda: model_tensors(dir_b), version=7)
        assert report["weight_version"] == 7 and report["bytes"] > 0 and report["gb_per_s"] > 0
        phases = [report[f"{phase}_seconds"] for phase in ("convert", "send", "server_finish", "server_apply")]
        assert min(phases) >= 0 and sum(phases) <= report["seconds"]  # the rest: connection set-up
        new = client.generate(PROMPTS, GREEDY, current_step=9)
    assert _ids(new) == _ids(fresh)
    for g_new, g_fresh in zip(new.groups, fresh.groups):
        for s_new, s_fresh in zip(g_new, g_fresh):
            np.testing.assert_allclose(s_new.logprobs, s_fresh.logprobs, atol=1e-6)
    assert new.weight_version == 7 and new.metrics["rollout/weight_staleness_steps"] == 2.0


def test_content_length_push_is_applied_and_a_truncated_one_is_refused(rollout_backend, rollout_model_dirs):
    from maxent_jax.rollout.weights import iter_stream

    stream = b"".join(bytes(chunk) for chunk in iter_stream(model_tensors(rollout_model_dirs[1])))
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
    with start_rollout_server(rollout_backend, rollout_model_dirs[0]) as (url, _):
        status, reply = _raw(url, "POST", "/weights", stream, {**auth, "X-Weight-Version": "5"})
        assert status == 200 and reply["weight_version"] == 5 and reply["bytes"] > 0
        assert 0 <= reply["apply_seconds"] <= reply["seconds"] and 0 <= reply["receive_seconds"] <= reply["seconds"]
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:  # declare the whole stream, send all but its last 40 bytes, then hang up
            conn.putrequest("POST", "/weights")
            for key, value in {**auth, "Content-Length": str(len(stream))}.items():
                conn.putheader(key, value)
            conn.endheaders(stream[:-40])
            conn.sock.shutdown(socket.SHUT_WR)
            response = conn.getresponse()
            status, reply = response.status, json.loads(response.read())
        finally:
            conn.close()
        assert status == 400 and "ended early" in reply["error"] and "nothing applied" in reply["error"]
        assert _raw(url, "GET", "/info")[1]["weight_version"] == 5


def test_two_clients_with_different_tags_each_get_their_own(server_a):
    _, url = server_a
    results, errors = {}, []

    def run(tag: str) -> None:
        try:
            client = RolloutClient(url, client_tag=tag)
            results[tag] = [client.generate(PROMPTS, SAMPLED) for _ in range(2)]
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("rank-0-of-2", "rank-1-of-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and set(results) == {"rank-0-of-2", "rank-1-of-2"}
    for batches in results.values():
        for batch in batches:
            assert batch.metrics["rollout/foreign_tag_dropped"] == 0.0 and all(len(g) == 2 for g in batch.groups)
