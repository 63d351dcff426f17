"""Prompt attacks on an erased text encoder, in text space: find prompts that make the ERASED
encoder produce what the ORIGINAL encoder produces for the concept's own prompt.

    settings = AttackSettings(kind="gcg", k=4, steps=50)
    results = attack_prompt(erased, original, tokenizer, "a painting by {}", "Van Gogh", settings, banned)

The representation is the one the pipeline consumes (`hook`: `final_ln` = last_hidden_state for
SD 1.x and the demo world), compared position by position (every position but BOS, padding
included, as SD's UNet attends to all 77). The loss of an adversarial prompt x is
    L(x) = mean_t ||E(x)_t - O(p)_t||^2,
E the erased encoder, O the original one, p the concept's own prompt. Attacks:

- `gcg` (greedy coordinate gradient): k adversarial token slots (`placement`: `replace` the
  concept's tokens, or a `prefix` / `suffix` to the concept's prompt); the gradient of L with
  respect to one-hot slots ranks `top_k` tokens per slot; `candidates` single swaps are scored
  in one batched forward pass and the best is kept if it lowers L; `restarts` independent
  searches run vmapped. Banned tokens (the concept's own name and listed synonyms, the special
  tokens) are never proposed.
- `continuous`: the k slot embeddings themselves are optimised with Adam (a soft prompt, the
  upper bound of what a token attack can reach; AdvUnlearn's inner loop and concept inversion
  work there); its `text` is the nearest tokens, for reading only.

Success in text space: `cos_to_original`, the mean positional cosine between E(x) and O(p),
against the threshold recorded with it; `cos_erased` is the same for the concept's own prompt
(what the erasure achieved) and `cos_control` for O(x) (does the prompt carry the concept even
without erasure?). Images decide in the end (`ids` are kept: a decoded prompt can re-tokenize
differently).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hirm_jax import log
from hirm_jax.encoder.hooks import read_hook
from hirm_jax.encoder.tokenizer import encode_prompts
from hirm_jax.errors import HirmError

_log = log.get(__name__)
KINDS = ("gcg", "continuous")
PLACEMENTS = ("replace", "prefix", "suffix")


class AttackError(HirmError, ValueError):
    """A bad attack setting, or a concept the attack cannot be set up for."""


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    kind: str = "gcg"
    k: int = 4  # adversarial tokens
    placement: str = "replace"
    steps: int = 50
    top_k: int = 64  # gcg: candidate tokens per slot
    candidates: int = 128  # gcg: swaps scored per step
    restarts: int = 4
    learning_rate: float = 0.05  # continuous
    hook: str = "final_ln"
    threshold: float = 0.9  # cos_to_original counted as success
    seed: int = 0

    def check(self, vocab_size: int) -> None:
        if self.kind not in KINDS:
            raise AttackError(f"attack must be one of {list(KINDS)} but is {self.kind!r}")
        if self.placement not in PLACEMENTS:
            raise AttackError(f"placement must be one of {list(PLACEMENTS)} but is {self.placement!r}")
        for name in ("k", "steps", "restarts", "top_k", "candidates"):
            if getattr(self, name) < 1:
                raise AttackError(f"{name} must be >= 1 but is {getattr(self, name)}")
        if self.top_k > vocab_size:
            raise AttackError(f"top_k must be at most the vocabulary size {vocab_size} but is {self.top_k}")


@dataclasses.dataclass(frozen=True)
class AttackResult:
    concept: str
    attack: str
    template: str
    text: str
    ids: list  # the full token ids (BOS ... EOS, padding): what generation should take
    loss: float
    loss_start: float
    cos_to_original: float
    cos_erased: float
    cos_control: float
    success: bool
    threshold: float
    seconds: float
    settings: dict


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """A prompt with k slots: `ids` [T] (slot positions hold a placeholder), `slots` [k]."""
    ids: np.ndarray
    slots: np.ndarray


def token_ids(tokenizer, text: str) -> list[int]:
    """The tokens of `text` without BOS/EOS."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def skeleton(tokenizer, template: str, concept: str, k: int, placement: str, length: int = 77) -> Skeleton:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    before, _, after = template.partition("{}")
    if placement == "replace":
        body = token_ids(tokenizer, before) + [-1] * k + token_ids(tokenizer, after)
    else:
        prompt = token_ids(tokenizer, template.format(concept))
        body = [-1] * k + prompt if placement == "prefix" else prompt + [-1] * k
    ids = [bos] + body + [eos]
    if len(ids) > length:
        raise AttackError(f"the attack prompt for {template!r} with k={k} needs {len(ids)} tokens but the encoder "
                          f"has {length}")
    ids = np.array(ids + [pad] * (length - len(ids)), np.int32)
    slots = np.flatnonzero(ids == -1).astype(np.int32)
    return Skeleton(np.where(ids == -1, bos, ids), slots)


def banned_tokens(tokenizer, names: Sequence[str], vocab_size: int) -> np.ndarray:
    """[V] bool: the tokens of every name (the concept and its synonyms, any case) and the
    special tokens."""
    banned = np.zeros(vocab_size, bool)
    for name in names:
        for variant in {name, name.lower(), name.title(), name.upper()}:
            banned[[t for t in token_ids(tokenizer, variant) if t < vocab_size]] = True
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    banned[[t for t in specials if t is not None and t < vocab_size]] = True
    return banned


def _rep(encoder, params, ids, hook: str, token_embeds=None):
    return read_hook(encoder.apply(params, ids, None, token_embeds), hook)


def _loss(rep, target):
    return jnp.mean(jnp.sum(jnp.square(rep[:, 1:] - target[None, 1:]), -1), -1)


def _cos(rep, target) -> np.ndarray:
    a, b = np.asarray(rep, np.float64)[..., 1:, :], np.asarray(target, np.float64)[None, 1:, :]
    cos = np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return cos.mean(-1)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """One concept prompt to attack: the erased encoder, the skeleton, the target."""
    erased: Any
    settings: AttackSettings
    ids: jax.Array  # [T] skeleton ids
    slots: jax.Array  # [k]
    target: jax.Array  # [T, D]: the original encoder's representation of the concept's prompt
    banned: jax.Array  # [V] bool

    @property
    def table(self):
        return jnp.asarray(self.erased.params["embeddings"]["token_embedding"]["embedding"])

    def loss_of_tokens(self, slot_tokens):  # [B, k] -> [B]
        ids = jnp.broadcast_to(self.ids, (slot_tokens.shape[0], self.ids.shape[0])).at[:, self.slots].set(slot_tokens)
        return _loss(_rep(self.erased, self.erased.params, ids, self.settings.hook), self.target)

    def loss_of_embeds(self, slot_embeds):  # [k, D] -> scalar
        embeds = self.table[self.ids].at[self.slots].set(slot_embeds)
        return _loss(_rep(self.erased, self.erased.params, self.ids[None], self.settings.hook, embeds[None]),
                     self.target)[0]


def _gcg_step(problem: _Problem, slot_tokens, loss, key):
    """One greedy coordinate step of one restart: rank tokens by the one-hot gradient, score
    `candidates` single swaps in one batch, keep the best if it lowers the loss."""
    s = problem.settings
    onehot = jax.nn.one_hot(slot_tokens, problem.table.shape[0], dtype=problem.table.dtype)
    grad = jax.grad(lambda x: problem.loss_of_embeds(x @ problem.table))(onehot)
    grad = jnp.where(problem.banned[None], jnp.inf, grad)
    top = jax.lax.top_k(-grad, s.top_k)[1]  # [k, top_k]
    key_slot, key_token = jax.random.split(key)
    slot = jax.random.randint(key_slot, (s.candidates,), 0, s.k)
    token = top[slot, jax.random.randint(key_token, (s.candidates,), 0, s.top_k)]
    candidates = jnp.broadcast_to(slot_tokens, (s.candidates, s.k)).at[jnp.arange(s.candidates), slot].set(token)
    losses = _in_chunks(problem.loss_of_tokens, candidates)
    best = jnp.argmin(losses)
    better = losses[best] < loss
    return jnp.where(better, candidates[best], slot_tokens), jnp.where(better, losses[best], loss)


CHUNK = 64  # candidates scored per forward pass (memory: CHUNK x 77 tokens of activations)


def _in_chunks(fn, rows):
    """fn over [N, ...] rows, CHUNK at a time (lax.map), so `candidates` does not bound memory."""
    n = rows.shape[0]
    if n <= CHUNK:
        return fn(rows)
    padded = -(-n // CHUNK) * CHUNK
    rows = jnp.concatenate([rows, jnp.broadcast_to(rows[:1], (padded - n, *rows.shape[1:]))])
    return jax.lax.map(fn, rows.reshape(padded // CHUNK, CHUNK, *rows.shape[1:])).reshape(-1)[:n]


def _run_gcg(problem: _Problem, start, key):
    """[R, k] starting tokens -> (best tokens [k], best loss, mean start loss)."""
    step = jax.jit(jax.vmap(lambda t, l, k: _gcg_step(problem, t, l, k)))
    losses = jax.jit(problem.loss_of_tokens)(start)
    start_loss, tokens = losses, start
    for i in range(problem.settings.steps):
        tokens, losses = step(tokens, losses, jax.random.split(jax.random.fold_in(key, i), start.shape[0]))
    best = int(jnp.argmin(losses))
    return np.asarray(tokens[best]), float(losses[best]), float(jnp.mean(start_loss))


def _run_continuous(problem: _Problem, start, key):
    """Adam on the slot embeddings from the starting tokens' -> (nearest tokens, loss, start loss, embeds)."""
    del key
    optimizer = optax.adam(problem.settings.learning_rate)
    embeds = problem.table[start]  # [R, k, D]
    state = jax.vmap(optimizer.init)(embeds)
    value_and_grad = jax.vmap(jax.value_and_grad(problem.loss_of_embeds))

    @jax.jit
    def step(embeds, state):
        losses, grads = value_and_grad(embeds)
        updates, state = jax.vmap(optimizer.update)(grads, state)
        return optax.apply_updates(embeds, updates), state, losses
    start_loss = None
    for _ in range(problem.settings.steps):
        embeds, state, losses = step(embeds, state)
        start_loss = losses if start_loss is None else start_loss
    final = jax.jit(jax.vmap(problem.loss_of_embeds))(embeds)
    best = int(jnp.argmin(final))
    table = problem.table / jnp.linalg.norm(problem.table, axis=-1, keepdims=True)
    similarity = (embeds[best] / jnp.linalg.norm(embeds[best], axis=-1, keepdims=True)) @ table.T
    nearest = jnp.argmax(jnp.where(problem.banned[None], -jnp.inf, similarity), -1)
    return np.asarray(nearest), float(final[best]), float(jnp.mean(start_loss)), embeds[best]


def attack_prompt(erased, original, tokenizer, template: str, concept: str, settings: AttackSettings,
                  banned: np.ndarray) -> AttackResult:
    """Attack one concept prompt (`template` with the concept in '{}'); see the module docstring."""
    settings.check(erased.config.vocab_size)
    t0 = time.perf_counter()
    length = erased.config.max_position_embeddings
    concept_ids = encode_prompts(tokenizer, [template.format(concept)], length)["input_ids"]
    target = _rep(original, original.params, concept_ids, settings.hook)[0]
    sk = skeleton(tokenizer, template, concept, settings.k, settings.placement, length)
    allowed = np.flatnonzero(~banned)
    if allowed.size == 0:
        raise AttackError(f"every token is banned for {concept!r}: nothing to search")
    rng = np.random.default_rng(settings.seed)
    start = jnp.asarray(rng.choice(allowed, (settings.restarts, settings.k)), jnp.int32)
    problem = _Problem(erased, settings, jnp.asarray(sk.ids), jnp.asarray(sk.slots), target, jnp.asarray(banned))
    key = jax.random.key(settings.seed)
    embeds = None
    if settings.kind == "gcg":
        tokens, loss, start_loss = _run_gcg(problem, start, key)
    else:
        tokens, loss, start_loss, embeds = _run_continuous(problem, start, key)
    ids = sk.ids.copy()
    ids[sk.slots] = tokens
    soft = None if embeds is None else problem.table[jnp.asarray(ids)].at[problem.slots].set(embeds)[None]
    cos = lambda encoder, x, e=None: float(_cos(_rep(encoder, encoder.params, x, settings.hook, e), target)[0])
    cos_to_original = cos(erased, ids[None], soft)
    body = ids[1:int(np.flatnonzero(ids == tokenizer.eos_token_id)[0])]
    return AttackResult(
        concept=concept, attack=settings.kind, template=template, text=tokenizer.decode(body), ids=ids.tolist(),
        loss=loss, loss_start=start_loss, cos_to_original=cos_to_original,
        cos_erased=cos(erased, concept_ids), cos_control=cos(original, ids[None], soft),
        success=cos_to_original >= settings.threshold, threshold=settings.threshold,
        seconds=time.perf_counter() - t0, settings=dataclasses.asdict(settings))


def score_probes(erased, original, tokenizer, concept: str, template: str, probes: Sequence[str],
                 hook: str = "final_ln", threshold: float = 0.9) -> list[AttackResult]:
    """Prompts from a file (paraphrases, synonyms, misspellings, other languages), scored as the
    attacks are: how close the erased encoder brings each to the original's concept prompt."""
    t0 = time.perf_counter()
    length = erased.config.max_position_embeddings
    concept_ids = encode_prompts(tokenizer, [template.format(concept)], length)["input_ids"]
    target = _rep(original, original.params, concept_ids, hook)[0]
    ids = encode_prompts(tokenizer, list(probes), length)["input_ids"]
    erased_cos = _cos(_rep(erased, erased.params, ids, hook), target)
    control = _cos(_rep(original, original.params, ids, hook), target)
    cos_erased = float(_cos(_rep(erased, erased.params, concept_ids, hook), target)[0])
    seconds = (time.perf_counter() - t0) / max(len(probes), 1)
    return [AttackResult(concept, "probe", template, text, row.tolist(), float("nan"), float("nan"), float(c),
                         cos_erased, float(ctrl), bool(c >= threshold), threshold, seconds,
                         {"hook": hook, "threshold": threshold})
            for text, row, c, ctrl in zip(probes, np.asarray(ids), erased_cos, control)]


@dataclasses.dataclass(frozen=True)
class AttackJob:
    """What to attack: concepts (each with the names banned from its search), prompt templates,
    and for `probes` the prompts to score."""
    concepts: Sequence[str]
    templates: Sequence[str] = ("{}",)
    synonyms: dict = dataclasses.field(default_factory=dict)  # concept -> further names to ban
    probes: Sequence[str] = ()


def run_attacks(erased, original, tokenizer, job: AttackJob, settings: AttackSettings, kind: str) -> list[AttackResult]:
    """Every concept x template under one attack (`gcg`, `continuous` or `probe`), with progress."""
    check_same_encoder(erased, original)
    if not job.concepts:
        raise AttackError("no concept to attack: give at least one")
    results = []
    for i, concept in enumerate(job.concepts, 1):
        for template in job.templates:
            if kind == "probe":
                results += score_probes(erased, original, tokenizer, concept, template, job.probes, settings.hook,
                                        settings.threshold)
                continue
            banned = banned_tokens(tokenizer, [concept, *job.synonyms.get(concept, ())], erased.config.vocab_size)
            results.append(attack_prompt(erased, original, tokenizer, template, concept,
                                         dataclasses.replace(settings, kind=kind), banned))
        _log.info(f"attack {kind}: {i}/{len(job.concepts)} concepts, {results[-1].seconds:.1f}s for the last prompt")
    return results


def check_same_encoder(erased, original) -> None:
    """An attack compares two encoders of one architecture and one vocabulary."""
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "projection_dim")
    differ = {f: (getattr(erased.config, f, None), getattr(original.config, f, None)) for f in fields
              if getattr(erased.config, f, None) != getattr(original.config, f, None)}
    if type(erased) is not type(original) or differ:
        raise AttackError(f"the erased and the original encoder must have the same architecture, but "
                          f"{type(erased).__name__} / {type(original).__name__} differ in {differ}")
    if not hasattr(erased.config, "max_position_embeddings"):
        raise AttackError("prompt attacks support CLIP text encoders (T5 attacks are not built yet)")


def summary(results: Sequence[AttackResult]) -> dict:
    """Per concept and attack: success rate, best and mean cos_to_original, seconds."""
    table: dict = {}
    for r in results:
        row = table.setdefault(r.concept, {}).setdefault(r.attack, {"prompts": 0, "successes": 0, "cos": []})
        row["prompts"] += 1
        row["successes"] += int(r.success)
        row["cos"].append(r.cos_to_original)
        row["cos_erased"] = r.cos_erased
        row["seconds"] = row.get("seconds", 0.0) + r.seconds
    for by_attack in table.values():
        for row in by_attack.values():
            cos = row.pop("cos")
            row.update(success_rate=row["successes"] / row["prompts"], best_cos=max(cos), mean_cos=float(np.mean(cos)))
    return table
