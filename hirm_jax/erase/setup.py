"""From a config to a placed, compiled erase: the base, the jobs, the mesh, the jitted step.

    plan = plan_erase(config)                  # validates, loads, builds targets; writes nothing
    state, per_job = plan.new_state(), plan.place_jobs(*plan.chunks[0])
    state, metrics = plan.step_fn(state, *plan.step_args(per_job, step=0))

The jobs are trained in chunks of `chunk_size` (all of them at once unless
train.concepts_per_chunk is set); every chunk has the same padded shape, so one compiled step
serves them all. The plan holds no training state: the loop (`erase.loop`) asks for a fresh
state per chunk.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from hirm_jax import config_lib, hub, log
from hirm_jax.encoder.architectures import Architecture, architecture_of
from hirm_jax.encoder.clip import TextEncoder
from hirm_jax.erase import base as base_lib
from hirm_jax.erase import adversarial, masking, prompts, sharding
from hirm_jax.erase.jobs import Jobs, build_jobs
from hirm_jax.erase.step import (batch_indices, init_state, make_inner_attack, make_loss_fn, make_optimizer,
                                 make_train_step, pad_jobs, state_shardings)
from hirm_jax.erase.workdir import BaseRecord
from hirm_jax.fileio import fingerprint

_log = log.get(__name__)


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The base and the prompts of an erase, before anything is placed on devices."""
    config: ml_collections.ConfigDict  # validated, defaults resolved
    encoder: TextEncoder  # at the config's compute dtype
    arch: Architecture
    tokenizer: Any
    jobs: Jobs
    base: BaseRecord


@dataclasses.dataclass(frozen=True)
class ErasePlan:
    """Everything built from the config before the loop; see the module docstring."""
    loaded: Loaded
    mesh: Any
    step_fn: Callable  # jitted (state, frozen, per_job, shared, indices, example_weights) -> (state, metrics)
    frozen: dict  # on the mesh
    shared: dict  # on the mesh
    base_trainable: dict  # replicated; every job starts from it
    state_sharding: dict
    batch_size: int
    total_steps: int  # per chunk
    chunks: list  # [(first job, end job)]
    num_padded: int  # jobs per chunk, padded to the mesh's concept axis
    optimizer: Any
    init_fn: Optional[Callable] = None  # jitted once: trainable -> a fresh [num_padded] state on the mesh
    attack_init: Optional[jax.Array] = None  # robust HiRM: one job's initial attack state

    config = property(lambda self: self.loaded.config)
    encoder = property(lambda self: self.loaded.encoder)
    jobs = property(lambda self: self.loaded.jobs)

    def new_state(self) -> dict:
        """A fresh state for a chunk (every job at the base weights), on the mesh."""
        return self.init_fn(self.base_trainable)

    def place_jobs(self, lo: int, hi: int) -> dict:
        """The per-job arrays of jobs [lo, hi), padded to the chunk size, on the mesh."""
        chosen = jax.tree_util.tree_map(lambda x: x[lo:hi], self.jobs.per_job)
        return sharding.put(pad_jobs(chosen, self.num_padded), sharding.per_job(self.mesh))

    def step_args(self, per_job: dict, step: int) -> tuple:
        """The step's arguments after the state; the batch is a pure function of (step, seed)."""
        indices, weights = batch_indices(step, self.jobs.prompts_per_job, self.batch_size, self.config.train.seed)
        return self.frozen, per_job, self.shared, indices, weights


def _init_fn(optimizer, num_padded: int, state_sharding, attack_init) -> Callable:
    return jax.jit(lambda t: init_state(t, optimizer, num_padded, attack_init), out_shardings=state_sharding)


def attack_init(config: ml_collections.ConfigDict, jobs: Jobs, encoder: TextEncoder) -> Optional[jax.Array]:
    """Robust HiRM's initial attack state for one job (None when objective.adversarial is off)."""
    spec = adversarial.Adversarial.from_config(config.objective.adversarial)
    if spec is None:
        return None
    return adversarial.initial_state(spec, jobs.prompts_per_job, jobs.per_job["adv_slots"].shape[-1],
                                     encoder.config.hidden_size)


def load_erase(config: ml_collections.ConfigDict) -> Loaded:
    """Validate the config, load the base (checked finite, fingerprinted), check every prompt
    fits, and build the jobs' prompts and frozen targets (once)."""
    config_lib.validate(config)
    config = config_lib.resolve_defaults(config)
    concepts = prompts.concepts_from_config(config)
    component = config.encoder.component or None
    source = hub.resolve(config.encoder.path, component=component, what="encoder.path")
    encoder = base_lib.load_base(source, component, config.encoder.allow_pickle)
    arch = architecture_of(encoder)  # CLIP or T5: blocks, modules, BOS, prompt length, tokenizer
    encoder = arch.encoder_class(encoder.config.replace(dtype=config.encoder.dtype), encoder.params)
    if "text_embeds" in config.objective.hooks and not encoder.config.projection_dim:
        raise config_lib.ConfigError(
            f"objective.hooks has 'text_embeds', but the {arch.name} encoder {source.path} has no projection "
            "(projection_dim; T5 has no pooled output): hook 'text_embeds' needs an encoder with a projection")
    if "pooled" in config.objective.hooks and arch.name != "clip":
        raise config_lib.ConfigError(f"objective.hooks has 'pooled', but the {arch.name} encoder {source.path} has no "
                                     "pooled output: hook 'pooled' needs a CLIP encoder")
    tokenizer = prompts.load_tokenizer(source.path, component, config.encoder.tokenizer or None, arch)
    jobs = build_jobs(config, encoder, tokenizer, concepts)
    trainable, _ = masking.split(encoder.params, trainable_paths(config, encoder, arch))
    base = BaseRecord(**source.provenance(), component=component,
                      trainable_sha256={p: fingerprint(np.asarray(v, np.float32)) for p, v in sorted(trainable.items())},
                      files_sha256=base_lib.base_file_fingerprints(source.path, component))
    return Loaded(config, encoder, arch, tokenizer, jobs, base)


def trainable_paths(config: ml_collections.ConfigDict, encoder: TextEncoder, arch: Architecture) -> list[str]:
    return masking.trainable_paths(encoder.params, config.train.trainable_blocks, config.train.trainable_modules,
                                   config.train.trainable_regex, arch)


def plan_erase(config: ml_collections.ConfigDict, mesh=None) -> ErasePlan:
    """Validate, load, build targets, place everything on the mesh and jit the step (nothing written)."""
    sharding.initialize_distributed()
    loaded = load_erase(config)
    config, jobs = loaded.config, loaded.jobs
    requested = config.train.concepts_per_chunk
    mesh = mesh or sharding.make_mesh(config.mesh, num_jobs=min(requested, jobs.num_jobs) if requested > 0
                                      else jobs.num_jobs)
    optimizer = make_optimizer(config.train)
    trainable, frozen = masking.split(loaded.encoder.params, trainable_paths(config, loaded.encoder, loaded.arch))
    batch_size = config.train.batch_size or jobs.prompts_per_job
    initial_attack = attack_init(config, jobs, loaded.encoder)
    step_fn, state_sh, frozen_sh = jit_train_step(loaded.encoder, config, mesh, optimizer, (trainable, initial_attack),
                                                   frozen, batch_size)
    plan = ErasePlan(
        loaded, mesh, step_fn, sharding.put(frozen, frozen_sh), sharding.put(jobs.shared, sharding.replicated(mesh)),
        sharding.put(trainable, sharding.replicated(mesh)), state_sh, batch_size,
        total_steps=config.train.epochs * math.ceil(jobs.prompts_per_job / batch_size), chunks=[], num_padded=0,
        optimizer=optimizer, attack_init=initial_attack)
    chunk_size = _chunk_size(plan)
    num_padded = sharding.pad_to_multiple(chunk_size, mesh)
    return dataclasses.replace(
        plan, chunks=[(lo, min(lo + chunk_size, jobs.num_jobs)) for lo in range(0, jobs.num_jobs, chunk_size)],
        num_padded=num_padded, init_fn=_init_fn(optimizer, num_padded, state_sh, initial_attack))


def jit_train_step(encoder: TextEncoder, config: ml_collections.ConfigDict, mesh, optimizer, initial,
                   frozen: dict, batch_size: int) -> tuple[Callable, dict, dict]:
    """(jitted step, state shardings, frozen shardings) for this encoder, config and mesh.

    `initial` = (trainable leaves, one job's initial attack state or None). Works on arrays or
    on jax.ShapeDtypeStructs (`bench/bench_t5_memory.py` lowers it on abstract T5-XXL shapes).
    The state's shardings depend on its tree only, so one jitted step serves every chunk size."""
    trainable, initial_attack = initial
    batch_sharding = NamedSharding(mesh, sharding.batch_spec(batch_size, mesh))
    spec = adversarial.Adversarial.from_config(config.objective.adversarial)
    loss_fn = make_loss_fn(encoder, tuple(config.objective.hooks), config.encoder.use_attention_mask,
                           config.preservation.weight, batch_sharding, spec)
    inner = None if spec is None else make_inner_attack(encoder, spec, config.train.seed)
    state_sh = state_shardings(jax.eval_shape(lambda t: init_state(t, optimizer, 1, initial_attack), trainable), mesh)
    frozen_sh = sharding.frozen_shardings(mesh, frozen)
    rep = sharding.replicated(mesh)
    step_fn = jax.jit(make_train_step(loss_fn, optimizer, spmd_axis_name="concept", inner_attack=inner),
                      in_shardings=(state_sh, frozen_sh, sharding.per_job(mesh), rep, rep, rep),
                      out_shardings=(state_sh, sharding.per_job(mesh)), donate_argnums=0)
    return step_fn, state_sh, frozen_sh


def abstract_step_args(plan: ErasePlan, num_padded: int) -> tuple:
    """(state, frozen, per_job, shared, indices, weights) as sharded ShapeDtypeStructs, for
    lowering the step without placing anything (memory analysis, chunk fitting)."""
    state = abstract(jax.eval_shape(lambda t: init_state(t, plan.optimizer, num_padded, plan.attack_init),
                                    plan.base_trainable),
                     plan.state_sharding)
    per_job = abstract(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((num_padded, *x.shape[1:]), x.dtype),
                                              plan.jobs.per_job), sharding.per_job(plan.mesh))
    return (state, *plan.step_args(per_job, 0))


def _chunk_size(plan: ErasePlan) -> int:
    config, num_jobs = plan.config, plan.jobs.num_jobs
    requested = config.train.concepts_per_chunk
    if requested != -1:
        return min(requested or num_jobs, num_jobs)

    def step_bytes(num_padded: int) -> int:
        return sharding.step_bytes(plan.step_fn.lower(*abstract_step_args(plan, num_padded)).compile())
    chunk_size = sharding.fit_chunk(num_jobs, plan.mesh, step_bytes, config.train.memory_budget_gib)
    config.train.concepts_per_chunk = chunk_size  # recorded in config.json: a resume keeps the chunks
    _log.info(f"concepts_per_chunk=-1: {chunk_size} of {num_jobs} concepts per step fit the memory budget")
    return chunk_size


def abstract(tree, shardings):
    """ShapeDtypeStructs with shardings (a tree of them, or one for every leaf)."""
    if isinstance(shardings, NamedSharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, tree)
    return jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def setup_run(config: ml_collections.ConfigDict, mesh: Optional[Any] = None) -> ErasePlan:
    """The 0.1 name of `plan_erase`."""
    return plan_erase(config, mesh)
