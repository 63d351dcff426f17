"""Devices, mesh and shardings: the only module that knows about devices.

Mesh axes (sizes from config `mesh`, -1 = all remaining devices):
    concept  independent erasures (one trainable copy each) are split over it
    data     the prompts of one erasure step are split over it
    fsdp     frozen parameters too large to replicate are split over it, and so are the trained
             leaves and their Adam state (job_state: the same rule, after the job axis)

The same code runs on one CPU, on 8 fake CPU devices, on one GPU and on a pod slice; on a
multi-process run `initialize_distributed()` connects the processes first (see README).
Every process builds the same prompts and targets from the config (they are small), and
`put()` materialises only the shards a process addresses.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from hirm_jax.config_lib import ConfigError  # a ValueError naming the field and the rule

AXES = ("concept", "data", "fsdp")


def initialize_distributed() -> None:
    """Connect the processes of a multi-process run (TPU pod slice, several GPU hosts).

    On Cloud TPU and under SLURM/Open MPI, jax finds the coordinator itself; elsewhere set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. A single process does nothing.
    """
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    cluster = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))
    if not (explicit or cluster) or jax.distributed.is_initialized():
        return
    if explicit:
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def mesh_shape(mesh_config, num_devices: int, num_jobs: int = 1) -> dict[str, int]:
    """Axis sizes; concept = 0 picks the largest divisor of the free devices that is <= num_jobs."""
    sizes = {axis: int(getattr(mesh_config, axis)) for axis in AXES}
    if sizes["concept"] == 0:
        rest = num_devices // math.prod(s for a, s in sizes.items() if a != "concept" and s > 0)
        sizes["concept"] = max(d for d in range(1, rest + 1) if rest % d == 0 and d <= max(num_jobs, 1))
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"at most one mesh axis may be -1 (the remaining devices) but {free} are")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ConfigError(f"mesh axis sizes must be positive or -1 but are {sizes}")
    if free:
        if num_devices % fixed:
            raise ConfigError(f"mesh {sizes} cannot use {num_devices} devices: {num_devices} is not divisible by {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are available; "
                          "the product of the axis sizes must equal the device count")
    return sizes


def make_mesh(mesh_config, num_jobs: int = 1, devices: Optional[list] = None) -> Mesh:
    """A mesh with Auto axes (XLA propagates shardings from the ones we place)."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_config, len(devices), num_jobs)
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def per_job(mesh: Mesh) -> NamedSharding:
    """Leading axis = the job (independent erasure) axis, split over `concept`."""
    return NamedSharding(mesh, P("concept"))


def frozen_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Split the largest axis divisible by the fsdp size; replicate what does not divide."""
    if fsdp == 1 or not shape:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])
    return P()


def frozen_shardings(mesh: Mesh, frozen: dict) -> dict:
    fsdp = mesh.shape["fsdp"]
    return {k: NamedSharding(mesh, frozen_spec(np.shape(v), fsdp)) for k, v in frozen.items()}


def job_state(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """A leaf of the training state, [jobs, ...] (a trainable leaf, its Adam moments, a per-job
    counter): the job axis split over `concept` as per_job, and the rest split over `fsdp` by the
    frozen rule (frozen_spec), so the trained block and its optimizer state are not replicated on
    every fsdp device (for T5-XXL block 0 and its Adam state that is 2.3 GB per device)."""
    return NamedSharding(mesh, P("concept", *frozen_spec(tuple(shape[1:]), mesh.shape["fsdp"])))


def put(tree: Any, shardings: Any) -> Any:
    """Place host arrays; each process materialises only the shards it addresses."""
    def place(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    if isinstance(shardings, NamedSharding):
        return jax.tree_util.tree_map(lambda x: place(x, shardings), tree)
    return jax.tree_util.tree_map(place, tree, shardings)


def step_bytes(compiled) -> int:
    """Peak bytes per device of a compiled step, from XLA's memory analysis: arguments +
    outputs - donated (aliased) buffers + temporaries."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def device_memory_bytes() -> int:
    """Memory of one local device: what the accelerator reports, or on CPU the host's RAM
    shared by its CPU devices."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def fit_chunk(num_jobs: int, mesh: Mesh, step_bytes_for, budget_gib: float = 0.0) -> int:
    """The most jobs per step (a multiple of the concept axis, at most num_jobs) whose step fits
    the memory budget per device (budget_gib; 0 = 90% of the device's memory).

    step_bytes_for(num_padded) compiles the step for that many job slots and returns its peak
    bytes per device; memory is linear in the jobs per device, so two probes (1 and 2 per
    device) give the slope, and the chosen size is checked with a third compile."""
    budget = budget_gib * 2**30 if budget_gib > 0 else 0.9 * device_memory_bytes()
    size = mesh.shape["concept"]
    one = step_bytes_for(size)
    if one > budget:
        raise ConfigError(f"one concept per device needs {one / 2**30:.2f} GiB per device but the memory budget is "
                          f"{budget / 2**30:.2f} GiB (train.memory_budget_gib; 0 = 90% of the device): use more devices "
                          "on the concept axis, fsdp for the frozen weights, or a smaller train.batch_size")
    per_job = max(step_bytes_for(2 * size) - one, 1)
    fixed = one - per_job
    per_device = min(max(int((budget - fixed) // per_job), 1), -(-num_jobs // size))
    while per_device > 1 and step_bytes_for(per_device * size) > budget:  # the linear model was optimistic
        per_device = max(1, int(per_device * 0.9))
    if jax.process_count() > 1:  # every process must run the same chunks: the smallest fit wins
        from jax.experimental import multihost_utils  # noqa: PLC0415
        per_device = int(np.min(multihost_utils.process_allgather(np.int32(per_device))))
    return min(num_jobs, per_device * size)


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly sharded) arrays; on a multi-process run, arrays split across
    processes are gathered first (a collective: every process must call it)."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils  # noqa: PLC0415
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree_util.tree_map(fetch, tree)


def is_writer() -> bool:
    """Process 0 writes the run's files; the others compute the same results and skip it."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        multihost_utils.sync_global_devices(name)


def batch_spec(batch_size: int, mesh: Mesh) -> P:
    """Split a step's prompts over `data` when they divide evenly; otherwise replicate."""
    return P("data") if mesh.shape["data"] > 1 and batch_size % mesh.shape["data"] == 0 else P()


def pad_to_multiple(n: int, mesh: Mesh) -> int:
    """Jobs are padded to a multiple of the concept axis (padding jobs are masked out)."""
    size = mesh.shape["concept"]
    return -(-n // size) * size
