"""HiRM erasure: train the early block(s) so the concept's high-level representation is misdirected.

    from hirm_jax.train import train_and_evaluate
    summary = train_and_evaluate(config, workdir)

The loop: load the base encoder, build prompts, compute the frozen targets ONCE, then run
one jitted, donated step in which only the trainable subtree is differentiated. The state
(trainable leaves, Adam state, step) is checkpointed with orbax every
`train.checkpoint_every` steps; calling again on the same workdir resumes, and ends with
bit-identical parameters to an uninterrupted run.

A finished workdir holds (the contract `hirm_jax.export` reads):
    config.json                     the resolved config
    run.json                        base, concepts, anchors, objective, hyper-parameters, provenance
    erased_trainable.safetensors    the trained leaves, keyed by Flax path
    metrics.jsonl, loss.png         the loss curve
    checkpoints/                    orbax training state
"""

from __future__ import annotations

import dataclasses
import json
import math
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
from safetensors.numpy import save as safetensors_save

import hirm_jax
from hirm_jax import config_lib, masking, objectives, prompts, provenance
from hirm_jax.checkpoint import Checkpointer
from hirm_jax.fileio import atomic_file, write_json
from hirm_jax.layouts import load_text_encoder
from hirm_jax.model import TextEncoder
from hirm_jax.tokenizer import encode_prompts


def _tokenize(tokenizer, texts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    batch = encode_prompts(tokenizer, texts, max_length=max_length)
    return batch["input_ids"], batch["attention_mask"]


ENCODE_CHUNK = 64


class NonFiniteLossError(RuntimeError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- frozen passes

def make_encode_fn(encoder: TextEncoder, hooks, use_attention_mask: bool) -> Callable:
    """jitted (params, ids, mask) -> {hook: [B, T', D]}."""
    def encode(params, ids, mask):
        out = encoder.apply(params, ids, mask if use_attention_mask else None)
        return {h: objectives.read_hook(out, h) for h in hooks}
    return jax.jit(encode)


def encode_in_chunks(encode_fn, params, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Encode any number of prompts with one compiled shape (the last chunk is padded)."""
    results: dict[str, list] = {}
    for start in range(0, len(ids), ENCODE_CHUNK):
        chunk_ids, chunk_mask = ids[start:start + ENCODE_CHUNK], mask[start:start + ENCODE_CHUNK]
        n = len(chunk_ids)
        pad = ENCODE_CHUNK - n if len(ids) > ENCODE_CHUNK else 0
        if pad:
            chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[-1:], pad, 0)])
            chunk_mask = np.concatenate([chunk_mask, np.repeat(chunk_mask[-1:], pad, 0)])
        for hook, value in encode_fn(params, chunk_ids, chunk_mask).items():
            results.setdefault(hook, []).append(np.asarray(value)[:n])
    return {h: np.concatenate(v) for h, v in results.items()}


def concept_key(seed: int, concept: str) -> jax.Array:
    """A PRNG key per concept that depends on its name only, so a concept's random targets are
    the same whether it is erased alone or among many."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(concept.encode("utf-8")) & 0x7FFFFFFF)


@dataclasses.dataclass
class Problem:
    """Everything a step needs besides the state: device arrays, fixed for the run."""
    arrays: dict  # input_ids, attention_mask, targets{hook}, weights{hook}, retain_* (optional)
    num_prompts: int
    prompt_pairs: list


def build_problem(config, encoder: TextEncoder, tokenizer, concepts, encode_fn) -> Problem:
    obj = config.objective
    hooks = tuple(obj.hooks)
    pairs = prompts.build_prompt_pairs(concepts, config.templates)
    ids, mask = _tokenize(tokenizer, [p.prompt for p in pairs], encoder.config.max_position_embeddings)
    frozen_reps = encode_in_chunks(encode_fn, encoder.params, ids, mask)

    if obj.name == "hirm_r":
        targets = {}
        for hook in hooks:
            length, dim = frozen_reps[hook].shape[1:]
            by_concept = {c.name: np.asarray(objectives.random_targets(
                concept_key(config.train.seed, f"{c.name}|{hook}"), length, dim, obj.random_distribution))
                for c in concepts}
            targets[hook] = np.stack([by_concept[p.concept] for p in pairs]) * obj.scale
    elif obj.name == "hirm_s":
        anchor_ids, anchor_mask = _tokenize(tokenizer, [p.anchor_prompt for p in pairs],
                                                 encoder.config.max_position_embeddings)
        anchor_reps = encode_in_chunks(encode_fn, encoder.params, anchor_ids, anchor_mask)
        targets = {h: anchor_reps[h] * obj.scale for h in hooks}
    else:  # hirm_s_vector: Ring-A-Bell-style empirical concept vector, per position
        rows = [line.split("\t") for line in prompts.read_lines(obj.vector_pairs_file, "objective.vector_pairs_file")]
        rows = [r for r in rows if r != ["with_concept", "without_concept"]]
        bad = [i for i, r in enumerate(rows, 1) if len(r) != 2]
        if bad:
            raise config_lib.ConfigError(f"{obj.vector_pairs_file}: rows {bad[:5]} do not have 2 tab-separated columns")
        with_ids, with_mask = _tokenize(tokenizer, [r[0] for r in rows], encoder.config.max_position_embeddings)
        without_ids, without_mask = _tokenize(tokenizer, [r[1] for r in rows], encoder.config.max_position_embeddings)
        with_reps = encode_in_chunks(encode_fn, encoder.params, with_ids, with_mask)
        without_reps = encode_in_chunks(encode_fn, encoder.params, without_ids, without_mask)
        targets = {h: (frozen_reps[h] - (with_reps[h] - without_reps[h]).mean(0)) * obj.scale for h in hooks}

    arrays = dict(
        input_ids=ids, attention_mask=mask,
        targets={h: targets[h].astype(np.float32) for h in hooks},
        weights={h: np.asarray(objectives.position_weights(ids, mask, obj.token_positions, h)) for h in hooks},
    )
    if config.preservation.weight > 0:
        from hirm_jax.resources import data_path  # noqa: PLC0415
        retain = prompts.read_lines(config.preservation.prompts_file or data_path("ordinary_prompts.txt"),
                                    "preservation.prompts_file")[: config.preservation.batch_size]
        r_ids, r_mask = _tokenize(tokenizer, retain, encoder.config.max_position_embeddings)
        arrays.update(retain_ids=r_ids, retain_mask=r_mask,
                      retain_targets=encode_in_chunks(encode_fn, encoder.params, r_ids, r_mask),
                      retain_weights={h: np.asarray(objectives.position_weights(r_ids, r_mask, obj.token_positions, h))
                                      for h in hooks})
    return Problem(jax.tree_util.tree_map(jnp.asarray, arrays), len(pairs), pairs)


# ----------------------------------------------------------------------------- the step

def make_optimizer(train_cfg) -> optax.GradientTransformation:
    adam = optax.adam(train_cfg.learning_rate, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps)
    if train_cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), adam)
    return adam


def make_loss_fn(encoder: TextEncoder, hooks, use_attention_mask: bool, preservation_weight: float) -> Callable:
    def rep_loss(params, ids, mask, targets, weights, example_weights=None):
        out = encoder.apply(params, ids, mask if use_attention_mask else None)
        return sum(objectives.misdirection_loss(objectives.read_hook(out, h), targets[h], weights[h], example_weights)
                   for h in hooks)

    def loss_fn(trainable, frozen, arrays, indices, example_weights):
        params = masking.merge(trainable, frozen)
        take = lambda x: x[indices]
        misdirection = rep_loss(params, take(arrays["input_ids"]), take(arrays["attention_mask"]),
                                jax.tree_util.tree_map(take, arrays["targets"]),
                                jax.tree_util.tree_map(take, arrays["weights"]), example_weights)
        preservation = jnp.zeros((), jnp.float32)
        if preservation_weight > 0:
            preservation = rep_loss(params, arrays["retain_ids"], arrays["retain_mask"],
                                    arrays["retain_targets"], arrays["retain_weights"])
        return misdirection + preservation_weight * preservation, (misdirection, preservation)
    return loss_fn


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """(state, frozen, arrays, indices, example_weights) -> (state, metrics); a non-finite
    loss or gradient leaves the state unchanged and records the step in state["bad_step"]."""
    def train_step(state, frozen, arrays, indices, example_weights):
        (total, (misdirection, preservation)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["trainable"], frozen, arrays, indices, example_weights)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = dict(
            step=state["step"] + 1,
            trainable=keep(trainable, state["trainable"]),
            opt_state=keep(opt_state, state["opt_state"]),
            bad_step=jnp.where(ok | (state["bad_step"] >= 0), state["bad_step"], state["step"]),
        )
        return new_state, dict(loss=total, misdirection=misdirection, preservation=preservation, grad_norm=grad_norm)
    return train_step


def init_state(trainable: dict, optimizer) -> dict:
    return dict(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable),
                bad_step=jnp.full((), -1, jnp.int32))


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


# ----------------------------------------------------------------------------- the run

def _check_workdir(workdir: Path, resolved: dict) -> None:
    saved = workdir / "config.json"
    if saved.is_file():
        previous = json.loads(saved.read_text())
        ignore = {"log_every", "checkpoint_every"}
        strip = lambda d: {**d, "train": {k: v for k, v in d["train"].items() if k not in ignore}}
        if strip(previous) != strip(resolved):
            raise config_lib.ConfigError(
                f"workdir {workdir} holds a run with a different config; resume needs the same config "
                "(use a new --workdir to start another run)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       stop_after: Optional[int] = None) -> dict[str, Any]:
    """Erase the config's concepts; returns the summary also written to run.json.

    `stop_after` ends the run after that many steps (with a checkpoint), as an interruption would.
    """
    t0 = time.perf_counter()
    config_lib.validate(config)
    config = config_lib.resolve_defaults(config)
    concepts = prompts.concepts_from_config(config)
    workdir = Path(workdir)
    resolved = json.loads(config.to_json())
    _check_workdir(workdir, resolved)

    encoder = load_text_encoder(config.encoder.path, config.encoder.component or None)
    encoder = TextEncoder(encoder.config.replace(dtype=config.encoder.dtype), encoder.params)
    tokenizer = prompts.load_tokenizer(config.encoder.path, config.encoder.component or None, config.encoder.tokenizer or None)
    hooks = tuple(config.objective.hooks)
    encode_fn = make_encode_fn(encoder, hooks, config.encoder.use_attention_mask)
    problem = build_problem(config, encoder, tokenizer, concepts, encode_fn)
    t_load = time.perf_counter()

    paths = masking.trainable_paths(encoder.params, config.train.trainable_blocks,
                                    config.train.trainable_modules, config.train.trainable_regex)
    trainable, frozen = masking.split(jax.tree_util.tree_map(jnp.asarray, encoder.params), paths)
    optimizer = make_optimizer(config.train)
    loss_fn = make_loss_fn(encoder, hooks, config.encoder.use_attention_mask, config.preservation.weight)
    step_fn = jax.jit(make_train_step(loss_fn, optimizer), donate_argnums=0)

    batch_size = config.train.batch_size or problem.num_prompts
    total_steps = config.train.epochs * math.ceil(problem.num_prompts / batch_size)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "config.json", resolved)
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.checkpoints_to_keep)
    state = init_state(trainable, optimizer)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        print(f"resuming {workdir} from step {int(state['step'])} of {total_steps}", file=sys.stderr)

    # Compile ahead so the log separates compile time from step time.
    idx0, w0 = batch_indices(0, problem.num_prompts, batch_size, config.train.seed)
    compiled = step_fn.lower(state, frozen, problem.arrays, idx0, w0).compile()
    t_compile = time.perf_counter()

    metrics_path = workdir / "metrics.jsonl"
    start_step = int(state["step"])
    last_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    pending, t_train = [], time.perf_counter()
    try:
        for step in range(start_step, last_step):
            indices, example_weights = batch_indices(step, problem.num_prompts, batch_size, config.train.seed)
            state, metrics = compiled(state, frozen, problem.arrays, indices, example_weights)
            pending.append((step + 1, metrics))
            done = step + 1
            if done % config.train.log_every == 0 or done == last_step or done % config.train.checkpoint_every == 0:
                _check_finite(state, ckpt, workdir)
                _log(metrics_path, pending, done, total_steps, start_step, t_train)
                pending = []
            if done % config.train.checkpoint_every == 0 or done == last_step:
                ckpt.save(done, state, force=True)
    finally:
        ckpt.close()
    t_end = time.perf_counter()

    if int(state["step"]) < total_steps:
        return dict(status="interrupted", step=int(state["step"]), total_steps=total_steps)

    final_loss = _last_loss(metrics_path)
    trained = {p: np.asarray(v, np.float32) for p, v in state["trainable"].items()}
    with atomic_file(workdir / "erased_trainable.safetensors", "wb") as f:
        f.write(_safetensors_bytes(trained))
    run = dict(
        base=dict(source=str(config.encoder.path), component=config.encoder.component or None),
        component_name=config.encoder.component or "text_encoder",
        encoder_config=dataclasses.asdict(encoder.config),
        concepts=[c.name for c in concepts],
        anchors={c.name: c.anchor for c in concepts if c.anchor},
        concept_type=config.concept_type,
        prompts=[dataclasses.asdict(p) for p in problem.prompt_pairs],
        objective=resolved["objective"], preservation=resolved["preservation"], train=resolved["train"],
        method="hirm", seed=config.train.seed, steps=total_steps, final_loss=final_loss,
        trainable_paths=sorted(trained),
        timings_s=dict(load=t_load - t0, compile=t_compile - t_load, train=t_end - t_train),
        **provenance.provenance(),
    )
    write_json(workdir / "run.json", run)
    _plot_loss(metrics_path, workdir / "loss.png")
    print(f"erased {run['concepts']} in {total_steps} steps: loss {final_loss:.4g}; "
          f"load {t_load - t0:.1f}s compile {t_compile - t_load:.1f}s train {t_end - t_train:.1f}s -> {workdir}",
          file=sys.stderr)
    if config.report.enabled:
        from hirm_jax import textreport  # noqa: PLC0415  (keeps the training path import-light)
        textreport.report_for_run(workdir)
    return dict(status="done", **run)


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    return safetensors_save(tensors, metadata={"format": "flax", "producer": f"hirm_jax {hirm_jax.__version__}"})


def _check_finite(state, ckpt: Checkpointer, workdir: Path) -> None:
    bad = int(state["bad_step"])
    if bad >= 0:
        ckpt.close()
        good = ckpt.latest_step()
        raise NonFiniteLossError(
            f"loss or gradient became NaN/inf at step {bad + 1}; stopped. The last good checkpoint "
            f"(step {good}) is kept in {workdir / 'checkpoints'}; lower train.learning_rate, set "
            "train.grad_clip_norm, or check the targets (objective.scale)")


def _log(metrics_path: Path, pending: list, done: int, total: int, start: int, t_train: float) -> None:
    host = jax.device_get(pending)
    with open(metrics_path, "a") as f:
        for step, m in host:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in m.items()}}) + "\n")
    elapsed = time.perf_counter() - t_train
    per_step = elapsed / max(done - start, 1)
    loss = float(host[-1][1]["loss"])
    print(f"step {done}/{total}  loss {loss:.5g}  {per_step * 1000:.0f} ms/step  "
          f"eta {per_step * (total - done):.0f}s", file=sys.stderr)


def _last_loss(metrics_path: Path) -> float:
    lines = metrics_path.read_text().splitlines()
    return json.loads(lines[-1])["loss"] if lines else float("nan")


def _plot_loss(metrics_path: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    # A resumed run may have logged a step twice; keep the last record of each step.
    by_step = {r["step"]: r for r in rows}
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(steps, [by_step[s]["misdirection"] for s in steps], label="misdirection")
    if any(by_step[s]["preservation"] for s in steps):
        ax.plot(steps, [by_step[s]["preservation"] for s in steps], label="preservation")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
