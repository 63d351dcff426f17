"""The erasure problem as arrays: prompts, token weights and misdirection targets, per job.

A job is one trainable copy of the early blocks: with `joint=True` all concepts form one job
(one encoder erases them all); with `joint=False` each concept is its own job (its own
independent delta), and the jobs are stacked on a leading axis and trained in one vmapped
step. Frozen targets are computed here ONCE, before training.

    jobs = build_jobs(config, encoder, tokenizer, concepts)
    jobs.per_job["targets"]["last_mlp_out"]    # [J, K, T, D]
    jobs.shared["retain_ids"]                  # [R, T] (preservation, when enabled)
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Callable, Optional

import jax
import numpy as np

from hirm_jax import config_lib
from hirm_jax.erase import adversarial, objectives
from hirm_jax.erase import prompts
from hirm_jax.encoder.architectures import architecture_of
from hirm_jax.encoder.clip import TextEncoder
from hirm_jax.encoder.tokenizer import PromptTooLongError, encode_prompts

ENCODE_CHUNK = 64


@dataclasses.dataclass
class Jobs:
    concepts: list  # [J] lists of prompts.Concept
    prompt_pairs: list  # [J] lists of prompts.PromptPair (K each)
    per_job: dict  # arrays with leading [J, K]
    shared: dict  # arrays shared by every job (preservation prompts and their targets)

    @property
    def num_jobs(self) -> int:
        return len(self.concepts)

    @property
    def prompts_per_job(self) -> int:
        return len(self.prompt_pairs[0])


def make_encode_fn(encoder: TextEncoder, hooks, use_attention_mask: bool) -> Callable:
    """jitted (params, ids, mask) -> {hook: [B, T', D]}. One function per (architecture, hooks,
    mask rule), shared by every caller, so building many jobs or reports compiles each shape once."""
    return _encode_fn(encoder.config, tuple(hooks), bool(use_attention_mask))


@functools.lru_cache(maxsize=8)
def _encode_fn(config, hooks: tuple, use_attention_mask: bool) -> Callable:
    encoder = architecture_of(config).encoder_class(config, None)

    def encode(params, ids, mask):
        out = encoder.apply(params, ids, mask if use_attention_mask else None)
        return {h: objectives.read_hook(out, h) for h in hooks}
    return jax.jit(encode)


def encode_in_chunks(encode_fn, params, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Encode any number of prompts with at most two compiled shapes (the last chunk is padded)."""
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


def tokenize(tokenizer, texts, max_length: int, vocab_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of `texts`; with `vocab_size`, every id is checked against it."""
    batch = encode_prompts(tokenizer, texts, max_length=max_length)
    if vocab_size is not None:
        check_token_ids(batch["input_ids"], texts, vocab_size, tokenizer)
    return batch["input_ids"], batch["attention_mask"]


def _naming_concepts(tok: Callable, concepts: list, templates) -> Callable:
    """`tok`, with a prompt that is too long reported at its concept's line (file:line or
    config.concepts[i]): every prompt is checked once, where it is tokenized."""
    where = {t.format(name): c.where for c in concepts for t in templates for name in (c.name, c.anchor) if name}

    def checked(texts):
        try:
            return tok(texts)
        except PromptTooLongError as e:
            if e.prompt not in where:
                raise
            raise PromptTooLongError(f"{where[e.prompt]}: {e}", e.prompt, e.length) from None
    return checked


def check_token_ids(ids: np.ndarray, texts, vocab_size: int, tokenizer) -> None:
    """Every token id must index the encoder's embedding table (ids < vocab_size). A larger id
    means the tokenizer is not the encoder's; JAX would look it up as NaN, not fail."""
    bad = np.argwhere(np.asarray(ids) >= vocab_size)
    if not bad.size:
        return
    row, column = (int(i) for i in bad[0])
    token_id = int(ids[row, column])
    raise config_lib.ConfigError(
        f"prompt {list(texts)[row]!r} has token {tokenizer.convert_ids_to_tokens(token_id)!r} with id {token_id}, "
        f"but the encoder's vocab_size is {vocab_size} (token ids must be < vocab_size; {len(bad)} token(s) of "
        f"{len(ids)} prompt(s) are not): the tokenizer is not this encoder's; set encoder.tokenizer to the "
        "encoder's own tokenizer folder")


def concept_key(seed: int, name: str) -> jax.Array:
    """A PRNG key that depends on (seed, name) only, so a concept's random targets are the
    same whether it is erased alone or among a thousand."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF)


def concept_vector(config, tok: Callable, encode_fn, params) -> dict[str, np.ndarray]:
    """Ring-A-Bell-style empirical concept vector per hook: mean over paired prompts of
    frozen(with concept) - frozen(without), per position ([T', D]). tok: texts -> (ids, mask)."""
    path = config.objective.vector_pairs_file
    rows = [line.split("\t") for line in prompts.read_lines(path, "objective.vector_pairs_file")]
    rows = [r for r in rows if r != ["with_concept", "without_concept"]]
    bad = [i for i, r in enumerate(rows, 1) if len(r) != 2]
    if bad or not rows:
        raise config_lib.ConfigError(f"{path}: every row must hold 2 tab-separated prompts; rows {bad[:5]} do not")
    with_reps = encode_in_chunks(encode_fn, params, *tok([r[0] for r in rows]))
    without_reps = encode_in_chunks(encode_fn, params, *tok([r[1] for r in rows]))
    return {h: (with_reps[h] - without_reps[h]).mean(0) for h in with_reps}


def _adversarial_arrays(spec, encoder: TextEncoder, tokenizer, pairs: list, ids, mask) -> dict[str, np.ndarray]:
    """Robust HiRM's per-prompt arrays: where each concept's tokens are, what the ORIGINAL encoder
    makes of the prompt at the attack's hook (the attack's target), a seed, and for gcg the banned tokens."""
    arch = architecture_of(encoder)
    if not arch.has_bos:
        raise config_lib.ConfigError(f"objective.adversarial needs a CLIP text encoder; the {arch.name} encoder "
                                     "has no prompt attack yet")
    slots, slot_mask = adversarial.concept_slots(tokenizer, pairs, ids)
    encode = make_encode_fn(encoder, (spec.settings.hook,), False)  # the attack runs without a mask
    arrays = dict(adv_slots=slots, adv_slot_mask=slot_mask,
                  adv_target=encode_in_chunks(encode, encoder.params, ids, mask)[spec.settings.hook],
                  adv_seed=np.array([zlib.crc32(p.prompt.encode("utf-8")) & 0x7FFFFFFF for p in pairs], np.int32))
    if spec.tokens:
        from hirm_jax.attack.search import banned_tokens  # noqa: PLC0415
        by_concept = {p.concept: banned_tokens(tokenizer, [p.concept], encoder.config.vocab_size) for p in pairs}
        arrays["adv_banned"] = np.stack([by_concept[p.concept] for p in pairs])
    return arrays


def build_jobs(config, encoder: TextEncoder, tokenizer, concepts: list) -> Jobs:
    """The jobs of `config` for `encoder` (a CLIP TextEncoder or a T5Encoder: its architecture
    sets the prompt length, encoder.max_length or CLIP's 77, and whether position 0 is BOS)."""
    obj = config.objective
    hooks = tuple(obj.hooks)
    arch = architecture_of(encoder)
    max_length, vocab_size = arch.max_length(encoder.config, config.encoder.get("max_length", 0)), encoder.config.vocab_size
    weights_of = lambda ids, mask, hook: objectives.position_weights(ids, mask, obj.token_positions, hook,
                                                                      has_bos=arch.has_bos)
    tok = _naming_concepts(lambda texts: tokenize(tokenizer, texts, max_length, vocab_size), concepts, config.templates)
    encode_fn = make_encode_fn(encoder, hooks, config.encoder.use_attention_mask)
    groups = [list(concepts)] if config.joint else [[c] for c in concepts]
    pairs_per_job = [prompts.build_prompt_pairs(group, config.templates) for group in groups]
    pairs = [p for job in pairs_per_job for p in job]
    ids, mask = tok([p.prompt for p in pairs])

    if obj.name == "hirm_r":
        targets = {}
        for hook in hooks:
            length = 1 if hook in config_lib.SINGLE_POSITION_HOOKS else max_length
            dim = encoder.config.projection_dim if hook == "text_embeds" else encoder.config.hidden_size
            by_concept = {c.name: np.asarray(objectives.random_targets(
                concept_key(config.train.seed, f"{c.name}|{hook}"), length, dim, obj.random_distribution))
                for c in concepts}
            targets[hook] = np.stack([by_concept[p.concept] for p in pairs])
    elif obj.name == "hirm_s":
        targets = encode_in_chunks(encode_fn, encoder.params, *tok([p.anchor_prompt for p in pairs]))
    else:  # hirm_s_vector
        vector = concept_vector(config, tok, encode_fn, encoder.params)
        frozen = encode_in_chunks(encode_fn, encoder.params, ids, mask)
        targets = {h: frozen[h] - vector[h] for h in hooks}

    num_jobs, k = len(groups), len(pairs_per_job[0])
    by_job = lambda x: np.asarray(x).reshape(num_jobs, k, *np.shape(x)[1:])
    per_job = dict(
        input_ids=by_job(ids), attention_mask=by_job(mask),
        targets={h: by_job(targets[h].astype(np.float32) * obj.scale) for h in hooks},
        weights={h: by_job(weights_of(ids, mask, h)) for h in hooks},
    )
    spec = adversarial.Adversarial.from_config(obj.adversarial)
    if spec is not None:
        per_job.update({k: by_job(v) for k, v in _adversarial_arrays(spec, encoder, tokenizer, pairs, ids, mask).items()})
    shared = {}
    if config.preservation.weight > 0:
        from hirm_jax.resources import data_path  # noqa: PLC0415
        retain = prompts.read_lines(config.preservation.prompts_file or data_path("ordinary_prompts.txt"),
                                    "preservation.prompts_file")[: config.preservation.batch_size or None]
        r_ids, r_mask = tok(retain)
        shared = dict(retain_ids=r_ids, retain_mask=r_mask,
                      retain_targets=encode_in_chunks(encode_fn, encoder.params, r_ids, r_mask),
                      retain_weights={h: np.asarray(weights_of(r_ids, r_mask, h)) for h in hooks})
    return Jobs(groups, pairs_per_job, per_job, shared)
