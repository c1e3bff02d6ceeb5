"""Straggler-tolerant batches (rollout.straggler_groups): the first complete groups fill a batch,
a slow group joins a later batch with the version that sampled it, nothing is split or lost, and
the resume record makes a crashed run consume every prompt exactly once."""

import collections
import json
import random
import threading
import time

import numpy as np
import pytest

from configs.tiny import get_config
from maxent_jax import config_check
from maxent_jax.data.stream import BatchStream
from maxent_jax.errors import UserError
from maxent_jax.rollout.producer import Rollout
from maxent_jax.rollout.stragglers import PromptFeed, StragglerCollector, applied_part
from maxent_jax.trainer import Trainer
from test_async_rollout import RESUME, RUN, ResumeWorker
from test_train_e2e import tiny_config

G = 2  # completions per group


def _group(row: dict, version: int, width: int) -> Rollout:
    """One prompt's group: every completion token and reward is the prompt's id (a split would show)."""
    ids = np.full((G, width), row["id"], np.int32)
    return Rollout(batch={"completion_ids": ids, "completion_mask": np.ones((G, width), np.int32)},
                   utilities=np.full((1, G), row["id"], np.float32), reward_parts={"r": np.full(G, row["id"])},
                   texts=[str(row["id"])] * G, lengths=np.full(G, width), seconds=0.0,
                   versions=np.full(G, version))


def _rows(n: int) -> list[dict]:
    return [{"id": i} for i in range(n)]


def _assert_whole_groups(ready) -> list[int]:
    ids = [r["id"] for r in ready.rows]
    ro = ready.rollout
    assert ro.utilities.tolist() == [[i] * G for i in ids]
    assert ro.batch["completion_ids"][:, 0].reshape(-1, G).tolist() == [[i] * G for i in ids]
    assert ro.versions.shape == (len(ids) * G,)
    return ids


def test_a_slow_group_carries_over_to_the_next_batch_with_its_version():
    stream = BatchStream(_rows(20), 2, seed=0)
    order = stream._order(0).tolist()
    release = {i: threading.Event() for i in range(20)}
    finished: list[int] = []

    def sample(rows, index):
        (row,) = rows
        release[row["id"]].wait(10)
        finished.append(row["id"])
        return _group(row, version=index, width=4 + row["id"] % 3)  # widths differ: merged with padding

    collector = StragglerCollector(PromptFeed(stream), sample, groups=2, extra=1, pad_id=0)
    release[order[1]].set()
    release[order[2]].set()  # order[0] is the straggler
    first = collector.collect(0)
    assert _assert_whole_groups(first) in ([order[1], order[2]], [order[2], order[1]])
    assert first.metrics["train/rollout/carried_groups"] == 0
    # order[0] is still generating, order[3] is drawn but not issued: the floor stays at the first batch
    assert first.stream_state == {"epoch": 0, "offset": 0, "applied": [[0, 1], [0, 2]]}

    release[order[0]].set()
    while order[0] not in finished:
        time.sleep(0.01)
    release[order[3]].set()  # order[4], issued for batch 1, is the next straggler
    second = collector.collect(1)
    assert _assert_whole_groups(second) == [order[0], order[3]]
    assert second.rollout.versions.tolist() == [0] * G + [1] * G  # the carried group keeps version 0
    assert second.metrics["train/rollout/carried_groups"] == 1
    assert second.metrics["train/rollout/groups_generating"] == 1
    assert second.stream_state == {"epoch": 0, "offset": 4, "applied": []}  # order[4] (in flight) starts batch 2
    for event in release.values():
        event.set()


def test_a_failed_group_is_raised_by_collect():
    def sample(rows, index):
        raise RuntimeError("server down")

    collector = StragglerCollector(PromptFeed(BatchStream(_rows(8), 2, seed=0)), sample, groups=2, extra=1, pad_id=0)
    with pytest.raises(RuntimeError, match="server down"):
        collector.collect(0)


def _run(record, batches: int, seed: int):
    """A collector from `record` forming `batches` batches with random generation times: the batches
    and the collector (its in-flight groups are what a crash loses)."""
    stream = BatchStream(_rows(64), 3, seed=7)
    rng = random.Random(seed)
    delays = [rng.uniform(0, 0.04) for _ in range(64)]

    def sample(rows, index):
        time.sleep(delays[rows[0]["id"]])
        return _group(rows[0], version=index, width=4)

    collector = StragglerCollector(PromptFeed(stream, record), sample, groups=3, extra=2, pad_id=0)
    return [collector.collect(i) for i in range(batches)]


@pytest.mark.parametrize("crash_after", [0, 2, 3])
def test_after_a_crash_every_prompt_is_trained_exactly_once(crash_after):
    order = BatchStream(_rows(64), 3, seed=7)._order(0).tolist()
    before = _run({"epoch": 0, "offset": 0}, crash_after + 2, seed=crash_after)  # a batch in the queue is lost too
    applied = [i for ready in before[:crash_after + 1] for i in _assert_whole_groups(ready)]
    record = before[crash_after].stream_state  # what the checkpoint of update `crash_after` holds
    assert len(record["applied"]) <= 3 + 2  # at most the in-flight window
    after = _run(record, 8, seed=100 + crash_after)
    trained = applied + [i for ready in after for i in _assert_whole_groups(ready)]
    assert len(trained) == len(set(trained))  # none repeated
    # none lost: the trained prompts are the stream's first ones but for at most the window still in flight
    first = order[:len(trained)]
    assert len(set(first) - set(trained)) <= 2 + 3
    missing = set(order[:len(trained) - 5]) - set(trained)
    assert not missing, missing


def test_a_resumed_feed_skips_the_applied_prompts_beyond_the_floor():
    stream = BatchStream(_rows(10), 2, seed=3)
    order = stream._order(0).tolist()
    feed = PromptFeed(stream, {"epoch": 0, "offset": 2, "applied": [[0, 3], [0, 4]]})
    assert [feed.next()[1]["id"] for _ in range(4)] == [order[2], order[5], order[6], order[7]]
    # order[2] still in flight: a second crash must still skip order[3] and order[4], already passed
    assert feed.record([(0, 2)], {(0, 5)}) == {"epoch": 0, "offset": 2, "applied": [[0, 3], [0, 4], [0, 5]]}
    # a skipped prompt still in the buffer is applied, not pending: it does not hold the floor back
    feed = PromptFeed(stream, {"epoch": 0, "offset": 2, "applied": [[0, 3]]})
    assert feed.next()[1]["id"] == order[2]
    assert feed.record([], {(0, 2)}) == {"epoch": 0, "offset": 4, "applied": []}
    assert applied_part({"epoch": 0, "offset": 2}, 0) == {}  # a checkpoint without stragglers resumes as before
    record = {"epoch": 0, "offset": 2, "applied": [[0, 3]]}
    assert applied_part(record, 2) == {"applied": [[0, 3]]}
    with pytest.raises(UserError, match="lists 1 prompts trained beyond .* resume it with rollout.straggler_groups >= 1"):
        applied_part(record, 0)  # resumed without carry-over, the listed prompts would be trained twice


def test_config_check_needs_async_and_refuses_dynamic_sampling():
    c = get_config()
    c.rollout.straggler_groups = 2
    with pytest.raises(UserError, match="rollout.straggler_groups=2 is invalid: 0 unless rollout.max_staleness"):
        config_check.validate(c)
    c.rollout.backend, c.rollout.max_staleness, c.vllm.return_logprobs = "server", 1, True
    c.rollout.dynamic_sampling = True
    with pytest.raises(UserError, match="0 with rollout.dynamic_sampling=True"):
        config_check.validate(c)
    c.rollout.straggler_groups = -1
    with pytest.raises(UserError, match="rollout.straggler_groups"):
        config_check.validate(c)


@pytest.mark.slow  # ~60-120 s on a busy 2-core host: the trainer's and the server's compilations
def test_a_run_with_straggler_groups_on_a_spawned_jax_server(tmp_path):
    """Groups generated one request each on their own threads, two beyond the batch kept in flight:
    the run trains within the staleness bound and leaves no server."""
    config = tiny_config(**{**RUN, "rollout.max_staleness": 2, "rollout.straggler_groups": 2, "train.max_steps": 3})
    trainer = Trainer(config, tmp_path)
    server = trainer.policy.server
    try:
        trainer.run()
    finally:
        trainer.close()
    assert server.process.poll() is not None
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) and r["train/rollout/staleness_max"] <= 2.0 for r in train)
    assert all(0 <= r["train/rollout/groups_generating"] <= 2 for r in train)
    assert all(0 <= r["train/rollout/carried_groups"] <= 2 for r in train)


def _stream_records(workdir) -> dict:
    """Checkpoint step -> its data-stream record, of the checkpoints written so far."""
    records = {}
    for path in workdir.glob("checkpoints/*/extras/metadata"):
        try:
            records[int(path.parent.parent.name)] = json.loads(path.read_text())["stream"]
        except (OSError, ValueError, KeyError):  # being written, or rotated away
            continue
    return records


def _newest_applied(workdir) -> list:
    records = _stream_records(workdir)
    return records[max(records)]["applied"] if records else []


@pytest.mark.slow  # ~2-4 min on a busy 2-core host: two trainer starts, each with its own server
def test_sigkill_with_stragglers_then_resume_trains_every_prompt_once(tmp_path):
    """A run with carry-over (S = 2, W = 2) and slow prompts is SIGKILLed mid-way and resumed: the
    applied prompts are the stream's, in its order but for the carry-over window: none lost, none
    repeated. (Without slow prompts the server finishes groups in order and nothing is applied
    beyond the resume floor.)"""
    steps, per_step, window = 10, 4, 4 + 2
    num_rows = 64  # no epoch ends within the run: every prompt id is applied at most once
    overrides = {"rollout.max_staleness": 2, "rollout.straggler_groups": 2, "data.synthetic.num_train": num_rows}
    worker = ResumeWorker(tmp_path, steps, json.dumps(overrides), "5")  # every 5th prompt waits 2 s: a straggler
    worker.run_until_killed(lambda log: sum("step" in r for r in log) >= 3 and bool(_newest_applied(tmp_path)),
                            "the first run ended before a carry-over")
    checkpoints = _stream_records(tmp_path)  # before the resumed run rotates them away
    resumed, applied = worker.resume_to_the_end()
    # the checkpoint resumed from lists prompts applied beyond its floor: the case a stream position alone gets wrong
    assert checkpoints[resumed]["applied"]
    assert [r["step"] for r in applied] == list(range(1, steps + 1))
    ids = [i for r in applied for i in r["ids"]]
    assert len(ids) == len(set(ids)), collections.Counter(ids).most_common(3)  # none repeated
    order = BatchStream(list(range(num_rows)), per_step, tiny_config(**RESUME).seed)._order(0).tolist()
    n = steps * per_step
    assert set(ids) <= set(order[:n + window])  # drawn in the stream's order
    assert set(order[:n - window]) <= set(ids)  # none lost: only the carry-over window may be pending
