"""The HiRM train step: optimizer, loss, and the vmapped, jitted step over independent jobs.

    optimizer = make_optimizer(config.train)
    loss_fn = make_loss_fn(encoder, ("mlp_out:-1",), use_attention_mask=False, preservation_weight=0.0)
    step = jax.jit(make_train_step(loss_fn, optimizer), donate_argnums=0)
    state, metrics = step(init_state(trainable, optimizer, num_jobs), frozen, per_job, shared, *batch_indices(...))

Only the trainable subtree is differentiated (`masking.split`); the frozen one is an argument.
Jobs (one delta per concept) are stacked on a leading axis and vmapped; a joint run is the
one-job case. Everything here is a pure function of its arguments: the loop (`erase.loop`)
and the set-up (`erase.setup`) place them on the mesh.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from hirm_jax.encoder.clip import TextEncoder
from hirm_jax.erase import adversarial, masking, objectives, sharding


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    adam = optax.adam(train_cfg.learning_rate, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps)
    if train_cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), adam)
    return adam


def make_loss_fn(encoder: TextEncoder, hooks, use_attention_mask: bool, preservation_weight: float,
                 batch_sharding: Optional[NamedSharding] = None,
                 spec: Optional[adversarial.Adversarial] = None) -> Callable:
    """loss(trainable, frozen, job_arrays, shared, indices, example_weights, attack_state) for ONE
    job; `attack_state` (robust HiRM's, for the batch's rows) is None without `spec`."""
    def rep_loss(params, ids, mask, targets, weights, example_weights=None, token_embeds=None):
        out = encoder.apply(params, ids, mask if use_attention_mask else None, token_embeds)
        return sum(objectives.misdirection_loss(objectives.read_hook(out, h), targets[h], weights[h], example_weights)
                   for h in hooks)

    def loss_fn(trainable, frozen, job_arrays, shared, indices, example_weights, attack_state=None):
        params = masking.merge(trainable, frozen)
        batch = gather(job_arrays, indices)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        misdirection = rep_loss(params, batch["input_ids"], batch["attention_mask"], batch["targets"],
                                batch["weights"], example_weights)
        terms = dict(misdirection=misdirection, preservation=jnp.zeros((), jnp.float32))
        if preservation_weight > 0:
            terms["preservation"] = rep_loss(params, shared["retain_ids"], shared["retain_mask"],
                                             shared["retain_targets"], shared["retain_weights"])
        total = misdirection + preservation_weight * terms["preservation"]
        if spec is not None:  # the adversarial prompts join the concept prompts, same targets
            ids, embeds = adversarial.adversarial_inputs(spec, params, batch, attack_state)
            terms["adversarial"] = rep_loss(params, ids, batch["attention_mask"], batch["targets"], batch["weights"],
                                            example_weights, embeds)
            total = total + spec.weight * terms["adversarial"]
        return total, terms
    return loss_fn


def gather(job_arrays: dict, indices) -> dict:
    """The batch's rows of one job's per-prompt arrays."""
    return jax.tree_util.tree_map(lambda x: x[indices], job_arrays)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    spmd_axis_name: Optional[str] = None, inner_attack: Optional[Callable] = None) -> Callable:
    """(state, frozen, per_job, shared, indices, example_weights) -> (state, metrics[J]).

    vmapped over the job axis; a non-finite loss or gradient leaves that job's state unchanged
    and records the step in state["bad_step"][job]. With `inner_attack` (robust HiRM,
    `make_inner_attack`) the job's attack state is updated first, against the trainable
    parameters of the moment."""
    def job_step(job, job_arrays, frozen, shared, indices, example_weights, step):
        """One job's update; `job` = its trainable leaves, Adam state, first bad step (and attack state)."""
        trainable, opt_state = job["trainable"], job["opt_state"]
        attack_state, new_job = None, {}
        if inner_attack is not None:
            attack_state = inner_attack(masking.merge(trainable, frozen), gather(job_arrays, indices),
                                        job["attack"][indices], step)
            new_job["attack"] = job["attack"].at[indices].set(attack_state)
        (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, job_arrays, shared, indices, example_weights, attack_state)
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
        bad_step = jnp.where(ok | (job["bad_step"] >= 0), job["bad_step"], step)
        metrics = dict(loss=total, **terms, grad_norm=grad_norm)
        new_job.update(trainable=keep(new_trainable, trainable), opt_state=keep(new_opt_state, opt_state),
                       bad_step=bad_step)
        return new_job, metrics

    batched = jax.vmap(job_step, in_axes=(0, 0, None, None, None, None, None), spmd_axis_name=spmd_axis_name)

    def one_job(jobs, per_job, *rest):
        """A job axis of size 1 (a joint run) without vmap: XLA's CPU dots with a batch dimension
        of 1 ran 25% slower than plain ones (bench/bench_t5.py --step). Same values."""
        squeeze = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
        new_job, metrics = job_step(squeeze(jobs), squeeze(per_job), *rest)
        return jax.tree_util.tree_map(lambda x: x[None], (new_job, metrics))

    def train_step(state, frozen, per_job, shared, indices, example_weights):
        jobs = {k: v for k, v in state.items() if k != "step"}
        run = one_job if state["bad_step"].shape[0] == 1 else batched
        jobs, metrics = run(jobs, per_job, frozen, shared, indices, example_weights, state["step"])
        return dict(step=state["step"] + 1, **jobs), metrics
    return train_step


def make_inner_attack(encoder: TextEncoder, spec: adversarial.Adversarial, seed: int) -> Callable:
    """(params, batch, attack state rows, step) -> attack state rows: the inner attack every
    `spec.every` steps (the state is kept in between)."""
    def inner(params, batch, rows, step):
        keys = adversarial.step_keys(seed, batch, step)
        return jax.lax.cond(step % spec.every == 0,
                            lambda r: adversarial.attack(encoder.apply, spec, params, batch, r, keys), lambda r: r, rows)
    return inner


def init_state(trainable: dict, optimizer, num_jobs: int = 1, attack: Optional[jax.Array] = None) -> dict:
    """Every job starts from the base weights; leaves get a leading [num_jobs] axis. `attack`:
    one job's initial robust-HiRM attack state (adversarial.initial_state), or None."""
    stack = lambda tree: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_jobs, *x.shape)), tree)
    stacked = stack(trainable)
    state = dict(step=jnp.zeros((), jnp.int32), trainable=stacked, opt_state=jax.vmap(optimizer.init)(stacked),
                 bad_step=jnp.full((num_jobs,), -1, jnp.int32))
    if attack is not None:
        state["attack"] = stack(attack)
    return state


def state_shardings(state: dict, mesh) -> dict:
    per_job_leaves = lambda tree: jax.tree_util.tree_map(lambda x: sharding.job_state(mesh, x.shape), tree)
    return dict(step=sharding.replicated(mesh), bad_step=sharding.per_job(mesh),
                **{k: per_job_leaves(state[k]) for k in state if k not in ("step", "bad_step")})


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
