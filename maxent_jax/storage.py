"""Recognise a workdir that cannot take more writes (full disk, quota, read-only, no permission).

Such a failure mid-run is not a bug to debug: the user frees space or fixes the mount and
reruns the same command, which resumes from the newest whole checkpoint. Orbax and tensorstore
report it as a `ValueError` whose text carries the OS error, Python as an `OSError`; both are
reduced here to the OS's own words so the entry point can print one line (exit 2).
"""

from __future__ import annotations

import errno
import logging
import re

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
    """Drops the tracebacks Orbax's background threads log for a storage fault (each thread logs
    the same error once more); the run reports that fault itself, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None and record.levelno >= logging.ERROR:
            return storage_problem(Exception(record.getMessage())) is None
        return exc is None or storage_problem(exc) is None

