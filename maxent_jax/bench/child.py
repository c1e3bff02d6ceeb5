"""A child process a benchmark drives (a peer engine, a rollout server): log, start-up failure, bounded stop.

Standard library only (and `maxent_jax.errors`, which is too): the vLLM peer module that
subclasses it also runs inside the vLLM environment, which has no jax.
"""

from __future__ import annotations

import subprocess
import tempfile
from typing import Sequence

from maxent_jax.errors import UserError


class ChildProcess:
    """`argv` run from the repository root with `env`; stdout is a text pipe, stderr a temporary file.

    The log is a file, not a pipe: vLLM logs a lot, and an undrained pipe would block it.
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str], *, stdin: int | None = None):
        from maxent_jax.cli import REPO_ROOT

        self.program = argv[0]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(list(argv), cwd=REPO_ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def startup_error(self, what: str, log_lines: int = 20) -> UserError:
        """Stop the child and return the error to raise: one line saying what did not start and how it
        ended, then the last `log_lines` lines of its log (where the cause is: a wrong interpreter, a
        missing package, a port in use), shown without a traceback of ours."""
        self.log.seek(0)
        tail = self.log.read().rstrip().splitlines()[-log_lines:]
        try:  # its stdout has ended: it is exiting, or alive but mute
            status: int | None = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            status = None
        self.close()
        ended = f"exited with status {status}" if status is not None else "stopped answering"
        log = "\n".join(f"  {line}" for line in tail) if tail else "  (empty)"
        return UserError(f"{what} did not start: {self.program} {ended}; the end of its log:\n{log}")

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
