"""Training-state checkpoints (the only module that imports orbax).

The state saved is the trainable subtree, its optimizer state and the step counter; the
frozen parameters are the base encoder's and are never written. Saves are asynchronous;
`close()` waits for them.

A save the machine refuses (disk full, read-only or unwritable folder), whether orbax fails
at once or in its background threads, is one `WriteError` (exit status 3) naming the
checkpoint folder and the last good checkpoint, which is kept; orbax's partial temporary
folder is removed and the manager is closed, so nothing else is waited for. tensorstore
reports such a failure as a ValueError tagged `[os_error_code='28']`, and orbax and asyncio
log a traceback for it from every background thread (and tensorstore's late callbacks find
orbax's event loop closed): that noise is dropped (the WriteError says it once), unless
HIRM_JAX_DEBUG / --debug is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from hirm_jax.errors import EXIT_ENVIRONMENT, WriteError, debug_enabled, describe_write_failure, exit_code_for

ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes a step to "<step>.orbax-checkpoint-tmp-<time>" first
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")  # how tensorstore tags an operating-system error
_NOISY_LOGGERS = ("absl", "asyncio")  # orbax logs through absl; asyncio reports failed background tasks


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = None
        _quiet_refused_writes(self.directory)
        _quiet_closed_loop_callbacks()
        with self._refused_writes():
            self.manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
                item_handlers=ocp.StandardCheckpointHandler())

    def saved_steps(self) -> list[int]:
        """The finished checkpoints on disk (orbax renames a step's folder into place when complete)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def latest_step(self) -> Optional[int]:
        if self.manager is None:  # closed: read the directory afresh
            return max(self.saved_steps(), default=None)
        return self.manager.latest_step()

    def save(self, step: int, state: Any, force: bool = False) -> None:
        with self._refused_writes():
            self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    @contextlib.contextmanager
    def _refused_writes(self) -> Iterator[None]:
        """Turn a write the machine refuses, anywhere in orbax's exception chain, into a WriteError."""
        try:
            yield
        except Exception as e:  # noqa: BLE001  (orbax wraps the OSError in its own types)
            refused = _refused_write(e)
            if refused is None:
                raise
            self._abandon()
            last = max(self.saved_steps(), default=None)
            kept = (f"the last good checkpoint (step {last}) is kept in {self.directory}, and rerunning the same "
                    "command resumes from it" if last is not None else
                    "no checkpoint had been saved yet, so rerunning the same command starts afresh")
            raise WriteError(f"{describe_write_failure(refused, self.directory, 'checkpoint')}; {kept} once the "
                             "folder is writable again") from e

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
        """Restore onto the structure, shapes and shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        """Wait for pending saves (a refused one raises WriteError) and release the manager."""
        if self.manager is not None:
            with self._refused_writes():
                self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None

    def _abandon(self) -> None:
        """After a refused save: drop the manager (its pending work failed) and orbax's partial folders
        (and, at exit, Python's warning about the write coroutines that will never run)."""
        if not debug_enabled():
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        manager, self.manager = self.manager, None
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.close()
        if self.directory.is_dir():
            for partial in self.directory.glob(f"*{ORBAX_TMP_SUFFIX}*"):
                shutil.rmtree(partial, ignore_errors=True)

    def restore_jobs(self, target_state: dict, num_jobs: int, step: Optional[int] = None) -> dict:
        """Restore a training state whose job-stacked leaves may have been padded for another
        mesh: the saved state is read at its own padding, the first `num_jobs` real jobs are
        kept, re-padded, and placed with the target's shardings."""
        step = self.latest_step() if step is None else step
        saved_jobs = self.manager.item_metadata(step)["bad_step"].shape[0]
        target_jobs = target_state["bad_step"].shape[0]
        if saved_jobs == target_jobs:
            return self.restore(target_state, step)
        mesh = target_state["bad_step"].sharding.mesh
        concept = mesh.shape["concept"]

        def abstract(path, leaf):
            if path[0].key == "step":
                return ocp.utils.to_shape_dtype_struct(leaf)
            spec = leaf.sharding if saved_jobs % concept == 0 else NamedSharding(mesh, P())
            return jax.ShapeDtypeStruct((saved_jobs, *leaf.shape[1:]), leaf.dtype, sharding=spec)
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(
            jax.tree_util.tree_map_with_path(abstract, target_state)))

        def repad(path, saved, target):
            if path[0].key == "step":
                return saved
            kept = saved[:num_jobs]
            filled = jnp.concatenate([kept, jnp.repeat(kept[:1], target_jobs - num_jobs, axis=0)])
            return jax.device_put(filled, target.sharding)
        return jax.tree_util.tree_map_with_path(repad, restored, target_state)


def _refused_write(error: BaseException) -> Optional[OSError]:
    """The OSError in `error`'s chain (causes, contexts, exception groups) that says the machine
    refused a write (disk full, read-only, permission), or None. A tensorstore error counts by
    its os_error_code tag."""
    seen, pending = set(), [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        refused = current if isinstance(current, OSError) else _tagged_os_error(str(current))
        if refused is not None and exit_code_for(refused) == EXIT_ENVIRONMENT:
            return refused
        pending.extend([current.__cause__, current.__context__, *getattr(current, "exceptions", ())])
    return None


def _tagged_os_error(text: str) -> Optional[OSError]:
    match = _TENSORSTORE_ERRNO.search(text)
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


class _RefusedWriteNoise(logging.Filter):
    """Drops log records about a refused write into one checkpoint folder."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = str(directory)

    def filter(self, record: logging.LogRecord) -> bool:
        if debug_enabled():
            return True
        error = record.exc_info[1] if record.exc_info else None
        text = record.getMessage() + (f" {error}" if error is not None else "")
        refused = _refused_write(error if error is not None else RuntimeError(text))
        return refused is None or self.directory not in text


_QUIETED: set[str] = set()


def _quiet_refused_writes(directory: Path) -> None:
    """Install _RefusedWriteNoise for `directory` once (it stays: asyncio reports unretrieved
    task errors whenever the tasks are collected, possibly at exit)."""
    if str(directory) in _QUIETED:
        return
    _QUIETED.add(str(directory))
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).addFilter(_RefusedWriteNoise(directory))


def _quiet_closed_loop_callbacks() -> None:
    """When a save fails, tensorstore's callbacks for the writes still in flight find orbax's
    event loop closed and report RuntimeError('Event loop is closed') as unraisable, dozens of
    times, before the failure reaches us: drop those (the failure itself is raised)."""
    previous = sys.unraisablehook
    if debug_enabled() or getattr(previous, "_hirm_quiet", False):
        return

    def hook(unraisable):
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
        if not closed_loop:
            previous(unraisable)
    hook._hirm_quiet = True
    sys.unraisablehook = hook
