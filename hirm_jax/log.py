"""One path for messages: the `hirm_jax` logger, and the one stderr handler the CLI installs.

    from hirm_jax import log
    _log = log.get(__name__)
    _log.info("step 10/100  loss 0.25")      # progress and notes -> stderr, as written
    _log.warning("no fingerprints")          # -> "warning: no fingerprints"

Data (a result table, an output path) goes to stdout with print; everything else goes here.
`hirm-jax` (and the converters) call `install_handler()`; a library user sees warnings through
Python's default handler and configures `logging` for more (or calls `install_handler()` too).
Errors are not logged: `errors.report` prints them, once, where a command ends.
"""

from __future__ import annotations

import logging
import sys

ROOT = "hirm_jax"
_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


def get(name: str) -> logging.Logger:
    """The logger of a module (`__name__`, under `hirm_jax`)."""
    return logging.getLogger(name)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = _PREFIX.get(record.levelno, "") + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StderrHandler(logging.Handler):
    """Writes to the sys.stderr of the moment (so redirections and pytest's capture see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def install_handler(level: int = logging.INFO) -> None:
    """The CLI's one handler: `hirm_jax.*` messages at `level` and above to stderr, and only
    there (not also through handlers other libraries put on the root logger)."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
