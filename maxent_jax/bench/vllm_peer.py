"""The vLLM peer of the `sampler` target; this module runs inside the vLLM environment (no jax).

`python -m maxent_jax.bench.vllm_peer MODEL_DIR SPEC_JSON` starts a real engine through the
vllm rollout backend, prints `{"ready": "<vllm version>"}`, then answers each `run` line on stdin with one JSON line
`{"seconds": s, "tokens": n}` for one generate call of the spec's prompts (n samples each,
temperature 1, EOS ignored), and exits on end of input. The parent (`VllmPeer`) alternates
these runs with its own, so both sides see the same machine load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from maxent_jax.bench.child import ChildProcess
from maxent_jax.bench.timing import Run


def serve(model_dir: str, spec: dict) -> None:
    from maxent_jax.rollout.backend import SamplingParams
    from maxent_jax.rollout.vllm_backend import VLLMBackend

    backend = VLLMBackend(model_dir, max_model_len=spec["max_model_len"])
    if spec.get("torch_threads"):  # after the engine's own CPU thread set-up, which it would override
        import torch

        torch.set_num_threads(spec["torch_threads"])
    params = SamplingParams(n=spec["n"], max_tokens=spec["max_tokens"], temperature=1.0, top_p=1.0, top_k=0,
                            ignore_eos=True, seed=0)
    print(json.dumps({"ready": backend.info()["vllm_version"]}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            continue
        start = time.perf_counter()
        outputs = backend.generate(spec["prompts"], params)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for group in outputs for c in group)
        print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


class VllmPeer(ChildProcess):
    """A vLLM engine in a child process (the vLLM environment's python), driven line by line."""

    def __init__(self, python: Path, model_dir: Path, prompts: Sequence[Sequence[int]], generations: int,
                 new_tokens: int, torch_threads: int | None = None):
        from maxent_jax.cli import REPO_ROOT

        spec = {"prompts": [list(p) for p in prompts], "n": generations, "max_tokens": new_tokens,
                "max_model_len": max(len(p) for p in prompts) + new_tokens, "torch_threads": torch_threads}
        env = {"PYTHONPATH": str(REPO_ROOT), "VLLM_LOGGING_LEVEL": "WARNING", "PATH": "/usr/bin:/bin"}
        if torch_threads:
            env["OMP_NUM_THREADS"] = str(torch_threads)
        super().__init__([str(python), "-m", "maxent_jax.bench.vllm_peer", str(model_dir), json.dumps(spec)], env,
                         stdin=subprocess.PIPE)
        line = self._reply('{"ready"')
        self.version = json.loads(line)["ready"] if line else None
        if self.version is None:
            raise self.startup_error("vLLM peer")

    def _reply(self, prefix: str) -> str:
        """The next stdout line starting with `prefix` (vLLM also logs to stdout); '' at end of output."""
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line.strip()
        return ""

    def run(self, name: str) -> Run:
        def one() -> dict[str, float]:
            self.proc.stdin.write("run\n")
            self.proc.stdin.flush()
            reply = json.loads(self._reply('{"seconds"') or "null")
            if reply is None:
                raise RuntimeError("the vLLM peer exited during a run")
            return {name: reply["tokens"] / reply["seconds"]}

        return one

    def request_stop(self) -> None:
        self.proc.stdin.close()  # end of input: the peer's run loop exits


if __name__ == "__main__":
    serve(sys.argv[1], json.loads(sys.argv[2]))
