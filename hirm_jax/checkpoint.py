"""Training-state checkpoints (the only module that imports orbax).

The state saved is the trainable subtree, its optimizer state and the step counter; the
frozen parameters are the base encoder's and are never written. Saves are asynchronous;
`close()` waits for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> Optional[int]:
        if self.manager is None:  # closed: read the directory afresh
            steps = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()] if self.directory.exists() else []
            return max(steps, default=None)
        return self.manager.latest_step()

    def save(self, step: int, state: Any, force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
        """Restore onto the structure, shapes and shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None
