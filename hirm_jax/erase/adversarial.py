"""Robust HiRM (`objective.adversarial.enabled`): a min-max loop that keeps HiRM's locality.

Every `every` outer steps an inner attack, run against the trainable block(s) of that moment,
searches for inputs that make the erasing encoder produce what the ORIGINAL encoder produced for
each concept prompt (at `adversarial.hook`, the representation the pipeline consumes). It edits
the concept's own token positions, so the adversarial prompt stays aligned with the concept
prompt and joins it with the SAME misdirection target:

    loss = misdirection(concept prompts) + weight * misdirection(adversarial prompts) [+ preservation]

Attacks (hirm_jax.attack.search, the functions `hirm-jax attack` runs):
- `continuous`: the concept's token embeddings are replaced by free vectors, moved by `steps`
  Adam steps (a soft prompt: the strongest text-side attack, AdvUnlearn's inner loop);
- `gcg`: the concept's tokens are replaced by other tokens (never the concept's own, any
  case, nor special tokens), `steps` greedy coordinate steps of `candidates` swaps each.
The attack's state is kept across outer steps (warm start) in the train state, so a resumed run
is bit-identical; only the configured early blocks train, the rest stays bit-identical.

    slots, mask = concept_slots(tokenizer, prompt_pairs, input_ids)     # [N, S] each
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hirm_jax.attack.search import (AttackSettings, continuous_steps, embeds_with, gcg_step, ids_with,
                                    loss_of_tokens, random_allowed)
from hirm_jax.config_lib import ConfigError


@dataclasses.dataclass(frozen=True)
class Adversarial:
    """The inner attack of robust HiRM, from config.objective.adversarial (hashable: static under jit)."""
    attack: str
    every: int
    steps: int
    weight: float
    settings: AttackSettings  # hook, learning rate, top_k, candidates

    @classmethod
    def from_config(cls, adversarial) -> "Adversarial | None":
        if not adversarial.enabled:
            return None
        settings = AttackSettings(kind=adversarial.attack, steps=adversarial.steps, top_k=adversarial.top_k,
                                  candidates=adversarial.candidates, learning_rate=adversarial.learning_rate,
                                  hook=adversarial.hook, restarts=1)
        return cls(adversarial.attack, adversarial.every, adversarial.steps, adversarial.weight, settings)

    @property
    def tokens(self) -> bool:
        return self.attack == "gcg"


def concept_slots(tokenizer, pairs, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([N, S] positions of each prompt's concept tokens, [N, S] 1/0 mask), S the most tokens a
    concept takes; padding slots point at position 0 with mask 0."""
    found = []
    for pair, ids in zip(pairs, np.asarray(input_ids)):
        name = tokenizer(pair.concept, add_special_tokens=False)["input_ids"]
        starts = [i for i in range(len(ids) - len(name) + 1) if list(ids[i:i + len(name)]) == list(name)]
        if not name or not starts:
            raise ConfigError(f"objective.adversarial: the tokens of concept {pair.concept!r} are not found in the "
                              f"prompt {pair.prompt!r} (a template must keep the concept a separate word, e.g. "
                              f"'a painting by {{}}', not '{{}}s')")
        found.append(range(starts[0], starts[0] + len(name)))
    width = max(len(r) for r in found)
    slots = np.zeros((len(found), width), np.int32)
    mask = np.zeros((len(found), width), np.float32)
    for row, positions in enumerate(found):
        slots[row, :len(positions)] = list(positions)
        mask[row, :len(positions)] = 1.0
    return slots, mask


def initial_state(spec: Adversarial, prompts_per_job: int, num_slots: int, dim: int) -> jax.Array:
    """One job's attack state: continuous, the slot embeddings' offsets from the concept's own
    (zeros: the attack starts at the concept); gcg, the slot tokens (-1: drawn at the first attack)."""
    if spec.tokens:
        return jnp.full((prompts_per_job, num_slots), -1, jnp.int32)
    return jnp.zeros((prompts_per_job, num_slots, dim), jnp.float32)


def _prompts(batch: dict) -> dict:
    """The attack's prompt arrays ([B, ...]) from a batch of the job's arrays."""
    weights = jnp.ones(batch["input_ids"].shape, jnp.float32).at[:, 0].set(0.0)  # every position but BOS
    return dict(ids=batch["input_ids"], slots=batch["adv_slots"], slot_mask=batch["adv_slot_mask"],
                target=batch["adv_target"], weights=weights, banned=batch.get("adv_banned"))


def attack(apply: Callable, spec: Adversarial, params, batch: dict, state: jax.Array, keys: jax.Array) -> jax.Array:
    """The inner attack on a batch ([B] rows of `state`, one PRNG key per row) against `params`
    (held constant)."""
    params = jax.lax.stop_gradient(params)
    prompts = _prompts(batch)
    table = params["embeddings"]["token_embedding"]["embedding"]
    if not spec.tokens:
        def one(prompt, offset):
            concept = table[prompt["ids"][prompt["slots"]]]
            embeds, _, _ = continuous_steps(apply, spec.settings, params, prompt, concept + offset, spec.steps)
            return embeds - concept
        return jax.vmap(one)(prompts, state)

    def one(prompt, tokens, key):
        draw, key = jax.random.split(key)
        tokens = jnp.where(tokens < 0, random_allowed(draw, prompt["banned"], tokens.shape), tokens)
        loss = loss_of_tokens(apply, spec.settings.hook, params, prompt, tokens[None])[0]

        def step(carry, step_key):
            return gcg_step(apply, spec.settings, params, prompt, *carry, step_key), None
        (tokens, _), _ = jax.lax.scan(step, (tokens, loss), jax.random.split(key, spec.steps))
        return tokens
    return jax.vmap(one)(prompts, state, keys)


def step_keys(seed: int, batch: dict, step: jax.Array) -> jax.Array:
    """[B] PRNG keys, a pure function of (train.seed, the prompt, the step): a resume draws the same."""
    base = jax.random.key(seed)
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(base, s), step))(batch["adv_seed"])


def adversarial_inputs(spec: Adversarial, params, batch: dict, state: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(input ids, token embeddings or None) of the batch's adversarial prompts."""
    prompts = _prompts(batch)
    if spec.tokens:
        return jax.vmap(ids_with)(prompts, state), None
    table = params["embeddings"]["token_embedding"]["embedding"]
    offsets = lambda prompt, offset: embeds_with(table, prompt, table[prompt["ids"][prompt["slots"]]] + offset)
    return batch["input_ids"], jax.vmap(offsets)(prompts, state)
