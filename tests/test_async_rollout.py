"""Asynchronous rollouts (rollout.max_staleness): the staleness rules, the producer and pusher
threads, the config check, and runs against a spawned jax rollout server."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from configs.tiny import get_config
from maxent_jax import config_check
from maxent_jax.errors import UserError
from maxent_jax.rollout import staleness
from maxent_jax.rollout.producer import Producer, ReadyBatch, WeightPusher
from test_spawn_server import SPAWN
from test_train_e2e import run, tiny_config

FIXTURE = Path(__file__).parent / "fixtures" / "sync_server_metrics.json"


# -- the pure rules -----------------------------------------------------------------------

def test_staleness_counts_steps_since_the_sampling_weights_and_drops_whole_groups():
    versions = np.array([5, 5, 4, 5, 3, 5])  # three groups of two, trained at step 5
    stale = staleness.staleness(versions, 5)
    assert stale.tolist() == [0, 0, 1, 0, 2, 0]
    keep = staleness.groups_to_keep(stale, 2, max_staleness=1)
    assert keep.tolist() == [True, True, False]  # the group holding a 2-step-old completion goes whole
    assert staleness.staleness_metrics(stale, keep, 2) == {
        "rollout/staleness_mean": 0.5, "rollout/staleness_max": 2.0, "rollout/dropped_stale": 2.0}
    assert staleness.groups_to_keep(stale, 2, max_staleness=2).all()


# -- the threads --------------------------------------------------------------------------

def _batch(index: int) -> ReadyBatch:
    return ReadyBatch(rows=[{"id": index}], rollout=None, versions=np.array([index]), stream_state={"offset": index + 1})


def test_the_producer_waits_for_the_weights_and_runs_at_most_s_batches_ahead():
    pushes: list[int] = []
    pusher = WeightPusher(lambda params, version: pushes.append(version), pushed=0)
    collected: list[int] = []
    producer = Producer(lambda i: collected.append(i) or _batch(i), start=0, max_staleness=1, pusher=pusher, end=4)
    try:
        time.sleep(0.5)
        # batches 0 and 1 need weights v>=0 (there); batch 1 then waits for room in the queue (size s = 1)
        assert collected == [0, 1]
        assert producer.next().rows == [{"id": 0}]
        time.sleep(0.3)
        assert collected == [0, 1]  # batch 2 needs weights v1
        pusher.submit("params", 1)
        assert producer.next().rows == [{"id": 1}]
        pusher.submit("params", 2)
        assert [producer.next().rows[0]["id"] for _ in range(2)] == [2, 3]
        assert pushes[-1] == 2
    finally:
        producer.close()
        pusher.close()


def test_a_push_in_flight_delays_the_next_push_not_the_caller_and_only_the_newest_is_sent():
    started, release, sent = threading.Event(), threading.Event(), []

    def push(params, version):
        started.set()
        release.wait(10)
        sent.append(version)

    pusher = WeightPusher(push, pushed=0)
    try:
        begin = time.monotonic()
        pusher.submit("p1", 1)
        assert started.wait(10)
        pusher.submit("p2", 2)
        pusher.submit("p3", 3)
        assert time.monotonic() - begin < 5 and not sent  # submit never waits for the wire
        release.set()
        assert pusher.wait_for(3, threading.Event())
        assert sent == [1, 3]  # v2 was replaced by v3 while v1 was in flight
    finally:
        pusher.close()


def test_errors_of_the_threads_reach_the_trainer():
    def fail(params, version):
        raise OSError("server gone")

    pusher = WeightPusher(fail, pushed=0)
    producer = Producer(lambda i: _batch(i), start=0, max_staleness=1, pusher=pusher, end=10)
    try:
        pusher.submit("params", 1)
        producer.next(), producer.next()  # batches 0 and 1 need only v0
        with pytest.raises(OSError, match="server gone"):
            producer.next()
    finally:
        producer.close()
        pusher.close()


# -- the config check ---------------------------------------------------------------------

@pytest.mark.parametrize("overrides, fragment", [
    ({}, "0 with rollout.backend='sampler'"),
    ({"rollout.backend": "server", "vllm.return_logprobs": False}, "vllm.return_logprobs=True"),
    ({"rollout.backend": "server", "rollout.sync_interval_steps": 2}, "rollout.sync_interval_steps=1"),
])
def test_config_refuses_what_async_rollouts_cannot_do(overrides, fragment):
    config = tiny_config(**{"rollout.max_staleness": 1, **overrides})
    with pytest.raises(UserError, match="^config field rollout.max_staleness=1 is invalid: ") as err:
        config_check.validate(config)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_config_takes_a_non_negative_integer():
    config = get_config()
    config.rollout.max_staleness = -1
    with pytest.raises(UserError, match="rollout.max_staleness=-1 is invalid: an integer >= 0"):
        config_check.validate(config)


# -- runs against a spawned jax server ------------------------------------------------------

RUN = {**SPAWN, "train.max_steps": 3, "logging.logging_steps": 1}


@pytest.mark.slow  # ~60 s on a busy 2-core host: the trainer's and the server's compilations
def test_max_staleness_0_is_the_synchronous_loop_of_before(tmp_path):
    """The fixture holds the metrics of the loop before the collect/update split (main at 307d67b)."""
    expected = json.loads(FIXTURE.read_text())
    records = [r for r in run(tiny_config(**RUN), tmp_path) if "train/loss" in r]
    assert len(records) == len(expected)
    for got, want in zip(records, expected):
        assert {k: got[k] for k in want} == want
        assert got["train/rollout/staleness_max"] == 0.0 and got["train/rollout/dropped_stale"] == 0.0
