"""The one exception type for user mistakes, and how entry points report it.

A `UserError` is a bad config value, a missing file, a malformed dataset: something the user
fixes, so the entry point prints its message as one line and exits with status 2 instead of
showing a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input; the message names the field/input, the value and what is valid."""


class StorageFault(UserError):
    """A write failed because the disk is full or the workdir read-only (`maxent_jax.storage`): the
    user frees space and reruns; the run has already cut its files back to whole records."""


def exit_on_user_error(main: Callable[[], T]) -> T:
    """Run `main`; a UserError becomes `error: <message>` on stderr and exit code 2.

    So does a write that fails because the disk is full or the workdir read-only (the user frees
    space and reruns; `maxent_jax.storage`), wherever in the run it happens.
    """
    from maxent_jax.storage import storage_problem

    try:
        return main()
    except StorageFault as err:
        _exit_now(f"error: {err}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:
        problem = storage_problem(err)
        if problem is None:
            raise
        _exit_now(f"error: could not write {err.filename or 'a file'}: {problem}; free space (or make the directory "
                  "writable) and rerun the same command (a training run resumes from its newest checkpoint)")


def _exit_now(line: str) -> NoReturn:
    """The one line, then exit 2 without the interpreter's shutdown: after a storage fault, Orbax's
    write tasks still pending on other threads fail again while Python tears down and print
    tracebacks ('Task exception was never retrieved', 'sys.meta_path is None') whatever hooks are
    set. Nothing is lost: the run closed its files and removed the unfinished checkpoint first."""
    print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
