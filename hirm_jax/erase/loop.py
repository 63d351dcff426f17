"""HiRM erasure: train the early block(s) so the concepts' high-level representation is misdirected.

    from hirm_jax.erase.loop import train
    result = train(config, workdir)            # TrainResult; result["status"] == "done"
    loaded = result.erased_run(0)              # in memory: base + erased params + RunRecord

The loop: plan (`erase.setup`: load the base, build the jobs, place them, jit the step), then
run the one jitted, donated step chunk by chunk. The state (trainable leaves, Adam state,
step) is checkpointed with orbax every `train.checkpoint_every` steps; calling again on the
same workdir resumes (also on another mesh) and ends bit-identical to an uninterrupted run.
What the workdir holds, and its rules, are `erase.workdir`'s. On a multi-process run process
0 writes everything.

The results go to the caller in memory (TrainResult: the plan with its base encoder,
tokenizer and targets, each job's RunRecord, and with `keep_trained=True` the trained leaves),
so the report and the export need not read back what was just written; `on_job` sees each
job's trained leaves as its chunk ends (the text report uses it, so a run of hundreds of
concepts never holds them all). The disk is for resuming and for users.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import ml_collections
import numpy as np

import hirm_jax
from hirm_jax import log, provenance
from hirm_jax.erase import sharding
from hirm_jax.erase.checkpoint import Checkpointer
from hirm_jax.erase.setup import ErasePlan, abstract_step_args, plan_erase
from hirm_jax.erase.workdir import ErasedRun, IndexRecord, RunRecord, Workdir, erased_run
from hirm_jax.errors import HirmError
from hirm_jax.fileio import folder_lock

_log = log.get(__name__)


class NonFiniteLossError(HirmError, RuntimeError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class JobResult:
    """One finished job (a joint run's one, or one concept of a joint=False run)."""
    index: int
    concepts: list  # prompts.Concept
    prompt_pairs: list  # prompts.PromptPair, as trained
    record: RunRecord  # what its run.json says
    folder: Path
    trained: Optional[dict] = None  # {Flax path: float32 host array}; kept with keep_trained / in on_job


class SummaryMapping(Mapping):
    """A result that reads, as a mapping, as its `summary` dict (the 0.1 return value)."""

    def __getitem__(self, key):
        return self.summary[key]

    def __iter__(self) -> Iterator:
        return iter(self.summary)

    def __len__(self) -> int:
        return len(self.summary)


@dataclasses.dataclass(frozen=True)
class TrainResult(SummaryMapping):
    """What `train` hands back. As a mapping it is the 0.1 return value (the summary: run.json
    for a joint run, index.json plus every job's run.json otherwise, and `status`)."""
    status: str  # "done" or "interrupted"
    workdir: Path
    summary: dict
    plan: ErasePlan
    jobs: list  # JobResult per finished job (this call's chunks)

    def erased_run(self, job: int = 0) -> ErasedRun:
        """Job `job` as an ErasedRun, in memory (needs keep_trained=True)."""
        result = self.jobs[job]
        if result.trained is None:
            raise ValueError("the trained leaves were not kept: call train(..., keep_trained=True)")
        return erased_run(self.plan.encoder, result.trained, result.record, result.folder)


@dataclasses.dataclass
class _Session:
    """One call's moving parts, under the workdir's lock."""
    wd: Workdir
    plan: ErasePlan
    ckpt: Checkpointer
    compiled: Any
    resolved: dict
    on_job: Optional[Callable[[ErasePlan, JobResult], None]]
    keep_trained: bool
    timings: dict = dataclasses.field(default_factory=lambda: dict(train=0.0, checkpoint=0.0))
    finished: list = dataclasses.field(default_factory=list)


def train(config: ml_collections.ConfigDict, workdir: str | Path, stop_after: Optional[int] = None, mesh=None,
          keep_trained: bool = False, on_job: Optional[Callable[[ErasePlan, JobResult], None]] = None) -> TrainResult:
    """Erase the config's concepts into `workdir` (module docstring).

    `stop_after` ends the run after that many steps (with a checkpoint), as an interruption would.
    Checkpoints are numbered by global step, chunk * total_steps + step, so a resumed run knows
    its chunk; a chunk's results are written when it ends, before the next chunk starts.
    The workdir is checked and the config and base loaded before it is touched; from then on the
    writing process holds its lock (fileio.folder_lock) to the end."""
    t0 = time.perf_counter()
    wd = Workdir(workdir)
    wd.check_kind()
    plan = plan_erase(wd.keep_saved_chunking(config), mesh)
    with folder_lock(wd.path, "workdir") if sharding.is_writer() else contextlib.nullcontext():
        resolved = _start_workdir(wd, plan)
        t_load = time.perf_counter()
        compiled = plan.step_fn.lower(*abstract_step_args(plan, plan.num_padded)).compile()
        session = _Session(wd, plan, Checkpointer(wd.checkpoints_dir, keep=plan.config.train.checkpoints_to_keep),
                           compiled, resolved, on_job, keep_trained)
        session.timings.update(load=t_load - t0, compile=time.perf_counter() - t_load)
        status = _train_chunks(session, math.inf if stop_after is None else stop_after)
        summary = _finish(session) if status["status"] == "done" else status
        sharding.barrier("hirm_jax run done")  # no process leaves before the files are written
    return TrainResult(status["status"], wd.path, summary, plan, session.finished)


def _start_workdir(wd: Workdir, plan: ErasePlan) -> dict:
    resolved = json.loads(plan.config.to_json())
    wd.check_same_config(resolved)
    wd.path.mkdir(parents=True, exist_ok=True)  # (the writer's lock made it; other processes may not see it yet)
    if sharding.is_writer():
        wd.write_config(resolved)
        wd.drop_torn_metrics_tail()
    return resolved


def _train_chunks(s: _Session, budget: float) -> dict:
    """Train the chunks not finished yet; {"status": "done"} or where an interruption stopped."""
    plan, steps = s.plan, s.plan.total_steps
    latest = s.ckpt.latest_step()
    first_chunk = 0 if latest is None else (latest - 1) // steps
    try:
        for c in range(first_chunk, len(plan.chunks)):
            state = plan.new_state()
            if c == first_chunk and latest is not None:
                state = s.ckpt.restore_jobs(state, plan.chunks[c][1] - plan.chunks[c][0], step=latest)
                _log.info(f"resuming {s.wd.path} from step {int(state['step'])} of {steps}"
                          + (f" in chunk {c + 1} of {len(plan.chunks)}" if len(plan.chunks) > 1 else ""))
            state, metrics, budget = _train_chunk(s, c, state, budget)
            if int(state["step"]) < steps:
                return dict(status="interrupted", step=int(state["step"]), total_steps=steps, chunk=c,
                            chunks=len(plan.chunks))
            lo, hi = plan.chunks[c]
            written = all((_job_folder(s, j) / "run.json").is_file() for j in range(lo, hi))
            if metrics is not None or not written:  # (resumed at a chunk's end: its results may be written)
                final_losses = None if metrics is None else sharding.to_host(metrics["loss"])[: hi - lo]
                _write_chunk_results(s, state, c, final_losses)
                sharding.barrier(f"hirm_jax results of chunk {c}")
            state = metrics = None  # free this chunk's state before the next one is made
    finally:
        t_save = time.perf_counter()
        s.ckpt.close()
        s.timings["checkpoint"] += time.perf_counter() - t_save
    return dict(status="done")


def _train_chunk(s: _Session, c: int, state: dict, budget: float) -> tuple[dict, Any, float]:
    """Steps of chunk `c` from the state's step, at most `budget` of them; checkpoints and logs."""
    plan, steps, train_cfg = s.plan, s.plan.total_steps, s.plan.config.train
    lo, hi = plan.chunks[c]
    per_job = plan.place_jobs(lo, hi)
    start = int(state["step"])
    stop = int(min(steps, start + budget))
    pending, t_chunk, metrics = [], time.perf_counter(), None
    for step in range(start, stop):
        state, metrics = s.compiled(state, *plan.step_args(per_job, step))
        pending.append((step + 1, metrics))
        done = step + 1
        at_checkpoint = done % train_cfg.checkpoint_every == 0 or done == stop
        if done % train_cfg.log_every == 0 or at_checkpoint:
            _check_finite(s, state, c)
            _log_steps(s, pending, c, start, t_chunk)
            pending = []
        if at_checkpoint:
            t_save = time.perf_counter()
            s.ckpt.save(c * steps + done, state, force=True)
            s.timings["checkpoint"] += time.perf_counter() - t_save
    s.timings["train"] += time.perf_counter() - t_chunk
    return state, metrics, budget - (stop - start)


def _check_finite(s: _Session, state: dict, c: int) -> None:
    lo, hi = s.plan.chunks[c]
    bad = sharding.to_host(state["bad_step"])[: hi - lo]
    if (bad >= 0).any():
        s.ckpt.close()
        j = int(np.argmax(bad >= 0))
        names = [concept.name for concept in s.plan.jobs.concepts[lo + j]]
        latest = s.ckpt.latest_step()
        kept = (f"The last good checkpoint (global step {latest}) is kept in {s.wd.checkpoints_dir}"
                if latest is not None else "No checkpoint had been saved yet")
        raise NonFiniteLossError(
            f"loss or gradient became NaN/inf at step {int(bad[j]) + 1} (concepts {names}); stopped. {kept}; "
            "lower train.learning_rate, set train.grad_clip_norm, or check objective.scale")


def _log_steps(s: _Session, pending: list, c: int, start: int, t_chunk: float) -> None:
    """metrics.jsonl rows for the pending steps (means over the chunk's jobs) and one progress line."""
    lo, hi = s.plan.chunks[c]
    num_jobs, total, num_chunks = hi - lo, s.plan.total_steps, len(s.plan.chunks)
    host = [(step, sharding.to_host(m)) for step, m in pending]
    label = {} if num_chunks == 1 else {"chunk": c}
    if sharding.is_writer():
        rows = []
        for step, m in host:
            row = {k: float(np.mean(v[:num_jobs])) for k, v in m.items()}
            if num_jobs > 1:
                row["loss_max"] = float(np.max(m["loss"][:num_jobs]))
            rows.append({**label, "step": step, **row})
        s.wd.append_metrics(rows)
    done = host[-1][0]
    per_step = (time.perf_counter() - t_chunk) / max(done - start, 1)
    loss = float(np.mean(host[-1][1]["loss"][:num_jobs]))
    where = "" if num_chunks == 1 else f"chunk {c + 1}/{num_chunks}  "
    remaining = total - done + (num_chunks - c - 1) * total
    _log.info(f"{where}step {done}/{total}  loss {loss:.5g}  {per_step * 1000:.0f} ms/step  "
              f"eta {per_step * remaining:.0f}s")


# ----------------------------------------------------------------------------- results

def _job_folder(s: _Session, job: int) -> Path:
    return s.wd.path if s.plan.config.joint else s.wd.concept_folder(s.plan.jobs.concepts[job][0].name)


def _record(s: _Session, job: int, trained_paths: list, final_loss: Optional[float]) -> RunRecord:
    plan, resolved = s.plan, s.resolved
    concepts = plan.jobs.concepts[job]
    return RunRecord(
        base=plan.loaded.base, concepts=[c.name for c in concepts],
        anchors={c.name: c.anchor for c in concepts if c.anchor},
        prompts=[dataclasses.asdict(p) for p in plan.jobs.prompt_pairs[job]], trainable_paths=sorted(trained_paths),
        final_loss=final_loss, component_name=plan.config.encoder.component or "text_encoder",
        encoder_config=dataclasses.asdict(plan.encoder.config), concept_type=plan.config.concept_type,
        objective=resolved["objective"], preservation=resolved["preservation"], train=resolved["train"],
        seed=plan.config.train.seed, steps=plan.total_steps, **provenance.provenance())


def _write_chunk_results(s: _Session, state: dict, c: int, final_losses) -> None:
    """Jobs of a finished chunk: erased_trainable.safetensors and run.json each; handed on."""
    lo, hi = s.plan.chunks[c]
    trainable = sharding.to_host(state["trainable"])
    for j in range(lo, hi):
        trained = {p: np.asarray(v[j - lo], np.float32) for p, v in trainable.items()}
        record = _record(s, j, list(trained), None if final_losses is None else float(final_losses[j - lo]))
        folder = _job_folder(s, j)
        if sharding.is_writer():
            folder.mkdir(parents=True, exist_ok=True)
            Workdir(folder).write_trained(trained, producer=f"hirm_jax {hirm_jax.__version__}")
            Workdir(folder).write_run(record)
        result = JobResult(j, s.plan.jobs.concepts[j], s.plan.jobs.prompt_pairs[j], record, folder, trained)
        if s.on_job is not None and sharding.is_writer():
            s.on_job(s.plan, result)
        s.finished.append(result if s.keep_trained else dataclasses.replace(result, trained=None))


def _finish(s: _Session) -> dict:
    """Add the timings to run.json (joint) or write index.json (one delta per concept)."""
    plan, t = s.plan, s.timings
    timings = dict(load=t["load"], compile=t["compile"], train=t["train"] - t["checkpoint"], checkpoint=t["checkpoint"])
    folders = [_job_folder(s, j) for j in range(plan.jobs.num_jobs)]
    if plan.config.joint:
        record = dataclasses.replace(Workdir(folders[0]).read_run() if not s.finished else s.finished[0].record,
                                     timings_s=timings)
        if sharding.is_writer():
            s.wd.write_run(record)
        if s.finished:
            s.finished[0] = dataclasses.replace(s.finished[0], record=record)
        summary = record.to_json()
    else:
        index = IndexRecord(concepts={jobs[0].name: str(folder.relative_to(s.wd.path))
                                      for jobs, folder in zip(plan.jobs.concepts, folders)},
                            base=plan.loaded.base, objective=s.resolved["objective"], steps=plan.total_steps,
                            chunks=[list(chunk) for chunk in plan.chunks], timings_s=timings)
        if sharding.is_writer():
            s.wd.write_index(index)
        records = {r.index: r.record for r in s.finished}
        summary = dict(index.to_json(), jobs=[(records[j] if j in records else Workdir(f).read_run()).to_json()
                                             for j, f in enumerate(folders)])
    chunks = f" ({len(plan.chunks)} chunks)" if len(plan.chunks) > 1 else ""
    _log.info(f"erased {sum(len(c) for c in plan.jobs.concepts)} concept(s) in {plan.jobs.num_jobs} job(s){chunks}, "
              f"{plan.total_steps} steps: load {timings['load']:.1f}s compile {timings['compile']:.1f}s "
              f"train {timings['train']:.1f}s -> {s.wd.path}")
    return dict(status="done", **summary)
