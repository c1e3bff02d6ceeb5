"""A child process a benchmark drives (a peer engine, a rollout server): log, start-up failure, bounded stop.

Standard library only: the vLLM peer module that subclasses it also runs inside the vLLM
environment, which has no jax.
"""

from __future__ import annotations

import subprocess
import tempfile
from typing import Sequence


class ChildProcess:
    """`argv` run from the repository root with `env`; stdout is a text pipe, stderr a temporary file.

    The log is a file, not a pipe: vLLM logs a lot, and an undrained pipe would block it.
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str], *, stdin: int | None = None):
        from maxent_jax.cli import REPO_ROOT

        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(list(argv), cwd=REPO_ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def startup_error(self, what: str) -> RuntimeError:
        """Stop the child and return the error to raise: `what` did not start, with the end of its log."""
        self.log.seek(0)
        tail = self.log.read()[-3000:]
        self.close()
        return RuntimeError(f"{what} did not start; its log ends with:\n{tail}")

    def request_stop(self) -> None:
        """Ask the child to exit (terminate; a child reading stdin is told by closing it instead)."""
        self.proc.terminate()

    def close(self) -> None:
        """Ask the child to exit, kill it if it has not within 30 s, close the log."""
        if self.proc.poll() is None:
            self.request_stop()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
