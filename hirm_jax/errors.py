"""The errors a user can cause, and the one place that turns them into a one-line message.

Every error hirm_jax raises for bad input derives from `HirmError`; its class says the exit
status. `report(error)` is what every command's entry point calls: a `HirmError` or an
operating-system error on a named path becomes `error: ...` on stderr and its exit status;
anything else is a genuine bug and keeps its traceback. `--debug` (or HIRM_JAX_DEBUG=1)
shows the traceback of user errors too.

This module imports nothing heavy, so `hirm-jax apply` stays free of JAX and torch.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Optional

EXIT_USER_ERROR = 2  # bad input: a config value, a file, a prompt, a refused output
EXIT_ENVIRONMENT = 3  # the machine refused: disk full, read-only or unwritable output


class HirmError(Exception):
    """Base of every error a user can fix; `exit_code` is the command's exit status."""

    exit_code = EXIT_USER_ERROR


class UsageError(HirmError, ValueError):
    """A command line that misses or misuses a flag."""


class OutputError(HirmError, ValueError):
    """An output folder that may not be written: it exists (without --overwrite), or it
    equals, contains or lies inside one of the command's inputs."""


class InputMissingError(HirmError, FileNotFoundError):
    """An input path that does not exist."""


class WriteError(HirmError, OSError):
    """Writing an output failed (disk full, read-only, no permission); nothing was lost."""

    exit_code = EXIT_ENVIRONMENT


class LockedError(HirmError, RuntimeError):
    """Another process holds the folder's lock."""


_WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EDQUOT: "the disk quota is exceeded"}


def describe_write_failure(error: OSError, path, what: str = "output") -> WriteError:
    """A WriteError that names the user's path (not a hidden temp path) and the cause."""
    cause = _WRITE_ERRNOS.get(error.errno, error.strerror or str(error))
    return WriteError(f"could not write {what} {os.fspath(path)}: {cause}; nothing was replaced or lost "
                      "(any partial output was removed)")


def debug_enabled() -> bool:
    return os.environ.get("HIRM_JAX_DEBUG", "") not in ("", "0")


def exit_code_for(error: BaseException) -> Optional[int]:
    """The exit status a user error maps to; None for a bug (which keeps its traceback)."""
    if isinstance(error, HirmError):
        return error.exit_code
    if isinstance(error, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return EXIT_USER_ERROR
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        return EXIT_ENVIRONMENT
    return None


def report(error: BaseException) -> int:
    """Print a user error in one line and return its exit status; re-raise anything else
    (and everything under --debug)."""
    code = exit_code_for(error)
    if code is None or debug_enabled():
        raise error
    message = str(error) if isinstance(error, HirmError) else _os_message(error)
    print(f"error: {message}", file=sys.stderr)
    return code


def _os_message(error: OSError) -> str:
    where = f" {error.filename}" if getattr(error, "filename", None) else ""
    cause = _WRITE_ERRNOS.get(error.errno, error.strerror or str(error))
    if isinstance(error, FileNotFoundError):
        return f"{where.strip() or str(error)} does not exist"
    return f"{cause}:{where}" if where else str(error)
