"""Recognise a workdir that cannot take more writes (full disk, quota, read-only, no permission).

Such a failure mid-run is not a bug to debug: the user frees space or fixes the mount and
reruns the same command, which resumes from the newest whole checkpoint. Orbax and tensorstore
report it as a `ValueError` whose text carries the OS error, Python as an `OSError`; both are
reduced here to the OS's own words so the entry point can print one line (exit 2).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import sys
from typing import Iterator

from maxent_jax.errors import StorageFault

# errno -> the words the user sees; these are the storage faults a rerun can recover from.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# How tensorstore spells them inside a ValueError's message (`[os_error_code='28']`, RESOURCE_EXHAUSTED).
_OS_CODE = re.compile(r"os_error_code='?(\d+)")


def storage_problem(err: BaseException | None) -> str | None:
    """The storage fault behind `err` (or its causes), in the OS's words; None for any other error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return STORAGE_ERRNOS[err.errno]
        match = _OS_CODE.search(str(err))
        if match and int(match.group(1)) in STORAGE_ERRNOS:
            return STORAGE_ERRNOS[int(match.group(1))]
        if "RESOURCE_EXHAUSTED" in str(err) and "No space left" in str(err):
            return STORAGE_ERRNOS[errno.ENOSPC]
        err = err.__cause__ or err.__context__
    return None


class QuietStorageFailures(logging.Filter):
    """Drops the tracebacks Orbax's background threads and write tasks log for a storage fault
    (each logs the same error once more); the run reports that fault itself, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None and record.levelno >= logging.ERROR:
            return storage_problem(Exception(record.getMessage())) is None
        return exc is None or storage_problem(exc) is None


def silence_late_write_callbacks() -> None:
    """Drop the `Event loop is closed` tracebacks of tensorstore writes that outlive their save.

    Orbax runs a save's writes in an event loop that it closes as soon as one write fails; the
    writes still in flight (a full disk fails them all) finish later on tensorstore's threads and
    call back into that closed loop, and each prints an `Event loop is closed` traceback through
    `sys.unraisablehook`. The failure behind them is the save's own, which the manager raises from
    `wait`/`close` (a storage fault as one line). Installed when a manager is built, not when it
    sees the fault: when metrics.jsonl fails first, the callbacks fire before the manager learns of
    the save's failure. Anything else still goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop_callbacks", False):
        return

    def hook(unraisable: "sys.UnraisableHookArgs") -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop_callbacks = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


@contextlib.contextmanager
def reporting_storage_faults(what: str) -> Iterator[None]:
    """A full disk / read-only workdir while writing `what` -> one `StorageFault` line (the entry
    point prints it and exits 2); any other error passes through."""
    try:
        yield
    except OSError as err:
        problem = storage_problem(err)
        if problem is None:
            raise
        raise StorageFault(f"could not write {what}: {problem}; free space (or make the workdir writable) and "
                           "rerun the same command to resume from the newest checkpoint") from None
