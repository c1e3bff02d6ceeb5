"""A rollout server the trainer starts and stops itself (`rollout.spawn_server` = 'jax' | 'vllm').

`start_server` runs `python -m maxent_jax.serve --backend X` on a free loopback port with a
fresh bearer token, from a model directory holding the policy's own weights, waits for its
"ready at" line and hands back the URL and token for the client. The server must never outlive
the trainer, whatever ends it, so three mechanisms overlap:
- `SpawnedServer.stop()` (the trainer's close, on a normal end, an error, SIGTERM's graceful
  stop or Ctrl-C) terminates the server's whole process group (a vLLM server has workers);
- an atexit hook does the same when the trainer exits before it could close (an error while it
  is built);
- a parent-death signal (Linux `PR_SET_PDEATHSIG`, set by this module's `__main__` before it
  execs the server) kills the server when the trainer dies without running any Python (SIGKILL,
  a second SIGTERM). It fires when the *thread* that started the server ends, so start it on
  the main thread.

No jax here: the module's `__main__` runs in the vLLM environment too.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from maxent_jax.errors import UserError

SPAWN_BACKENDS = ("jax", "vllm")
VLLM_ENV = ".venv-vllm"
START_TIMEOUT_S = 900.0  # a vLLM engine on a large model takes minutes to load and compile
STOP_TIMEOUT_S = 30.0
_READY = re.compile(r"rollout server ready at (http://\S+)")
_REPO_ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1
_SCRATCH_PREFIX = ".rollout-server-"


def server_python(backend: str, env: Mapping[str, str] = os.environ) -> str:
    """The interpreter that runs the server: this one for jax; $VLLM_PYTHON or .venv-vllm for vllm."""
    if backend == "jax":
        return sys.executable
    path = Path(env.get("VLLM_PYTHON") or _REPO_ROOT / VLLM_ENV / "bin" / "python")
    if not path.is_file():
        raise UserError(f"config field rollout.spawn_server='vllm' needs the vLLM environment's python ({path} not "
                        "found); build it with `make vllm-env`, or set $VLLM_PYTHON to its interpreter")
    return str(path)


@dataclasses.dataclass
class SpawnedServer:
    """A running `maxent_jax.serve` child: where it listens, its token, and how to stop it."""

    process: subprocess.Popen
    url: str
    token: str
    scratch: Path  # token file and exported model; removed on stop
    log_path: Path

    def stop(self) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL), remove the scratch directory.

        Idempotent; safe from atexit.
        """
        atexit.unregister(self.stop)
        _stop_group(self.process)
        shutil.rmtree(self.scratch, ignore_errors=True)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL after STOP_TIMEOUT_S, then SIGKILL to stragglers."""
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_S)
    _signal_group(process.pid, signal.SIGKILL)  # workers the server started and left behind


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_server(
    backend: str,
    write_model: Callable[[Path], Path],
    *,
    workdir: Path | None = None,
    dtype: str | None = None,
    devices: str = "",
    start_timeout: float = START_TIMEOUT_S,
    engine_args: Sequence[str] = (),
) -> SpawnedServer:
    """Start `maxent_jax.serve --backend backend` on 127.0.0.1 (free port) and wait until it is ready.

    `write_model(scratch)` returns the HF model directory the server loads: the policy exported
    into the scratch directory, or the policy's own checkpoint directory. The scratch directory
    (token, export) is made in `workdir` when given, so what a SIGKILLed run leaves stays there
    until the next start in it removes it; the server's log goes to WORKDIR/rollout_server.log. `devices` becomes the
    server's CUDA_VISIBLE_DEVICES ('' = the trainer's environment). A server that exits or stays
    silent past `start_timeout` is an error quoting the end of its log. `engine_args` (KEY=VALUE)
    go to a vllm server's engine (`--engine-arg`).
    """
    python = server_python(backend)
    if workdir is not None:
        for left in workdir.glob(_SCRATCH_PREFIX + "*"):  # what a SIGKILLed run in this workdir left
            shutil.rmtree(left, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=_SCRATCH_PREFIX if workdir else "maxent-rollout-server-", dir=workdir))
    try:
        token = secrets.token_urlsafe(32)
        token_file = scratch / "token"
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n")
        model_dir = write_model(scratch)
        log_path = workdir / "rollout_server.log" if workdir is not None else scratch / "server.log"
        args = ["--backend", backend, "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0",
                "--token-file", str(token_file)]
        if dtype is not None and backend == "jax":
            args += ["--dtype", dtype]
        if backend == "vllm":
            args += [flag for arg in engine_args for flag in ("--engine-arg", arg)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices
        with open(log_path, "ab") as log_file:  # appended: a resumed run keeps the earlier servers' logs
            log_start = log_file.tell()
            process = subprocess.Popen(
                [python, "-m", "maxent_jax.rollout.spawn", str(os.getpid()), *args],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own process group: stop() reaches the workers, Ctrl-C does not
            )
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    server = SpawnedServer(process, "", token, scratch, log_path)
    atexit.register(server.stop)
    try:
        server.url = _wait_ready(process, log_path, log_start, start_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def start_for_policy(config, model, model_cfg, tokenizer_dir: str, workdir: Path | None = None) -> SpawnedServer:
    """The server `config.rollout.spawn_server` asks for, on the policy's weights as loaded.

    A policy loaded from an HF checkpoint that also holds its tokenizer is served from that
    directory; any other (the tiny random model, a separate tokenizer) is exported into the
    scratch directory first. The trainer's first step pushes its parameters anyway; the initial
    weights make the rollouts before it (initial reward) the policy's own.
    """
    import jax

    if jax.process_count() > 1:
        raise UserError(f"config field rollout.spawn_server={config.rollout.spawn_server!r} starts one server on this "
                        f"node; a run of {jax.process_count()} processes needs a shared one: start it yourself and "
                        "set vllm.url (docs/launch.md)")
    m = config.model

    def write_model(scratch: Path) -> Path:
        if m.name_or_path and not m.tokenizer_name_or_path:
            return Path(tokenizer_dir)  # the resolved checkpoint directory itself
        from maxent_jax.model.hf_io import export_hf_checkpoint

        return export_hf_checkpoint(model, model_cfg, scratch / "model", tokenizer_dir=tokenizer_dir)

    # A LoRA run's vLLM serves its adapter pushes with vLLM's LoRA support (rollout/adapters.py);
    # vLLM takes only these maximum ranks.
    max_rank = next((r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= config.lora.rank), config.lora.rank)
    lora = ["enable_lora=true", f"max_lora_rank={max_rank}"] if config.lora.enabled else []
    return start_server(config.rollout.spawn_server, write_model, workdir=workdir, dtype=m.param_dtype,
                        devices=config.rollout.spawn_server_devices, engine_args=lora)


def _wait_ready(process: subprocess.Popen, log_path: Path, start: int, timeout: float) -> str:
    """The URL from the server's "ready at" line (in the log after byte `start`); UserError with its
    last log lines if it never comes."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, "rb") as log_file:
            log_file.seek(start)
            text = log_file.read().decode(errors="replace")
        match = _READY.search(text)
        if match:
            return match.group(1)
        if process.poll() is not None or time.monotonic() > deadline:
            why = f"exited with status {process.returncode}" if process.poll() is not None else f"not ready after {timeout:.0f}s"
            tail = "\n".join(text.splitlines()[-20:])
            raise UserError(f"the spawned rollout server (rollout.spawn_server) {why}; the end of {log_path}:\n{tail}")
        time.sleep(0.2)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when its parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the trainer died before the guard was set
        sys.exit(1)


def main(argv: Sequence[str]) -> None:
    """`python -m maxent_jax.rollout.spawn PARENT_PID SERVE_ARGS...`: the guard, then exec the server.

    The death signal survives exec, so the process that runs is plain `python -m maxent_jax.serve`.
    """
    _die_with_parent(int(argv[0]))
    os.execv(sys.executable, [sys.executable, "-m", "maxent_jax.serve", *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
