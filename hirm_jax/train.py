"""HiRM erasure: train the early block(s) so the concepts' high-level representation is misdirected.

    from hirm_jax.train import train_and_evaluate
    summary = train_and_evaluate(config, workdir)

The loop: load the base encoder, build the jobs (prompts and frozen targets, computed ONCE),
place everything on the mesh, then run one jitted, donated step in which only the trainable
subtree is differentiated. Independent jobs (one delta per concept, `joint=False`) are
stacked on a leading axis, vmapped and split over the mesh's `concept` axis; a joint run is
the one-job case of the same step. With `train.concepts_per_chunk` the jobs are trained a
chunk at a time, every chunk with the same compiled step. The state (trainable leaves, Adam state, step) is
checkpointed with orbax every `train.checkpoint_every` steps; calling again on the same
workdir resumes (also on another mesh) and ends bit-identical to an uninterrupted run.

A finished workdir holds (the contract `hirm_jax.export` reads):
    config.json                     the resolved config
    run.json                        base, concepts, anchors, objective, hyper-parameters, provenance, timings
    erased_trainable.safetensors    the trained leaves, keyed by Flax path
    metrics.jsonl, loss.png         the loss curve
    checkpoints/                    orbax training state
    .lock                           held (flock) by the erase running in it
and, for independent jobs, one folder per concept under concepts/ (each with its own
run.json and erased_trainable.safetensors) instead of the top-level two, plus index.json
(concept -> folder, the chunks, timings). On a multi-process run process 0 writes them all.

run.json's `base` says which base the deltas apply to: `source` (an absolute path, or the hub
id with its `revision` and local `snapshot`), `component`, `trainable_sha256` ({Flax path:
`delta.fingerprint` of the base value} for every trained leaf) and `files_sha256` ({file name
relative to the source: sha256} of the weight files the base was read from).

Rules for a workdir: it is absent, empty, or one an erase wrote (anything else, such as an
encoder folder, is refused before it is touched); one erase at a time holds its lock (a second
exits naming the first's pid); the config and the base are checked before it is touched, so a
bad input writes nothing. Bad base weights (NaN/inf) and a tokenizer whose ids do not fit the
encoder's vocabulary are refused before training, naming the tensor or the prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding

import hirm_jax
from hirm_jax import config_lib, hub, masking, objectives, prompts, provenance, sharding
from hirm_jax.architectures import architecture_of
from hirm_jax.checkpoint import Checkpointer
from hirm_jax.delta import fingerprint
from hirm_jax.errors import HirmError, OutputError
from hirm_jax.fileio import atomic_file, folder_lock, safetensors_bytes, sha256_file, write_json
from hirm_jax.layouts import FLAX_PARAMS_NAME, PickleRefusedError, describe_layout, load_text_encoder, weight_files
from hirm_jax.model import TextEncoder
from hirm_jax.problem import Jobs, build_jobs
from hirm_jax.weights import WeightsError


class NonFiniteLossError(HirmError, RuntimeError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- the step

def make_optimizer(train_cfg) -> optax.GradientTransformation:
    adam = optax.adam(train_cfg.learning_rate, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps)
    if train_cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), adam)
    return adam


def make_loss_fn(encoder: TextEncoder, hooks, use_attention_mask: bool, preservation_weight: float,
                 batch_sharding: Optional[NamedSharding] = None) -> Callable:
    """loss(trainable, frozen, job_arrays, shared, indices, example_weights) for ONE job."""
    def rep_loss(params, ids, mask, targets, weights, example_weights=None):
        out = encoder.apply(params, ids, mask if use_attention_mask else None)
        return sum(objectives.misdirection_loss(objectives.read_hook(out, h), targets[h], weights[h], example_weights)
                   for h in hooks)

    def loss_fn(trainable, frozen, job_arrays, shared, indices, example_weights):
        params = masking.merge(trainable, frozen)
        batch = jax.tree_util.tree_map(lambda x: x[indices], job_arrays)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        misdirection = rep_loss(params, batch["input_ids"], batch["attention_mask"], batch["targets"],
                                batch["weights"], example_weights)
        preservation = jnp.zeros((), jnp.float32)
        if preservation_weight > 0:
            preservation = rep_loss(params, shared["retain_ids"], shared["retain_mask"],
                                    shared["retain_targets"], shared["retain_weights"])
        return misdirection + preservation_weight * preservation, (misdirection, preservation)
    return loss_fn


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    spmd_axis_name: Optional[str] = None) -> Callable:
    """(state, frozen, per_job, shared, indices, example_weights) -> (state, metrics[J]).

    vmapped over the job axis; a non-finite loss or gradient leaves that job's state unchanged
    and records the step in state["bad_step"][job]."""
    def job_step(trainable, opt_state, bad_step, job_arrays, frozen, shared, indices, example_weights, step):
        (total, (misdirection, preservation)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, job_arrays, shared, indices, example_weights)
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
        bad_step = jnp.where(ok | (bad_step >= 0), bad_step, step)
        metrics = dict(loss=total, misdirection=misdirection, preservation=preservation, grad_norm=grad_norm)
        return keep(new_trainable, trainable), keep(new_opt_state, opt_state), bad_step, metrics

    batched = jax.vmap(job_step, in_axes=(0, 0, 0, 0, None, None, None, None, None), spmd_axis_name=spmd_axis_name)

    def train_step(state, frozen, per_job, shared, indices, example_weights):
        trainable, opt_state, bad_step, metrics = batched(
            state["trainable"], state["opt_state"], state["bad_step"], per_job, frozen, shared, indices,
            example_weights, state["step"])
        return dict(step=state["step"] + 1, trainable=trainable, opt_state=opt_state, bad_step=bad_step), metrics
    return train_step


def init_state(trainable: dict, optimizer, num_jobs: int = 1) -> dict:
    """Every job starts from the base weights; leaves get a leading [num_jobs] axis."""
    stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_jobs, *x.shape)), trainable)
    return dict(step=jnp.zeros((), jnp.int32), trainable=stacked, opt_state=jax.vmap(optimizer.init)(stacked),
                bad_step=jnp.full((num_jobs,), -1, jnp.int32))


def state_shardings(state: dict, mesh) -> dict:
    return dict(step=sharding.replicated(mesh),
                trainable=jax.tree_util.tree_map(lambda x: sharding.job_state(mesh, x.shape), state["trainable"]),
                opt_state=jax.tree_util.tree_map(lambda x: sharding.job_state(mesh, x.shape), state["opt_state"]),
                bad_step=sharding.per_job(mesh))


def batch_indices(step: int, num_prompts: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt indices and 0/1 example weights of a step; a pure function of (step, seed), so
    a resumed run sees the same batches. Batches always have `batch_size` rows (padded)."""
    steps_per_epoch = math.ceil(num_prompts / batch_size)
    epoch, k = divmod(step, steps_per_epoch)
    order = np.arange(num_prompts)
    if steps_per_epoch > 1:
        order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
    chosen = order[k * batch_size:(k + 1) * batch_size]
    weights = np.ones(batch_size, np.float32)
    if len(chosen) < batch_size:
        weights[len(chosen):] = 0.0
        chosen = np.concatenate([chosen, np.zeros(batch_size - len(chosen), chosen.dtype)])
    return chosen.astype(np.int32), weights


def pad_jobs(tree, num_padded: int):
    """Repeat job 0 to fill the padded job slots (their results are discarded)."""
    def pad(x):
        x = np.asarray(x)
        extra = num_padded - x.shape[0]
        return x if extra == 0 else np.concatenate([x, np.repeat(x[:1], extra, axis=0)])
    return jax.tree_util.tree_map(pad, tree)


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Setup:
    """Everything built from the config before the loop.

    The jobs are trained in chunks of `chunk_size` (all of them at once unless
    train.concepts_per_chunk is set); every chunk has the same padded shape, so one compiled
    step serves them all. `state` and `per_job` are the first chunk's."""
    config: ml_collections.ConfigDict
    encoder: TextEncoder
    jobs: Jobs
    mesh: Any
    step_fn: Callable
    state: dict  # freshly initialised, on the mesh
    frozen: dict
    per_job: dict
    shared: dict
    batch_size: int
    total_steps: int  # per chunk
    chunks: list  # [(first job, end job)]
    new_state: Callable[[], dict]  # a fresh state for the next chunk
    place_jobs: Callable[[int, int], dict]  # the per-job arrays of jobs [lo, hi), padded, on the mesh
    step_args: Callable[[dict, int], tuple]  # (per_job, step) -> the step's arguments after the state
    base: dict  # run.json's "base": source, component, fingerprints of the trained leaves and weight files


def setup_run(config: ml_collections.ConfigDict, mesh=None) -> Setup:
    """Validate, load, build targets and place everything on the mesh (nothing written)."""
    config_lib.validate(config)
    config = config_lib.resolve_defaults(config)
    concepts = prompts.concepts_from_config(config)
    sharding.initialize_distributed()
    component = config.encoder.component or None
    source = hub.resolve(config.encoder.path, component=component, what="encoder.path")
    encoder = load_base(source, component, config.encoder.allow_pickle)
    arch = architecture_of(encoder)  # CLIP or T5: blocks, modules, BOS, prompt length, tokenizer
    encoder = arch.encoder_class(encoder.config.replace(dtype=config.encoder.dtype), encoder.params)
    if "text_embeds" in config.objective.hooks and not encoder.config.projection_dim:
        raise config_lib.ConfigError(
            f"objective.hooks has 'text_embeds', but the {arch.name} encoder {source.path} has no projection "
            "(projection_dim; T5 has no pooled output): hook 'text_embeds' needs an encoder with a projection")
    tokenizer = prompts.load_tokenizer(source.path, component, config.encoder.tokenizer or None, arch)
    prompts.check_prompt_lengths(concepts, config.templates, tokenizer,
                                 arch.max_length(encoder.config, config.encoder.max_length))
    jobs = build_jobs(config, encoder, tokenizer, concepts)
    requested = config.train.concepts_per_chunk
    mesh = mesh or sharding.make_mesh(config.mesh, num_jobs=min(requested, jobs.num_jobs) if requested > 0
                                      else jobs.num_jobs)

    hooks = tuple(config.objective.hooks)
    batch_size = config.train.batch_size or jobs.prompts_per_job
    batch_sharding = NamedSharding(mesh, sharding.batch_spec(batch_size, mesh))
    loss_fn = make_loss_fn(encoder, hooks, config.encoder.use_attention_mask, config.preservation.weight,
                           batch_sharding)
    optimizer = make_optimizer(config.train)
    paths = masking.trainable_paths(encoder.params, config.train.trainable_blocks,
                                    config.train.trainable_modules, config.train.trainable_regex, arch)
    trainable, frozen = masking.split(encoder.params, paths)
    base_record = dict(source.provenance(), component=component,
                       trainable_sha256={p: fingerprint(np.asarray(v, np.float32)) for p, v in sorted(trainable.items())},
                       files_sha256=base_file_fingerprints(source.path, component))

    frozen_sh = sharding.frozen_shardings(mesh, frozen)
    frozen = sharding.put(frozen, frozen_sh)
    shared = sharding.put(jobs.shared, sharding.replicated(mesh))
    base = sharding.put(trainable, sharding.replicated(mesh))
    # the state's shardings depend on its tree only, so one jitted step serves every chunk size
    state_sh = state_shardings(jax.eval_shape(lambda t: init_state(t, optimizer, 1), base), mesh)
    rep = sharding.replicated(mesh)
    step_fn = jax.jit(
        make_train_step(loss_fn, optimizer, spmd_axis_name="concept"),
        in_shardings=(state_sh, frozen_sh, sharding.per_job(mesh), rep, rep, rep),
        out_shardings=(state_sh, sharding.per_job(mesh)),
        donate_argnums=0)
    step_args = lambda per_job, step: (frozen, per_job, shared, *batch_indices(
        step, jobs.prompts_per_job, batch_size, config.train.seed))

    if requested == -1:
        def step_bytes(num_padded: int) -> int:
            state = _abstract(jax.eval_shape(lambda t: init_state(t, optimizer, num_padded), base), state_sh)
            per_job = _abstract(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((num_padded, *x.shape[1:]), x.dtype),
                                                       jobs.per_job), sharding.per_job(mesh))
            return sharding.step_bytes(step_fn.lower(state, *step_args(per_job, 0)).compile())
        chunk_size = sharding.fit_chunk(jobs.num_jobs, mesh, step_bytes, config.train.memory_budget_gib)
        config.train.concepts_per_chunk = chunk_size  # recorded in config.json: a resume keeps the chunks
        print(f"concepts_per_chunk=-1: {chunk_size} of {jobs.num_jobs} concepts per step fit the memory budget",
              file=sys.stderr)
    else:
        chunk_size = min(requested or jobs.num_jobs, jobs.num_jobs)
    chunks = [(lo, min(lo + chunk_size, jobs.num_jobs)) for lo in range(0, jobs.num_jobs, chunk_size)]
    num_padded = sharding.pad_to_multiple(chunk_size, mesh)
    place_jobs = lambda lo, hi: sharding.put(
        pad_jobs(jax.tree_util.tree_map(lambda x: x[lo:hi], jobs.per_job), num_padded), sharding.per_job(mesh))
    init = jax.jit(lambda t: init_state(t, optimizer, num_padded), out_shardings=state_sh)
    total_steps = config.train.epochs * math.ceil(jobs.prompts_per_job / batch_size)
    return Setup(config, encoder, jobs, mesh, step_fn, init(base), frozen, place_jobs(*chunks[0]), shared,
                 batch_size, total_steps, chunks, lambda: init(base), place_jobs, step_args, base_record)


# ----------------------------------------------------------------------------- the base

ERASE_PICKLE_FLAG = "--config.encoder.allow_pickle=True"


def load_base(source: hub.Source, component: Optional[str], allow_pickle: bool) -> TextEncoder:
    """The base encoder, refused when any weight is NaN/inf (it would surface only as a NaN loss).

    A refused pickle names erase's own switch, encoder.allow_pickle (the loaders name the
    converters' --allow-pickle)."""
    try:
        encoder = load_text_encoder(source.path, component, allow_pickle=allow_pickle)
    except PickleRefusedError as e:
        raise PickleRefusedError(e.path, ERASE_PICKLE_FLAG) from e
    check_finite_weights(encoder.params, f"{source.path}" + (f" (component {component})" if component else ""))
    return encoder


def check_finite_weights(params, where: str) -> None:
    """Every base weight must be finite; the error names the first bad tensor by Flax path."""
    bad = {}
    for path, value in masking.flatten(params).items():
        value = np.asarray(value)
        if not np.isfinite(value).all():
            bad[path] = (int(np.isnan(value).sum()), int(np.isinf(value).sum()), value.size)
    if bad:
        path, (nans, infs, size) = sorted(bad.items())[0]
        others = f"; {len(bad) - 1} more tensor(s) too: {sorted(bad)[1:4]}" if len(bad) > 1 else ""
        raise WeightsError(f"the base encoder {where} has non-finite weights: {path} holds {nans} NaN and {infs} inf "
                           f"of {size} values{others}; every weight must be finite (a corrupt or badly converted "
                           "checkpoint?)")


def base_weight_files(path: Path, component: Optional[str]) -> list[Path]:
    """The files `load_text_encoder(path, component)` reads weights from, in the loaders' order of
    preference: model.safetensors, else the index and its shards, else pytorch_model.bin."""
    layout = describe_layout(path)
    if layout == "single_file":
        return [path]
    folder = path / component if layout == "pipeline" and component else path
    return [folder / FLAX_PARAMS_NAME] if layout == "flax" else weight_files(folder)


def base_file_fingerprints(path: Path, component: Optional[str]) -> dict[str, str]:
    """{file name relative to the source (a single file: its name): sha256} of the weight files."""
    return {(f.relative_to(path).as_posix() if path.is_dir() else f.name): sha256_file(f)
            for f in base_weight_files(path, component)}


def _abstract(tree, shardings):
    """ShapeDtypeStructs with shardings (a tree of them, or one for every leaf)."""
    if isinstance(shardings, NamedSharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, tree)
    return jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       stop_after: Optional[int] = None, mesh=None) -> dict[str, Any]:
    """Erase the config's concepts; returns the summary also written to run.json (index.json
    for joint=False runs).

    `stop_after` ends the run after that many steps (with a checkpoint), as an interruption would.
    Checkpoints are numbered by global step, chunk * total_steps + step, so a resumed run knows
    its chunk; a chunk's results are written when it ends, before the next chunk starts.

    The workdir is checked (check_workdir_kind) and the config and base loaded before it is
    touched; from then on the writing process holds its lock (fileio.folder_lock) to the end.
    """
    t0 = time.perf_counter()
    workdir = Path(workdir)
    check_workdir_kind(workdir)
    run = setup_run(_keep_saved_chunking(config, workdir), mesh)
    with folder_lock(workdir, "workdir") if sharding.is_writer() else contextlib.nullcontext():
        return _train_in(workdir, run, stop_after, t0)


def _train_in(workdir: Path, run: Setup, stop_after: Optional[int], t0: float) -> dict[str, Any]:
    """The body of train_and_evaluate, under the workdir's lock."""
    config, jobs = run.config, run.jobs
    resolved = json.loads(config.to_json())
    _check_workdir(workdir, resolved)
    t_load = time.perf_counter()

    metrics_path = workdir / "metrics.jsonl"
    workdir.mkdir(parents=True, exist_ok=True)  # (the writer's lock made it; other processes may not see it yet)
    if sharding.is_writer():
        write_json(workdir / "config.json", resolved)
        drop_torn_tail(metrics_path)
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.checkpoints_to_keep)
    steps = run.total_steps
    latest = ckpt.latest_step()
    first_chunk = 0 if latest is None else (latest - 1) // steps

    compiled = run.step_fn.lower(run.state, *run.step_args(run.per_job, 0)).compile()  # ahead: compile and step timed apart
    t_compile = time.perf_counter()

    budget = math.inf if stop_after is None else stop_after
    t_train = t_ckpt = 0.0
    labels = len(run.chunks) > 1
    try:
        for c in range(first_chunk, len(run.chunks)):
            lo, hi = run.chunks[c]
            state = run.state if c == first_chunk else run.new_state()
            per_job = run.per_job if c == 0 else run.place_jobs(lo, hi)
            if c == first_chunk and latest is not None:
                state = ckpt.restore_jobs(state, hi - lo, step=latest)
                print(f"resuming {workdir} from step {int(state['step'])} of {steps}"
                      + (f" in chunk {c + 1} of {len(run.chunks)}" if labels else ""), file=sys.stderr)
            start = int(state["step"])
            stop = int(min(steps, start + budget))
            pending, t_chunk, metrics = [], time.perf_counter(), None
            for step in range(start, stop):
                state, metrics = compiled(state, *run.step_args(per_job, step))
                pending.append((step + 1, metrics))
                done = step + 1
                at_checkpoint = done % config.train.checkpoint_every == 0 or done == stop
                if done % config.train.log_every == 0 or at_checkpoint:
                    _check_finite(state, jobs, lo, hi, ckpt, workdir)
                    _log(metrics_path, pending, hi - lo, done, steps, start, t_chunk, c if labels else None,
                         len(run.chunks))
                    pending = []
                if at_checkpoint:
                    t_save = time.perf_counter()
                    ckpt.save(c * steps + done, state, force=True)
                    t_ckpt += time.perf_counter() - t_save
            budget -= stop - start
            t_train += time.perf_counter() - t_chunk
            if int(state["step"]) < steps:
                return dict(status="interrupted", step=int(state["step"]), total_steps=steps, chunk=c,
                            chunks=len(run.chunks))
            written = all((_job_folder(run, workdir, j) / "run.json").is_file() for j in range(lo, hi))
            if metrics is not None or not written:  # (resumed at a chunk's end: its results may be written)
                final_losses = None if metrics is None else sharding.to_host(metrics["loss"])[: hi - lo]
                _write_job_results(run, state, lo, hi, workdir, resolved, final_losses)
                sharding.barrier(f"hirm_jax results of chunk {c}")
            state = metrics = None  # free this chunk's state before the next one is made
    finally:
        t_save = time.perf_counter()
        ckpt.close()
        t_ckpt += time.perf_counter() - t_save

    timings = dict(load=t_load - t0, compile=t_compile - t_load, train=t_train - t_ckpt, checkpoint=t_ckpt)
    summary = _write_summary(run, workdir, timings)
    if sharding.is_writer():
        _plot_loss(metrics_path, workdir / "loss.png")
    print(f"erased {sum(len(c) for c in jobs.concepts)} concept(s) in {jobs.num_jobs} job(s)"
          + (f" ({len(run.chunks)} chunks)" if labels else "")
          + f", {steps} steps: load {timings['load']:.1f}s compile {timings['compile']:.1f}s "
          f"train {timings['train']:.1f}s -> {workdir}", file=sys.stderr)
    if config.report.enabled and sharding.is_writer():
        from hirm_jax import textreport  # noqa: PLC0415  (plotting stays off the training path)
        textreport.report_for_run(workdir)
    sharding.barrier("hirm_jax run done")  # no process leaves before the files are written
    return dict(status="done", **summary)


def slug(name: str) -> str:
    """A folder name for a concept: readable, and unique by a hash of the exact name."""
    readable = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40] or "concept"
    return f"{readable}-{zlib.crc32(name.encode('utf-8')):08x}"


def _common_summary(run: Setup, resolved: dict) -> dict:
    config = run.config
    return dict(
        base=run.base,
        component_name=config.encoder.component or "text_encoder",
        encoder_config=dataclasses.asdict(run.encoder.config),
        concept_type=config.concept_type, objective=resolved["objective"],
        preservation=resolved["preservation"], train=resolved["train"], method="hirm",
        seed=config.train.seed, steps=run.total_steps, **provenance.provenance())


def _job_folder(run: Setup, workdir: Path, job: int) -> Path:
    return workdir if run.config.joint else workdir / "concepts" / slug(run.jobs.concepts[job][0].name)


def _write_job_results(run: Setup, state, lo: int, hi: int, workdir: Path, resolved: dict, final_losses) -> None:
    """Jobs [lo, hi) of a finished chunk: erased_trainable.safetensors and run.json each."""
    trainable = sharding.to_host(state["trainable"])
    if not sharding.is_writer():
        return
    common = _common_summary(run, resolved)
    for j in range(lo, hi):
        concepts, pairs = run.jobs.concepts[j], run.jobs.prompt_pairs[j]
        folder = _job_folder(run, workdir, j)
        folder.mkdir(parents=True, exist_ok=True)
        trained = {p: np.asarray(v[j - lo], np.float32) for p, v in trainable.items()}
        with atomic_file(folder / "erased_trainable.safetensors", "wb") as f:
            f.write(safetensors_bytes(trained, metadata={"format": "flax", "producer": f"hirm_jax {hirm_jax.__version__}"}))
        write_json(folder / "run.json", dict(
            common, concepts=[c.name for c in concepts], anchors={c.name: c.anchor for c in concepts if c.anchor},
            prompts=[dataclasses.asdict(p) for p in pairs], trainable_paths=sorted(trained),
            final_loss=None if final_losses is None else float(final_losses[j - lo])))


def _write_summary(run: Setup, workdir: Path, timings: dict) -> dict:
    """Add the run's timings to run.json (joint) or write index.json (one delta per concept)."""
    folders = [_job_folder(run, workdir, j) for j in range(run.jobs.num_jobs)]
    if run.config.joint:
        summary = dict(json.loads((workdir / "run.json").read_text()), timings_s=timings)
        if sharding.is_writer():
            write_json(workdir / "run.json", summary)
        return summary
    common = json.loads((folders[0] / "run.json").read_text())
    index = dict(concepts={jobs[0].name: str(folder.relative_to(workdir))
                           for jobs, folder in zip(run.jobs.concepts, folders)},
                 **{k: common[k] for k in ("base", "objective", "steps")},
                 chunks=[list(chunk) for chunk in run.chunks], timings_s=timings)
    if sharding.is_writer():
        write_json(workdir / "index.json", index)
    return dict(index, jobs=[json.loads((folder / "run.json").read_text()) for folder in folders])


def _keep_saved_chunking(config: ml_collections.ConfigDict, workdir: Path) -> ml_collections.ConfigDict:
    """Resuming a concepts_per_chunk=-1 run: use the chunk size it chose (recorded in its
    config.json), not a new fit to this machine's memory, so the chunks stay the same."""
    saved = workdir / "config.json"
    if config.train.concepts_per_chunk != -1 or not saved.is_file():
        return config
    chosen = json.loads(saved.read_text()).get("train", {}).get("concepts_per_chunk", 0)
    config = config.copy_and_resolve_references()
    config.train.concepts_per_chunk = chosen if chosen > 0 else -1
    return config


def _saved_config(workdir: Path) -> Optional[dict]:
    """The config.json an erase wrote into `workdir` (None when there is none, or it is another
    program's config.json: an erase config has encoder, objective and train sections)."""
    try:
        saved = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and {"encoder", "objective", "train"} <= set(saved) else None


def check_workdir_kind(workdir: Path) -> None:
    """A workdir is absent, empty (hidden files aside), or a folder an erase wrote (its
    config.json); anything else, such as an encoder or pipeline folder, is refused untouched."""
    if not workdir.exists() or (workdir.is_dir() and _saved_config(workdir) is not None):
        return
    if not workdir.is_dir():
        raise OutputError(f"--workdir={workdir} is a file, not a folder; choose a new or empty folder for the run")
    entries = sorted(p.name for p in workdir.iterdir() if not p.name.startswith("."))
    if entries:
        raise OutputError(f"--workdir={workdir} exists and is not an erase workdir: it {_looks_like(workdir, entries)}; "
                          "choose a new or empty folder (an existing erase workdir resumes its run)")


def _looks_like(folder: Path, entries: list[str]) -> str:
    try:
        layout = describe_layout(folder)
    except WeightsError:
        listing = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        noun = "entry" if len(entries) == 1 else "entries"
        return f"holds {len(entries)} {noun} ({listing}) but no config.json written by erase"
    return {"pipeline": "looks like a diffusers pipeline folder (model_index.json)",
            "flax": f"looks like a Flax encoder checkpoint ({FLAX_PARAMS_NAME})",
            "transformers": "looks like a transformers model folder (its config.json describes a model, not an "
                            "erase run)"}[layout]


def _check_workdir(workdir: Path, resolved: dict) -> None:
    previous = _saved_config(workdir)
    if previous is not None:
        with contextlib.suppress(KeyError, AttributeError, TypeError, ValueError):  # (then compared as it is)
            previous = json.loads(config_lib.from_resolved(previous).to_json())  # fields added since: defaults
        ignore = {"log_every", "checkpoint_every", "checkpoints_to_keep", "memory_budget_gib"}
        strip = lambda d: {**{k: v for k, v in d.items() if k != "mesh"},
                           "train": {k: v for k, v in d["train"].items() if k not in ignore}}
        if strip(previous) != strip(resolved):
            raise config_lib.ConfigError(
                f"workdir {workdir} holds a run with a different config; resume needs the same config "
                "(the mesh may differ; use a new --workdir to start another run)")


def _check_finite(state, jobs: Jobs, lo: int, hi: int, ckpt: Checkpointer, workdir: Path) -> None:
    bad = sharding.to_host(state["bad_step"])[: hi - lo]
    if (bad >= 0).any():
        ckpt.close()
        j = int(np.argmax(bad >= 0))
        names = [c.name for c in jobs.concepts[lo + j]]
        latest = ckpt.latest_step()
        kept = (f"The last good checkpoint (global step {latest}) is kept in {workdir / 'checkpoints'}"
                if latest is not None else "No checkpoint had been saved yet")
        raise NonFiniteLossError(
            f"loss or gradient became NaN/inf at step {int(bad[j]) + 1} (concepts {names}); stopped. {kept}; "
            "lower train.learning_rate, set train.grad_clip_norm, or check objective.scale")


def _log(metrics_path: Path, pending: list, num_jobs: int, done: int, total: int, start: int, t_chunk: float,
         chunk: Optional[int], num_chunks: int) -> None:
    host = [(step, sharding.to_host(m)) for step, m in pending]
    label = {} if chunk is None else {"chunk": chunk}
    if sharding.is_writer():
        with open(metrics_path, "a") as f:
            for step, m in host:
                row = {k: float(np.mean(v[:num_jobs])) for k, v in m.items()}
                if num_jobs > 1:
                    row["loss_max"] = float(np.max(m["loss"][:num_jobs]))
                f.write(json.dumps({**label, "step": step, **row}) + "\n")
    per_step = (time.perf_counter() - t_chunk) / max(done - start, 1)
    loss = float(np.mean(host[-1][1]["loss"][:num_jobs]))
    where = "" if chunk is None else f"chunk {chunk + 1}/{num_chunks}  "
    remaining = total - done + (0 if chunk is None else (num_chunks - chunk - 1) * total)
    print(f"{where}step {done}/{total}  loss {loss:.5g}  {per_step * 1000:.0f} ms/step  "
          f"eta {per_step * remaining:.0f}s", file=sys.stderr)


def drop_torn_tail(metrics_path: Path) -> None:
    """Cut a torn last line (a process killed in the middle of writing it) off metrics.jsonl,
    so the rows appended next start on a line of their own."""
    if not metrics_path.is_file():
        return
    data = metrics_path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(metrics_path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        print(f"{metrics_path}: dropped a torn last line left by an interrupted run", file=sys.stderr)


def read_metrics(metrics_path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line that is not JSON (torn by an interrupted run, or two
    rows run together by an older version) is skipped with a note."""
    rows = []
    for number, line in enumerate(metrics_path.read_text().splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            print(f"{metrics_path}:{number}: skipped a line that is not JSON (torn by an interrupted run)",
                  file=sys.stderr)
    return rows


def _plot_loss(metrics_path: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    last = {(r.get("chunk", 0), r["step"]): r for r in rows}  # a resumed run may log a step twice: keep the last
    by_step = {}  # chunked runs: the mean over chunks
    for (_, step), r in last.items():
        by_step.setdefault(step, []).append(r)
    by_step = {s: {k: float(np.mean([r[k] for r in rs])) for k in ("misdirection", "preservation")}
               for s, rs in by_step.items()}
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(steps, [by_step[s]["misdirection"] for s in steps], label="misdirection")
    if any(by_step[s]["preservation"] for s in steps):
        ax.plot(steps, [by_step[s]["preservation"] for s in steps], label="preservation")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over jobs)")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
