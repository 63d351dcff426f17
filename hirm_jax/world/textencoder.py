"""The world's text encoder: a small CLIP text transformer trained contrastively, then frozen.

It is `hirm_jax.encoder.clip.CLIPTextTransformer` (CLIPTextModel architecture, real CLIP vocabulary,
77 positions), trained against a small CNN image tower with a multi-positive InfoNCE: a
caption is positive for every picture it describes ("a circle" for every circle). The image
tower is thrown away; the encoder is saved as a transformers folder, so PyTorch users load
it (and HiRM erases it) exactly as they would SD's.

It has CLIP ViT-L/14's depth (12 blocks) at width 128, so "train block 0, supervise the last
layer" means what it means in SD. Captions are cut to `TRAIN_LENGTH` tokens in training: with
the causal mask and first-EOS pooling this is exact for the pooled output; a caption that does
not fit is an error. Training checkpoints (flax msgpack) and resumes bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Optional

import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hirm_jax import log
from hirm_jax.encoder.clip import TextEncoder, TextEncoderConfig
from hirm_jax.encoder.tokenizer import encode_prompts
from hirm_jax.world import data

_log = log.get(__name__)

CONFIG = TextEncoderConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=12,
                           num_attention_heads=4, max_position_embeddings=77,
                           hidden_act="quick_gelu", eos_token_id=49407)
TRAIN_LENGTH = 16


class ImageTower(nn.Module):
    width: int = 32
    out: int = 128

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        for mult in (1, 2, 4):
            x = nn.relu(nn.Conv(self.width * mult, (3, 3))(x))
            x = nn.relu(nn.Conv(self.width * mult, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.out)(nn.relu(nn.Dense(256)(x)))


def _checked_ids(tokenizer, texts) -> np.ndarray:
    """Token ids cut to TRAIN_LENGTH; a caption longer than that is an error, never cut."""
    ids = encode_prompts(tokenizer, list(texts), max_length=77)["input_ids"]
    lengths = (np.asarray(ids) != CONFIG.eos_token_id).sum(axis=1) + 1   # BOS ... EOS
    if lengths.max() > TRAIN_LENGTH:
        longest = texts[int(lengths.argmax())]
        raise ValueError(f"caption {longest!r} has {int(lengths.max())} tokens but the world's text encoder "
                         f"trains on at most TRAIN_LENGTH={TRAIN_LENGTH}: shorten the name or the template")
    return np.asarray(ids)[:, :TRAIN_LENGTH]


def caption_table(tokenizer):
    """All training captions (every name of every class), tokenized to TRAIN_LENGTH, with the
    object/style they name (-1: any)."""
    rows = []
    for o, obj in enumerate(data.ALL_OBJECTS):
        for s, style in enumerate(data.ALL_STYLES):
            rows += [(text, o, s) for text in data.cell_captions(obj, style)]
        rows += [(data.caption(a, "", t), o, -1) for t in data.OBJECT_ONLY_TEMPLATES for a in data.names(obj)]
    for s, style in enumerate(data.ALL_STYLES):
        rows += [(data.caption("", b, t), -1, s) for t in data.STYLE_ONLY_TEMPLATES for b in data.names(style)]
    texts, objs, styles = zip(*rows)
    return _checked_ids(tokenizer, texts), np.array(objs), np.array(styles)


def _normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def multi_positive_infonce(text_emb, image_emb, positive, logit_scale):
    """Symmetric InfoNCE where positive[i, j] marks every (caption i, image j) match."""
    logits = logit_scale * _normalize(text_emb) @ _normalize(image_emb).T
    def one_side(l, p):
        log_all = jax.nn.logsumexp(l, axis=1)
        log_pos = jax.nn.logsumexp(jnp.where(p, l, -1e9), axis=1)
        return jnp.mean(log_all - log_pos)
    return 0.5 * (one_side(logits, positive) + one_side(logits.T, positive.T))


@dataclasses.dataclass(frozen=True)
class TextEncoderRecipe:
    """The text encoder's training recipe (the shipped world's defaults)."""
    seed: int = 0
    steps: int = 800
    batch: int = 128
    lr: float = 1e-3
    pool_size: int = 8000
    log_every: int = 50
    checkpoint_every: int = 50


class _Captions:
    """Caption ids grouped by the picture they can describe, and the seeded draw of a batch."""

    def __init__(self, tokenizer):
        self.ids, self.obj, self.style = caption_table(tokenizer)
        n_obj, n_sty = len(data.ALL_OBJECTS), len(data.ALL_STYLES)
        self.full = {(o, s): np.nonzero((self.obj == o) & (self.style == s))[0] for o in range(n_obj) for s in range(n_sty)}
        self.obj_only = {o: np.nonzero((self.obj == o) & (self.style == -1))[0] for o in range(n_obj)}
        self.style_only = {s: np.nonzero((self.obj == -1) & (self.style == s))[0] for s in range(n_sty)}

    def draw(self, pool, recipe: TextEncoderRecipe, step: int):
        """(images, caption ids, positive mask) of one step: full captions 70%, object-only and
        style-only 15% each. Each step has its own generator, so a resumed run draws the same."""
        rng = np.random.default_rng([recipe.seed, 7, step])
        idx = rng.choice(recipe.pool_size, recipe.batch, replace=False)
        o, s = pool.objects[idx], pool.styles[idx]
        kind = rng.random(recipe.batch)
        cap = np.array([rng.choice(self.full[(oi, si)]) if k < 0.7 else
                        rng.choice(self.obj_only[oi]) if k < 0.85 else rng.choice(self.style_only[si])
                        for oi, si, k in zip(o, s, kind)])
        co, cs = self.obj[cap][:, None], self.style[cap][:, None]
        positive = ((co == o[None]) | (co == -1)) & ((cs == s[None]) | (cs == -1))
        return pool.images[idx], self.ids[cap], positive


def _init_state(recipe: TextEncoderRecipe, tx, tower):
    key = jax.random.key(recipe.seed)
    text_params = TextEncoder.init(CONFIG, seed=recipe.seed, length=TRAIN_LENGTH).params
    tower_params = tower.init(jax.random.fold_in(key, 1), jnp.zeros((1, 32, 32, 3), jnp.uint8))["params"]
    params = {"text": text_params, "image": tower_params, "logit_scale": jnp.log(jnp.float32(1 / 0.07))}
    return {"params": params, "opt_state": tx.init(params), "step": 0}


def _restore(checkpoint, state):
    """The saved state when the checkpoint exists (same structure as `state`), else `state`."""
    if checkpoint is None or not Path(checkpoint).exists():
        return state
    restored = serialization.from_bytes(state, Path(checkpoint).read_bytes())
    _log.info(f"[text encoder] resumed from {checkpoint} at step {int(restored['step'])}")
    return restored


def _save(checkpoint, state) -> None:
    tmp = Path(f"{checkpoint}.tmp")
    tmp.write_bytes(serialization.to_bytes(jax.device_get(state)))
    os.replace(tmp, checkpoint)


def train_text_encoder(tokenizer, recipe: Optional[TextEncoderRecipe] = None, pool=None, checkpoint=None,
                       **fields):
    """Returns (TextEncoder, metrics dict). Deterministic for a given seed on one platform.

    pool: optional data.sample(N >= pool_size, seed, "train") to take the pictures from.
    checkpoint: optional path (flax msgpack); written every `recipe.checkpoint_every` steps
    (atomically) and, if it exists at the start, resumed from: the result is bit-identical to
    an uninterrupted run. fields: TextEncoderRecipe fields by name (`steps=300`).
    """
    recipe = dataclasses.replace(recipe or TextEncoderRecipe(), **fields)
    t0 = time.time()
    pool = data.sample(recipe.pool_size, seed=recipe.seed, split="train") if pool is None else pool[:recipe.pool_size]
    captions = _Captions(tokenizer)
    tower, module = ImageTower(), TextEncoder(CONFIG, None)
    warmup = min(50, max(1, recipe.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, recipe.lr, warmup, recipe.steps, recipe.lr * 0.02)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    state = _restore(checkpoint, _init_state(recipe, tx, tower))

    def loss_fn(params, images, text_ids, positive):
        text_emb = module.apply(params["text"], text_ids)["pooled_output"]
        image_emb = tower.apply({"params": params["image"]}, images)
        scale = jnp.exp(jnp.clip(params["logit_scale"], 0.0, 4.6))
        return multi_positive_infonce(text_emb, image_emb, positive, scale)

    @jax.jit
    def step_fn(params, opt_state, images, text_ids, positive):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, text_ids, positive)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = int(state["step"])
    params, opt_state = state["params"], state["opt_state"]
    for step in range(start + 1, recipe.steps + 1):
        params, opt_state, loss = step_fn(params, opt_state, *captions.draw(pool, recipe, step))
        if step % recipe.log_every == 0 or step == recipe.steps:
            rate = (time.time() - t0) / (step - start)
            _log.info(f"[text encoder] step {step}/{recipe.steps} loss {float(loss):.4f} "
                      f"{rate:.2f}s/step eta {rate * (recipe.steps - step):.0f}s")
        if checkpoint is not None and (step % recipe.checkpoint_every == 0 or step == recipe.steps):
            _save(checkpoint, {"params": params, "opt_state": opt_state, "step": step})
    encoder = TextEncoder(CONFIG, jax.device_get(params["text"]))
    metrics = zero_shot_accuracy(encoder, tower, params["image"], tokenizer, recipe.seed)
    metrics.update(train_seconds=time.time() - t0, steps=recipe.steps, resumed_at_step=start)
    _log.info(f"[text encoder] zero-shot held-out accuracy (own names): object {metrics['object_accuracy']:.4f} "
              f"style {metrics['style_accuracy']:.4f}; held-out synonyms: object "
              f"{metrics['per_name']['heldout_name']['object_accuracy']:.4f} style "
              f"{metrics['per_name']['heldout_name']['style_accuracy']:.4f}")
    return encoder, metrics


def zero_shot_accuracy(encoder, tower, tower_params, tokenizer, seed, n=1000):
    """Classify held-out pictures by the nearest held-out-template caption of every cell, once
    with every class's own name (the top-level figures) and once per name (`per_name`, keyed by
    data.name_key: own, name_1, ..., heldout_name)."""
    cells = [(o, s) for o in range(len(data.ALL_OBJECTS)) for s in range(len(data.ALL_STYLES))]
    batch = data.sample(n, seed=seed, split="eval")
    image_emb = _normalize(tower.apply({"params": tower_params}, batch.images))
    result = {}
    for k in range(data.N_NAMES):
        scores = 0
        for template in data.HELDOUT_TEMPLATES:
            texts = [data.caption(data.name_of(data.ALL_OBJECTS[o], k), data.name_of(data.ALL_STYLES[s], k), template)
                     for o, s in cells]
            pooled = encoder.apply(encoder.params, _checked_ids(tokenizer, texts))["pooled_output"]
            scores = scores + image_emb @ _normalize(pooled).T
        best = np.asarray(jnp.argmax(scores, axis=1))
        pred_obj = np.array([cells[b][0] for b in best])
        pred_style = np.array([cells[b][1] for b in best])
        result[k] = {"object_accuracy": float((pred_obj == batch.objects).mean()),
                     "style_accuracy": float((pred_style == batch.styles).mean())}
    return dict(result[0], per_name={data.name_key(k): result[k] for k in range(data.N_NAMES)})


def save_half(encoder: TextEncoder, out_dir, overwrite: bool = False) -> TextEncoder:
    """Save as a transformers folder with float16 storage (half the bytes; config says float32).

    The weights are rounded to float16 first and the rounded encoder is returned, so whatever
    is trained on its outputs (the denoiser) sees exactly what a user loading the folder gets:
    `CLIPTextModel.from_pretrained(out_dir)` gives float32 weights holding the same values.
    """
    from pathlib import Path

    from safetensors.numpy import load_file, save_file

    from hirm_jax.encoder.layouts import WEIGHTS_NAME, save_text_encoder

    rounded = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float16).astype(np.float32), encoder.params)
    encoder = TextEncoder(encoder.config, rounded)
    save_text_encoder(encoder, out_dir, overwrite=overwrite)
    Path(out_dir).chmod(0o755)  # atomic_dir's temporary folder is private
    path = Path(out_dir) / WEIGHTS_NAME
    state = {k: v.astype(np.float16) for k, v in load_file(str(path)).items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return encoder
