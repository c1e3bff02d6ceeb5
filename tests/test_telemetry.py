"""Telemetry: metrics.jsonl content and cadence, window averaging, resume truncation, W&B mode, progress."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from maxent_jax import telemetry as tm
from maxent_jax.config import get_base_config


def _config(**logging):
    c = get_base_config()
    c.logging.wandb = "disabled"
    c.logging.progress = False
    c.train.max_steps = 10
    for k, v in logging.items():
        c.logging[k] = v
    return c


def _records(workdir):
    return [json.loads(line) for line in (workdir / tm.METRICS_FILE).read_text().splitlines()]


def test_window_averages_every_numeric_metric_since_the_last_emission(tmp_path, monkeypatch):
    monkeypatch.setenv("MAXENT_GIT_SHA", "abc1234")
    with tm.Telemetry(tmp_path, _config(logging_steps=2), config_path="configs/tiny.py") as tel:
        # step 1: two micro-steps; step 2: one micro-step, one key only present here
        tel.accumulate({"train/loss": 1.0, "train/reward": jnp.float32(0.0)})
        tel.accumulate({"train/loss": 3.0, "train/reward": np.float64(0.5)})
        assert tel.step_end(1, instant={"train/num_tokens": 100}) is None
        tel.accumulate({"train/loss": 5.0, "train/reward": 1.0, "train/kl": 0.2, "train/grpo_objective": True})
        record = tel.step_end(2, instant={"train/num_tokens": 300, "train/learning_rate": 1e-6})
        tel.accumulate({"train/loss": float("nan")})
        tel.step_end(3)
        tel.accumulate({"train/loss": 2.0})
        tel.step_end(4)
    assert record["train/loss"] == pytest.approx(3.0)  # (1 + 3 + 5) / 3 micro-steps
    assert record["train/reward"] == pytest.approx(0.5)
    assert record["train/kl"] == pytest.approx(0.2)  # averaged over the micro-steps that had it
    rows = _records(tmp_path)
    assert [r["step"] for r in rows] == [2, 4]
    first = rows[0]
    assert first["train/global_step"] == 2 and first["train/num_tokens"] == 300
    assert first["train/learning_rate"] == 1e-6 and first["train/grpo_objective"] == 1.0
    assert first["run/git_sha"] == "abc1234" and first["run/config_path"] == "configs/tiny.py"
    assert first["run/recipe_path"] == "unknown"
    assert first["time/step_s"] >= 0 and first["time"] > 1e9
    assert rows[1]["train/loss"] is None  # nan in the window: written as null (strict JSON)


def test_metrics_are_on_disk_after_each_emission_and_resume_truncates(tmp_path):
    tel = tm.Telemetry(tmp_path, _config())
    for step in range(1, 6):
        tel.accumulate({"train/loss": float(step)})
        tel.step_end(step)
        assert len(_records(tmp_path)) == step  # readable before close: nothing lost on a crash
    tel.log_eval(4, {"eval/mean_reward": 0.25})
    with open(tmp_path / tm.METRICS_FILE, "a") as f:
        f.write('{"step": 6, "train/lo')  # a line torn by a crash
    tel.close()
    with tm.Telemetry(tmp_path, _config(), resume_step=3) as tel:
        tel.accumulate({"train/loss": 40.0})
        tel.step_end(4)
    rows = _records(tmp_path)
    assert [(r["step"], r.get("train/loss")) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_eval_metrics_and_completions(tmp_path):
    out = io.StringIO()
    c = _config(log_completions=True, progress=True)
    with tm.Telemetry(tmp_path, c, stream=out) as tel:
        tel.log_eval(5, {"eval/mean_reward": 0.5, "eval/format/missing_answer_frac": 0.125})
        tel.log_completions(5, [{"prompt": "1+1", "completion": "<answer>2</answer>", "advantage": 0.5,
                                 "reward/pure_accuracy_math": 1.0}])
    assert _records(tmp_path) == [{"step": 5, "time": _records(tmp_path)[0]["time"], "eval/mean_reward": 0.5,
                                   "eval/format/missing_answer_frac": 0.125}]
    rows = [json.loads(x) for x in (tmp_path / tm.COMPLETIONS_FILE).read_text().splitlines()]
    assert rows == [{"step": 5, "prompt": "1+1", "completion": "<answer>2</answer>", "advantage": 0.5,
                     "reward/pure_accuracy_math": 1.0}]
    assert "eval at step 5: eval/mean_reward 0.5, eval/format/missing_answer_frac 0.125" in out.getvalue()
    with tm.Telemetry(tmp_path / "off", _config()) as tel:
        tel.log_completions(5, [{"prompt": "p"}])
    assert not (tmp_path / "off" / tm.COMPLETIONS_FILE).exists()


def test_non_main_processes_write_nothing(tmp_path):
    with tm.Telemetry(tmp_path / "w", _config(), is_main=False) as tel:
        tel.accumulate({"train/loss": 1.0})
        assert tel.step_end(1) is None and tel.log_eval(1, {"eval/mean_reward": 1.0}) is None
    assert not (tmp_path / "w").exists()


def test_progress_line_plain_in_logs_and_redrawn_on_a_terminal(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    for stream in (io.StringIO(), Tty()):
        with tm.Telemetry(tmp_path / str(type(stream).__name__), _config(logging_steps=2, progress=True),
                          stream=stream) as tel:
            for step in (1, 2, 3, 4):
                tel.accumulate({"train/reward": 0.5, "train/kl": 0.001, "train/tau": 0.1, "train/beta": 0.02})
                tel.step_end(step, instant={"train/num_tokens": 1000 * step})
        text = stream.getvalue()
        if isinstance(stream, Tty):
            assert text.count("\r") == 4 and "\x1b[K" in text and text.endswith("\n")
        else:
            lines = text.splitlines()
            assert len(lines) == 2 and "\r" not in text
            assert lines[1].startswith("step 4/10 (40%) | ")
            for part in ("reward 0.500", "kl 0.001", "tau 0.1", "beta 0.02", "tok/s", "s/step"):
                assert part in lines[1]


def test_progress_eta_leaves_compiling_steps_out():
    """A step that spent most of its time compiling is marked and does not enter the ETA (step 1 of a
    run compiled for 95 s used to predict 2:38 h for a run of minutes)."""
    line = tm.ProgressLine(100, io.StringIO(), first_step=10)
    line.start -= 30.0
    line.metrics = {"train/reward": 0.25, "time/step_s": 95.0}
    line.step_timed(95.0, 94.0)
    assert line.format(11, line.start + 30.0) == "step 11/100 (11%) | 0:00:30<? | reward 0.250 | 95.00 s/step (compiling)"
    for _ in range(9):
        line.step_timed(2.0, 0.01)
    line.metrics["time/step_s"] = 2.0
    assert line.format(20, line.start + 30.0) == "step 20/100 (20%) | 0:00:30<0:02:40 | reward 0.250 | 2.00 s/step"


@pytest.mark.parametrize(
    "setting, project, env, key, expected",
    [
        ("auto", "", {}, False, "offline"),
        ("auto", "proj", {}, True, "online"),
        ("auto", "", {"WANDB_PROJECT": "p"}, True, "online"),
        ("auto", "proj", {}, False, "offline"),
        ("auto", "proj", {"WANDB_MODE": "offline"}, True, "offline"),
        ("online", "", {}, False, "online"),
        ("offline", "proj", {}, True, "offline"),
        ("online", "proj", {"WANDB_MODE": "disabled"}, True, "disabled"),
        ("auto", "proj", {"WANDB_DISABLED": "true"}, True, "disabled"),
        ("disabled", "proj", {}, True, "disabled"),
    ],
)
def test_wandb_mode(setting, project, env, key, expected):
    assert tm.wandb_mode(setting, project, env, has_api_key=key) == expected


def test_git_sha_from_env_then_git(monkeypatch):
    monkeypatch.setenv("MAXENT_GIT_SHA", "deadbee")
    assert tm.git_sha() == "deadbee"
    monkeypatch.delenv("MAXENT_GIT_SHA")
    sha = tm.git_sha()
    assert sha == "unknown" or all(ch in "0123456789abcdef" for ch in sha)


def test_json_safe_values():
    assert tm._json_safe(np.int32(3)) == 3 and isinstance(tm._json_safe(np.int32(3)), int)
    assert tm._json_safe(float("inf")) is None and math.isnan(float("nan"))
    assert tm._json_safe(jnp.float32(0.5)) == 0.5 and tm._json_safe("x") == "x"
    assert tm._json_safe(np.zeros(3)) == str(np.zeros(3))


_WANDB_OFFLINE = """
import sys
from maxent_jax import telemetry as tm
from maxent_jax.config import get_base_config
c = get_base_config(); c.logging.wandb = "auto"; c.logging.progress = False; c.logging.run_name = "t"
with tm.Telemetry(sys.argv[1], c) as tel:
    assert tel.wandb_mode == "offline", tel.wandb_mode
    tel.accumulate({"train/loss": 1.0}); tel.step_end(1)
    tel.log_eval(1, {"eval/mean_reward": 0.5})
"""


def test_wandb_offline_writes_a_local_run(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "XLA_FLAGS": ""}
    env.pop("WANDB_DIR", None)
    proc = subprocess.run([sys.executable, "-c", _WANDB_OFFLINE, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=180, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = (tmp_path / tm.WANDB_RUN_ID_FILE).read_text()
    assert runs[0].name.endswith(run_id)


def test_step_time_leaves_out_the_eval(tmp_path, monkeypatch):
    clock = iter([0.0, 2.0, 10.0, 13.0])  # init, step 1 ends, eval ends, step 2 ends
    monkeypatch.setattr(tm.time, "monotonic", lambda: next(clock))
    with tm.Telemetry(tmp_path, _config()) as tel:
        tel.step_end(1)
        tel.log_eval(1, {"eval/mean_reward": 0.5})
        tel.step_end(2)
    times = [r["time/step_s"] for r in _records(tmp_path) if "time/step_s" in r]
    assert times == [2.0, 3.0]
