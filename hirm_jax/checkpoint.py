"""Training-state checkpoints (the only module that imports orbax).

The state saved is the trainable subtree, its optimizer state and the step counter; the
frozen parameters are the base encoder's and are never written. Saves are asynchronous;
`close()` waits for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers=ocp.StandardCheckpointHandler())

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
