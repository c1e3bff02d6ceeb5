"""In-training eval metrics and the resumable per-problem results of the standalone evaluation."""

from __future__ import annotations

import json

import pytest

from maxent_jax import evaluate as ev
from maxent_jax.errors import UserError
from maxent_jax.rewards.math_accuracy import pure_accuracy_math


def _reward(completions, answers):
    return [pure_accuracy_math(c, a, is_eval=True) for c, a in zip(completions, answers)]


GOOD = "<think>2+2</think> <answer>4</answer>"
LOOSE = "the answer is <answer>4</answer>"  # relaxed eval still scores it; the strict gate fails
WRONG = "<think>hm</think><answer>5</answer>"
NONE = "I do not know"

ROWS = [{"problem": f"p{i}", "prompt": f"USER: p{i}\nASSISTANT:", "answer": "4"} for i in range(5)]


def test_evaluate_policy_means_and_format_fractions():
    outputs = {"USER: p0\nASSISTANT:": GOOD, "USER: p1\nASSISTANT:": LOOSE, "USER: p2\nASSISTANT:": WRONG,
               "USER: p3\nASSISTANT:": NONE, "USER: p4\nASSISTANT:": GOOD}
    batches = []

    def generate(rows):
        batches.append(len(rows))
        return [outputs[row["prompt"]] for row in rows]

    metrics = ev.evaluate_policy(generate, ROWS, _reward, batch_size=2)
    assert batches == [2, 2, 1]
    assert metrics == {
        "eval/mean_reward": pytest.approx(3 / 5),  # GOOD, LOOSE, GOOD
        "eval/format/missing_answer_frac": pytest.approx(1 / 5),  # NONE
        "eval/format/missing_format_frac": pytest.approx(2 / 5),  # LOOSE, NONE
    }
    # a process's shard is rows[index::count]
    shard = ev.evaluate_policy(generate, ROWS, _reward, batch_size=8, process_index=1, process_count=1)
    assert batches[-1] == 4 and shard["eval/mean_reward"] == pytest.approx(2 / 4)  # p1..p4


def _sampler(per_problem):
    calls = []

    def sample(rows, n):
        calls.append([row["problem"] for row in rows])
        return [per_problem[row["problem"]][:n] for row in rows]

    return sample, calls


PER_PROBLEM = {f"p{i}": [GOOD if j < i else WRONG for j in range(4)] for i in range(5)}  # p_i: i correct of 4


def test_evaluate_problems_records_and_resumes(tmp_path):
    settings = {"checkpoint": "/ckpt/40", "dataset": "synthetic:arithmetic", "num_samples": 4, "temperature": 0.6}
    out = tmp_path / "results.jsonl"
    sample, calls = _sampler(PER_PROBLEM)

    class Interrupt(Exception):
        pass

    def stop_after_first_batch(done, total):
        if done == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        ev.evaluate_problems(ROWS, sample, _reward, num_samples=4, batch_size=2,
                             results=ev.ResultsFile(out, settings), progress=stop_after_first_batch)
    with open(out, "a") as f:
        f.write('{"key": "2:torn')  # a crash mid-line
    calls.clear()
    records = ev.evaluate_problems(ROWS, sample, _reward, num_samples=4, batch_size=2,
                                   results=ev.ResultsFile(out, settings))
    assert [c[0] for c in calls] == ["p2", "p4"]  # p0 and p1 were done
    assert [r["num_correct"] for r in records] == [0, 1, 2, 3, 4]
    assert records[1]["rewards"] == [1.0, 0.0, 0.0, 0.0] and records[1]["missing_format"] == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0] == {"settings": settings} and len(lines) == 6

    calls.clear()
    again = ev.evaluate_problems(ROWS, sample, _reward, num_samples=4, batch_size=2,
                                 results=ev.ResultsFile(out, settings))
    assert calls == [] and again == records
    with pytest.raises(UserError, match=r"--output=.*results.jsonl holds results for other settings \(differs in num_samples\)"):
        ev.ResultsFile(out, {**settings, "num_samples": 8})


def test_problem_key_depends_on_text():
    assert ev.problem_key(3, "a") == ev.problem_key(3, "a") != ev.problem_key(3, "b")
    assert ev.problem_key(3, "a") != ev.problem_key(4, "a")
