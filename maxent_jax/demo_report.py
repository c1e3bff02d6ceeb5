"""`python -m maxent_jax.demo_report`: run the demo as `make demo` does and rewrite README's table of its figures.

The README's demo figures (rewards along the run, wall time) went stale whenever the default
changed. This script is where they come from: it runs `python -m maxent_jax.train` with no
flags in a temporary workdir, with an empty compilation cache and tokenizer cache (a fresh
clone), and replaces the block between the two markers in README.md with the measured table,
the machine, the date and the code's commit. `tests/test_train_e2e.py::test_default_config_learns`
runs the same demo and fails when its rewards drift from the table.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from maxent_jax.cli import REPO_ROOT
from maxent_jax.errors import UserError, exit_on_user_error
from maxent_jax.telemetry import METRICS_FILE, git_sha

README = REPO_ROOT / "README.md"
START = "<!-- demo-figures: written by python -m maxent_jax.demo_report; do not edit by hand -->"
END = "<!-- /demo-figures -->"
# (row label, first step, last step) of the mean train reward; the demo runs 100 RL steps.
WINDOWS = (("RL steps 1-10 (right after the warm-up)", 1, 10), ("RL steps 41-50", 41, 50),
           ("RL steps 91-100", 91, 100))
INITIAL = "untrained policy (`train/initial_reward`)"
HELD_OUT = "held-out problems at the end (`eval/mean_reward`)"


def figures(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Table row -> value, from a demo run's metrics.jsonl records."""
    rewards = {r["step"]: r["train/reward"] for r in records if "train/reward" in r}
    out = {INITIAL: next(r["train/initial_reward"] for r in records if "train/initial_reward" in r)}
    for label, first, last in WINDOWS:
        window = [rewards[s] for s in range(first, last + 1) if s in rewards]
        if not window:
            raise UserError(f"the demo's metrics have no train/reward for steps {first}-{last}")
        out[label] = sum(window) / len(window)
    evals = [r for r in records if "eval/mean_reward" in r]
    if evals:
        out[HELD_OUT] = max(evals, key=lambda r: r["step"])["eval/mean_reward"]
    return out


def render(values: dict[str, float], *, wall_s: float, cpu_s: float, sha: str, date: str, machine: str,
           load: float) -> str:
    """The README block. `load` (the 1-minute load average at the start) says whether other work
    shared the machine: the wall time is this code's speed only when it is near 0."""
    lines = [START,
             f"Measured on {machine} ({date}, seed 42, code `{sha}`) by `python -m maxent_jax.demo_report`: the demo in",
             f"a fresh workdir with empty caches took {wall_s:.0f} s of wall time and {cpu_s:.0f} s of CPU, warm-up "
             f"included (load average {load:.1f} at the start). The run is deterministic: a rerun on the same",
             "machine prints the same rewards.", "", "| point of the run | mean reward |", "|---|---|"]
    lines += [f"| {label} | {value:.3f} |" for label, value in values.items()]
    return "\n".join(lines + [END])


def read_table(text: str) -> dict[str, float]:
    """The table in README's block: row label -> value."""
    block = _block(text)
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (.+?) \| ([0-9.]+) \|$", block, re.M)}


def rewrite(text: str, block: str) -> str:
    """`text` with its marked block replaced by `block`."""
    old = _block(text)
    return text.replace(old, block)


def _block(text: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise UserError(f"README.md has no demo figures block (the lines {START!r} ... {END!r})")
    return text[start:end + len(END)]


def machine() -> str:
    return f"a {os.cpu_count()}-core {platform.machine()} CPU machine"


def run_demo() -> tuple[list[dict[str, Any]], float, float]:
    """The demo's metrics records, wall seconds and CPU seconds (the training process's)."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp) / "run"
        env = {**os.environ, "MAXENT_CACHE_DIR": str(pathlib.Path(tmp) / "cache"), "PYTHONPATH": str(REPO_ROOT)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "maxent_jax.train", f"--workdir={workdir}"], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True)
        wall = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise UserError(f"the demo failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        records = [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines()]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return records, wall, cpu


def main() -> None:
    load = os.getloadavg()[0]
    records, wall, cpu = run_demo()
    block = render(figures(records), wall_s=wall, cpu_s=cpu, sha=git_sha(), date=time.strftime("%Y-%m-%d"),
                   machine=machine(), load=load)
    README.write_text(rewrite(README.read_text(), block))
    print(block)


if __name__ == "__main__":
    exit_on_user_error(main)
