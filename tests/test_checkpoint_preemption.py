"""PreemptionGuard in a real process: the first SIGTERM/SIGINT stops after the step (save, exit 0),
a second one exits at once."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# A stand-in training loop: each "step" takes `step_seconds`; it checks the guard after every step.
_LOOP = """
import sys, time
from maxent_jax.preemption import PreemptionGuard
step_seconds = float(sys.argv[1])
with PreemptionGuard() as guard:
    print("ready", flush=True)
    for step in range(1, 10_000):
        time.sleep(step_seconds)
        print(f"step {step} done", flush=True)
        if guard.should_stop():
            print(f"saved checkpoint at step {step}; stopping after {guard.received.name}", flush=True)
            sys.exit(0)
"""


def _start(step_seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "-c", _LOOP, str(step_seconds)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_finishes_the_step_saves_and_exits_zero(sig):
    proc = _start(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.strip().splitlines()
    assert lines[-1].startswith("saved checkpoint at step ") and lines[-1].endswith(sig.name)
    assert lines[-2] == f"step {lines[-1].split()[4].rstrip(';')} done"  # the step in flight completed
    assert f"received {sig.name}: finishing the current step" in err


def test_second_signal_exits_at_once():
    proc = _start(120.0)  # a step that would take two minutes
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 128 + signal.SIGTERM
    assert "step 1 done" not in out
    assert "received SIGTERM again: exiting now without saving" in err
