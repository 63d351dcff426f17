"""HiRM objectives as pure functions: where to read the representation, what to push it to.

    rep = read_hook(outputs, "last_mlp_out")                  # [B, T, D]
    loss = misdirection_loss(rep, target, position_weights)   # 1/T sum_t ||h_t - target_t||^2

Targets (all [T, D] per prompt, position-aligned):
    hirm_r         c * r_t, r_t a fixed random unit vector per position (seeded)
    hirm_s         c * frozen(prompt with the concept replaced by its super-category)
    hirm_s_vector  c * (frozen(prompt) - v), v = mean_pairs frozen(with) - frozen(without)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hirm_jax.config_lib import SINGLE_POSITION_HOOKS, parse_hook
from hirm_jax.encoder.hooks import read_hook  # noqa: F401  (objectives.read_hook, as before)


def position_weights(input_ids: jax.Array, attention_mask: jax.Array, rule: str, hook: str,
                     has_bos: bool = True) -> jax.Array:
    """[B, T] float weights of the token positions the loss covers.

    all_but_bos: every position but 0 (BOS is identical for every prompt; moving it would
    change every image), including EOS and the padding SD 1.x's UNet attends to.
    An encoder without BOS (T5, has_bos=False) has nothing to skip: all_but_bos covers every
    position (its </s> and the padding Flux's transformer attends to), non_padding_but_bos
    every non-padding one (the prompt's tokens and its </s>).
    """
    if parse_hook(hook)[0] in SINGLE_POSITION_HOOKS:
        return jnp.ones((input_ids.shape[0], 1), jnp.float32)
    weights = jnp.ones(input_ids.shape, jnp.float32)
    if rule in ("all_but_bos", "non_padding_but_bos") and has_bos:
        weights = weights.at[:, 0].set(0.0)
    if rule == "non_padding_but_bos":
        weights = weights * attention_mask.astype(jnp.float32)
    return weights


def random_targets(key: jax.Array, length: int, dim: int, distribution: str) -> jax.Array:
    """[length, dim] random unit vectors, one per position (RMU draws uniform [0, 1) then normalises)."""
    if distribution == "uniform":
        vectors = jax.random.uniform(key, (length, dim), jnp.float32)
    else:
        vectors = jax.random.normal(key, (length, dim), jnp.float32)
    return vectors / jnp.linalg.norm(vectors, axis=-1, keepdims=True)


def misdirection_loss(rep: jax.Array, target: jax.Array, weights: jax.Array,
                      example_weights: jax.Array | None = None) -> jax.Array:
    """Mean over examples of (1/T) sum_t w_t ||rep_t - target_t||^2, in float32.

    example_weights (0/1 per example) let a padded batch keep a static shape.
    """
    sq = jnp.sum(jnp.square(rep.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    per_example = jnp.sum(sq * weights, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
    if example_weights is None:
        return jnp.mean(per_example)
    return jnp.sum(per_example * example_weights) / jnp.maximum(jnp.sum(example_weights), 1.0)
