"""The world's text encoder: a small CLIP text transformer trained contrastively, then frozen.

It is `hirm_jax.encoder.clip.CLIPTextTransformer` (CLIPTextModel architecture, real CLIP vocabulary,
77 positions), trained against a small CNN image tower with a multi-positive InfoNCE: a
caption is positive for every picture it describes ("a circle" for every circle). The image
tower is thrown away; the encoder is saved as a transformers folder, so PyTorch users load
it (and HiRM erases it) exactly as they would SD's.

Captions are cut to `TRAIN_LENGTH` tokens in training: with the causal mask and first-EOS
pooling this is exact for the pooled output, and every world caption fits.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hirm_jax import log
from hirm_jax.encoder.clip import TextEncoder, TextEncoderConfig
from hirm_jax.encoder.tokenizer import encode_prompts
from hirm_jax.world import data

_log = log.get(__name__)

CONFIG = TextEncoderConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
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


def caption_table(tokenizer):
    """All training captions, tokenized to TRAIN_LENGTH, with the object/style they name (-1: any)."""
    rows = []
    for o, obj in enumerate(data.ALL_OBJECTS):
        for s, style in enumerate(data.ALL_STYLES):
            rows += [(data.caption(obj, style, t), o, s) for t in data.TRAIN_TEMPLATES]
        rows += [(data.caption(obj, "", t), o, -1) for t in data.OBJECT_ONLY_TEMPLATES]
    for s, style in enumerate(data.ALL_STYLES):
        rows += [(data.caption("", style, t), -1, s) for t in data.STYLE_ONLY_TEMPLATES]
    texts, objs, styles = zip(*rows)
    ids = encode_prompts(tokenizer, list(texts), max_length=TRAIN_LENGTH)["input_ids"]
    return ids, np.array(objs), np.array(styles)


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


def train_text_encoder(tokenizer, seed: int = 0, steps: int = 600, batch: int = 128, lr: float = 1e-3,
                       pool_size: int = 8000, log_every: int = 50, pool=None):
    """Returns (TextEncoder, metrics dict). Deterministic for a given seed on one platform.

    pool: optional data.sample(N >= pool_size, seed, "train") to take the pictures from.
    """
    t0 = time.time()
    pool = data.sample(pool_size, seed=seed, split="train") if pool is None else pool[:pool_size]
    ids, cap_obj, cap_style = caption_table(tokenizer)
    # Captions grouped by the picture they can describe: full (70%), object-only, style-only.
    full = {(o, s): np.nonzero((cap_obj == o) & (cap_style == s))[0]
            for o in range(len(data.ALL_OBJECTS)) for s in range(len(data.ALL_STYLES))}
    obj_only = {o: np.nonzero((cap_obj == o) & (cap_style == -1))[0] for o in range(len(data.ALL_OBJECTS))}
    style_only = {s: np.nonzero((cap_obj == -1) & (cap_style == s))[0] for s in range(len(data.ALL_STYLES))}

    key = jax.random.key(seed)
    text_params = TextEncoder.init(CONFIG, seed=seed, length=TRAIN_LENGTH).params
    tower = ImageTower()
    tower_params = tower.init(jax.random.fold_in(key, 1), jnp.zeros((1, 32, 32, 3), jnp.uint8))["params"]
    params = {"text": text_params, "image": tower_params, "logit_scale": jnp.log(jnp.float32(1 / 0.07))}
    warmup = min(50, max(1, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * 0.02)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)
    module = TextEncoder(CONFIG, None)

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

    rng = np.random.default_rng([seed, 7])
    for step in range(1, steps + 1):
        idx = rng.choice(pool_size, batch, replace=False)
        o, s = pool.objects[idx], pool.styles[idx]
        kind = rng.random(batch)
        cap = np.array([rng.choice(full[(oi, si)]) if k < 0.7 else
                        rng.choice(obj_only[oi]) if k < 0.85 else rng.choice(style_only[si])
                        for oi, si, k in zip(o, s, kind)])
        positive = (((cap_obj[cap][:, None] == o[None]) | (cap_obj[cap][:, None] == -1)) &
                    ((cap_style[cap][:, None] == s[None]) | (cap_style[cap][:, None] == -1)))
        params, opt_state, loss = step_fn(params, opt_state, pool.images[idx], ids[cap], positive)
        if step % log_every == 0 or step == steps:
            elapsed = time.time() - t0
            _log.info(f"[text encoder] step {step}/{steps} loss {float(loss):.4f} "
                  f"elapsed {elapsed:.0f}s eta {elapsed / step * (steps - step):.0f}s")
    encoder = TextEncoder(CONFIG, jax.device_get(params["text"]))
    metrics = zero_shot_accuracy(encoder, tower, params["image"], tokenizer, seed)
    metrics["train_seconds"] = time.time() - t0
    _log.info(f"[text encoder] zero-shot held-out accuracy: object {metrics['object_accuracy']:.4f} "
          f"style {metrics['style_accuracy']:.4f}")
    return encoder, metrics


def zero_shot_accuracy(encoder, tower, tower_params, tokenizer, seed, n=1000):
    """Classify held-out pictures by the nearest held-out-template caption of every cell."""
    cells = [(o, s) for o in range(len(data.ALL_OBJECTS)) for s in range(len(data.ALL_STYLES))]
    batch = data.sample(n, seed=seed, split="eval")
    image_emb = _normalize(tower.apply({"params": tower_params}, batch.images))
    scores = 0
    for template in data.HELDOUT_TEMPLATES:
        texts = [data.caption(data.ALL_OBJECTS[o], data.ALL_STYLES[s], template) for o, s in cells]
        ids = encode_prompts(tokenizer, texts, max_length=TRAIN_LENGTH)["input_ids"]
        pooled = encoder.apply(encoder.params, ids)["pooled_output"]
        scores = scores + image_emb @ _normalize(pooled).T
    best = np.asarray(jnp.argmax(scores, axis=1))
    pred_obj = np.array([cells[b][0] for b in best])
    pred_style = np.array([cells[b][1] for b in best])
    return {"object_accuracy": float((pred_obj == batch.objects).mean()),
            "style_accuracy": float((pred_style == batch.styles).mean())}


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
