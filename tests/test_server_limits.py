"""What bounds a rollout server request, without a model (fast, no jax): hostile field values, body
framing, the per-request work limits, the client's split to fit them, and the fair engine queue."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest

from maxent_jax.rollout.fair_queue import FairQueue
from maxent_jax.rollout.limits import RequestLimits, limits_from_json, piece_seed, request_tokens, split_request
from maxent_jax.rollout.protocol import ProtocolError, decode_json, parse_generate
from maxent_jax.rollout.request_body import RequestBody

BIG = 2**70


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"seed": BIG}, "'seed': must be in [0, 2**63)"),
        ({"seed": -1}, "'seed': must be in [0, 2**63)"),
        ({"top_k": BIG}, "'top_k': must fit in a 32-bit integer"),
        ({"n": BIG}, "'n': must fit in a 32-bit integer"),
        ({"max_tokens": BIG}, "'max_tokens': must fit in a 32-bit integer"),
        ({"best_of": -BIG}, "'best_of': must fit in a 32-bit integer"),
        ({"stop_token_ids": [BIG]}, "'stop_token_ids': token ids must be in [0, 2**31)"),
        ({"temperature": 10**400}, "'temperature': 1000"),
        ({"stop": ["\ud800"]}, "'stop': not valid Unicode text"),
        ({"prompt_token_ids": None, "prompts": ["ok", "bad \udfff"]}, "'prompts[1]': not valid Unicode text"),
        ({"prompt_token_ids": [[1, BIG]]}, "'prompt_token_ids[0]': token ids must be in [0, 2**31)"),
        ({"n": list(range(100_000))}, "expected int, got list [0, 1, 2, 3, 4, 5, ...]"),
    ],
)
def test_out_of_range_values_are_400s_naming_the_field(fields, fragment):
    # Each of these was a 500 (OverflowError, UnicodeEncodeError in the tokenizer) or an
    # error message repeating the whole value.
    payload = {"prompt_token_ids": [[1, 2]], **fields}
    with pytest.raises(ProtocolError) as err:
        parse_generate({k: v for k, v in payload.items() if v is not None})
    assert fragment in str(err.value) and err.value.status == 400 and len(str(err.value)) < 300


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"[" * 200_000 + b"]" * 200_000, "nests JSON arrays/objects too deeply"),
        (b'{"n": ' + b"9" * 5000 + b"}", "not valid JSON"),  # more digits than int() parses
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bodies_json_cannot_decode_are_protocol_errors(raw, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        decode_json(raw)


def _body(raw: bytes, limit: int = 1 << 20, **headers) -> RequestBody:
    return RequestBody(io.BufferedReader(io.BytesIO(raw)), headers, limit)


@pytest.mark.parametrize("length", ["-5", "1_0", "\u0661\u0662", "12x", "9" * 30])
def test_content_length_must_be_ascii_digits(length):
    # int() takes all of these; "-5" reached bytearray(-5) and ended the connection with no answer.
    with pytest.raises(ProtocolError, match="bad Content-Length header") as err:
        _body(b"{}", **{"Content-Length": length}).read_all()
    assert err.value.status == 400


@pytest.mark.parametrize("size, status", [(b"-5", 400), (b"0x10", 400), (b"F" * 12, 413)])
def test_chunk_size_is_checked_before_anything_is_allocated(size, status):
    with pytest.raises(ProtocolError) as err:  # F*12 = 281 TB: refused before bytearray() of it
        _body(size + b"\r\nxx\r\n0\r\n\r\n", **{"Transfer-Encoding": "chunked"}).read_all()
    assert err.value.status == status


# -- per-request work limits --------------------------------------------------------------

LIMITS = RequestLimits(max_completions_per_request=8, max_request_tokens=100, max_queued_requests=2)


def test_limits_refuse_naming_the_limit_its_value_and_flag():
    with pytest.raises(ProtocolError) as err:
        LIMITS.check([1], n=200_000, max_tokens=1)
    message = str(err.value)
    assert err.value.status == 413 and "200000 completions (1 prompts x n=200000)" in message
    assert "max_completions_per_request=8 (--max-completions-per-request)" in message
    assert err.value.details == {"limits": LIMITS.as_json()}
    with pytest.raises(ProtocolError) as err:
        LIMITS.check([10, 20], n=2, max_tokens=30)  # 2 * (10 + 20 + 2 * 30) = 180 tokens
    assert "needs 180 tokens" in str(err.value) and "max_request_tokens=100 (--max-request-tokens)" in str(err.value)
    LIMITS.check([10, 10], n=2, max_tokens=15)  # 100 tokens: at the limit is allowed


def test_defaults_scale_with_the_models_length_and_the_backends_sequences():
    class Backend:
        def __init__(self, length, sequences=None):
            self.length = length
            if sequences:
                self.default_request_sequences = sequences

        def info(self):
            return {"max_model_len": self.length}

    jax_like = RequestLimits.for_backend(Backend(256))
    assert (jax_like.max_request_tokens, jax_like.max_completions_per_request) == (64 * 256, 8192)
    assert RequestLimits.for_backend(Backend(4144, sequences=1024)).max_request_tokens == 1024 * 4144
    assert RequestLimits.for_backend(Backend(256), max_request_tokens=7).max_request_tokens == 7
    with pytest.raises(ValueError, match="max_queued_requests=0"):
        RequestLimits(max_completions_per_request=1, max_request_tokens=1, max_queued_requests=0)


@pytest.mark.parametrize(
    "lengths, n, max_tokens",
    [([3] * 20, 2, 5), ([1, 40, 2, 2, 30], 3, 8), ([2], 50, 3), ([5, 5, 5], 1, 10), ([90], 1, 10)],
)
def test_split_pieces_fit_and_cover_the_request_in_order(lengths, n, max_tokens):
    pieces = split_request(lengths, n, max_tokens, LIMITS)
    got = {i: 0 for i in range(len(lengths))}
    for start, end, k in pieces:
        assert start < end and k >= 1
        LIMITS.check(lengths[start:end], k, max_tokens)  # each piece passes the server's check
        for i in range(start, end):
            got[i] += k
    assert got == {i: n for i in range(len(lengths))}
    fits = len(lengths) * n <= LIMITS.max_completions_per_request and request_tokens(lengths, n, max_tokens) <= 100
    assert (len(pieces) == 1) == fits


def test_split_refuses_what_no_piece_can_hold():
    with pytest.raises(ValueError, match="needs 101 tokens; the server allows max_request_tokens=100"):
        split_request([1, 91], 1, 10, LIMITS)


def test_piece_seeds_keep_the_first_and_differ_after():
    assert piece_seed(None, 3) is None and piece_seed(7, 0) == 7
    seeds = [piece_seed(7, i) for i in range(1, 50)]
    assert len(set(seeds) | {7}) == 50 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [piece_seed(7, i) for i in range(1, 50)]  # deterministic


def test_limits_travel_as_json():
    assert limits_from_json(json.loads(json.dumps({"error": "x", "limits": LIMITS.as_json()}))) == LIMITS
    assert limits_from_json({"error": "x"}) is None
    assert limits_from_json({"limits": {"max_completions_per_request": "8", "max_request_tokens": 1}}) is None


# -- the fair engine queue ----------------------------------------------------------------


def _run_in_turns(queue: FairQueue, arrivals: list[str], hold_s: float = 0.05) -> list[str]:
    """Client `arrivals[0]` holds the engine while the others queue in order; returns who ran when."""
    order, lock = [], threading.Lock()
    started = threading.Event()

    def job(client: str, first: bool) -> None:
        with queue.hold(client):
            if first:
                started.set()
            with lock:
                order.append(client)
            time.sleep(hold_s)

    threads = [threading.Thread(target=job, args=(arrivals[0], True))]
    threads[0].start()
    assert started.wait(10)
    for client in arrivals[1:]:
        threads.append(threading.Thread(target=job, args=(client, False)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while queue.waiting < len(threads) - 1 and time.monotonic() < deadline:  # arrive in this order
            time.sleep(0.001)
    for t in threads:
        t.join(10)
    return order


def test_the_engine_turn_passes_round_robin_between_clients():
    # While a runs, a queues five more requests, then b two and c one: b and c go next, then a and
    # b alternate, not a six times first. A plain lock (the server before) ran them in whatever
    # order the threads woke up.
    order = _run_in_turns(FairQueue(max_waiting=16), ["a", "a", "a", "a", "a", "a", "b", "c", "b"])
    assert order == ["a", "b", "c", "a", "b", "a", "a", "a", "a"]


def test_a_full_queue_refuses_with_429_but_a_weight_push_still_waits():
    queue = FairQueue(max_waiting=1)
    release, inside, errors, pushed = threading.Event(), threading.Event(), [], threading.Event()

    def holder():
        with queue.hold("a"):
            inside.set()
            release.wait(10)

    def waiter(client, bounded, done=None):
        try:
            with queue.hold(client, bounded=bounded):
                if done:
                    done.set()
        except ProtocolError as err:
            errors.append(err)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    assert inside.wait(10)
    threads.append(threading.Thread(target=waiter, args=("b", True)))
    threads[-1].start()
    while queue.waiting < 1:
        time.sleep(0.001)
    waiter("c", True)  # the queue holds 1: refused at once
    assert len(errors) == 1 and errors[0].status == 429 and "max_queued_requests=1 (--max-queued-requests)" in str(errors[0])
    threads.append(threading.Thread(target=waiter, args=("push", False, pushed)))
    threads[-1].start()
    while queue.waiting < 2:
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(10)
    assert pushed.is_set() and len(errors) == 1 and queue.waiting == 0


def test_stop_lists_are_bounded():
    for name, value in (("stop", ["x"] * 65), ("stop_token_ids", [1] * 65)):
        with pytest.raises(ProtocolError, match=f"field '{name}': 65 entries; at most 64"):
            parse_generate({"prompt_token_ids": [[1]], name: value})
    parse_generate({"prompt_token_ids": [[1]], "stop": ["x"] * 64, "stop_token_ids": [1] * 64})


@pytest.mark.parametrize(
    "flag, value, message",
    [("--max-request-tokens", "0", "'0': expected an integer > 0"),
     ("--max-completions-per-request", "many", "'many': expected an integer > 0"),
     ("--read-timeout", "nan", "'nan': expected a number of seconds > 0")],
)
def test_serve_refuses_bad_limit_flags(tmp_path, flag, value, message):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "maxent_jax.serve", "--model", str(tmp_path), flag, value],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(f"argument {flag}: {message}")
