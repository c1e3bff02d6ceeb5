"""Fixtures for rollout-server tests, shared by every backend (import them into a test module).

- `rollout_backend`: the backend name; parametrized from $MAXENT_ROLLOUT_BACKENDS (default
  `jax`, e.g. `jax,vllm` in the vLLM environment).
- `rollout_model_dirs`: two tiny HF model directories (same architecture, different weights)
  with a tokenizer. Built with jax by default; an environment without jax (the vLLM one)
  passes pre-exported ones as $MAXENT_ROLLOUT_MODEL_DIRS=dir_a:dir_b.
- `start_rollout_server(backend, model_dir, token=...)`: a context manager serving on an
  ephemeral loopback port (in a thread, or with `subprocess=True` through
  `python -m maxent_jax.serve`), always torn down.

Nothing here imports jax at module level.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from maxent_jax.rollout.client import RolloutClient

TOKEN = "test-token-0123456789"


def backends() -> list[str]:
    return [b.strip() for b in os.environ.get("MAXENT_ROLLOUT_BACKENDS", "jax").split(",") if b.strip()]


def write_tiny_model(directory: Path, seed: int) -> Path:
    """Export a ModelConfig.tiny() decoder with random weights (seed) and the offline tokenizer."""
    from flax import nnx

    from maxent_jax.data.tokenizer import build_offline_tokenizer
    from maxent_jax.model import Decoder, ModelConfig
    from maxent_jax.model.hf_io import export_hf_checkpoint

    tok_dir = build_offline_tokenizer(directory.parent / "tokenizer-cache")
    cfg = ModelConfig.tiny(max_position_embeddings=256)
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    return export_hf_checkpoint(model, cfg, directory, tokenizer_dir=tok_dir)


def model_tensors(model_dir: Path) -> list[tuple[str, np.ndarray]]:
    """The HF-named tensors of a model directory (numpy, no jax), for weight-push tests."""
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return list(tensors.items())


@pytest.fixture(params=backends())
def rollout_backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def rollout_model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    given = os.environ.get("MAXENT_ROLLOUT_MODEL_DIRS")
    if given:
        a, b = given.split(":")
        return Path(a), Path(b)
    root = tmp_path_factory.mktemp("rollout-models")
    return write_tiny_model(root / "a", seed=0), write_tiny_model(root / "b", seed=1)


def _build_backend(backend: str, model_dir: Path):
    if backend == "jax":
        from maxent_jax.rollout.jax_backend import JaxBackend

        return JaxBackend.from_pretrained(model_dir)
    from maxent_jax.rollout.vllm_backend import VLLMBackend

    return VLLMBackend(str(model_dir))


@contextlib.contextmanager
def start_rollout_server(
    backend: str,
    model_dir: Path,
    *,
    token: str | None = TOKEN,
    subprocess_mode: bool = False,
    max_request_bytes: int | None = None,
    tmp_dir: Path | None = None,
    **server_kwargs,
) -> Iterator[tuple[str, object]]:
    """Yield (base url, handle): the RolloutServer (thread mode) or the Popen (subprocess mode).

    `server_kwargs` (thread mode) go to RolloutServer: `limits=`, `read_timeout=`.
    """
    if not subprocess_mode:
        from maxent_jax.rollout.server import DEFAULT_MAX_REQUEST_BYTES, RolloutServer

        server = RolloutServer(
            _build_backend(backend, model_dir), port=0, token=token,
            max_request_bytes=max_request_bytes or DEFAULT_MAX_REQUEST_BYTES, **server_kwargs,
        )
        server.start()
        try:
            yield server.url, server
        finally:
            server.stop()
        return
    args = [sys.executable, "-m", "maxent_jax.serve", "--backend", backend, "--model", str(model_dir), "--port", "0"]
    if token is not None:
        token_file = (tmp_dir or Path(model_dir).parent) / "token.txt"
        token_file.write_text(token + "\n")
        args += ["--token-file", str(token_file)]
    with serve_subprocess(args) as (url, proc):
        RolloutClient(url, client_tag="probe").wait_healthy(60)
        yield url, proc


@contextlib.contextmanager
def serve_subprocess(args: list[str], *, env: dict | None = None, cwd: Path | None = None,
                     start_timeout: float = 300) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run a `maxent_jax.serve` command line; yield (its URL, the process) once it says it is ready.

    Its log keeps being read in the background so a full pipe never blocks the server; on exit
    the process gets SIGTERM, then SIGKILL if it does not stop within 30 s.
    """
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    try:
        url, lines, deadline = None, [], time.monotonic() + start_timeout
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"rollout server ready at (http://\S+)", line)
            url = match.group(1) if match else None
        if url is None:
            raise RuntimeError("server did not start:\n" + "".join(lines[-40:]))
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
