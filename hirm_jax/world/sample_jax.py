"""The world's pictures without PyTorch: the Flax CLIP encoder, the Flax UNet
(hirm_jax.pipelines.unet) read from the world's diffusers folder, DDIM as one lax.scan, and
classifier-free guidance batched with the conditional pass; pictures x seeds split over the
devices. `world.generate(..., backend="jax")` calls it.

    images = generate_jax(world, "erased/text_encoder", prompts, seeds)        # [N, 32, 32, 3] uint8

Noise: each picture's starting latents come from `jax.random` keyed by its seed (a different
stream from PyTorch's, so pictures differ between backends), or from `latents` [N, 12, 16, 16]
(diffusers' layout), with which both backends draw the same pictures (within 2/255).
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from hirm_jax.encoder.tokenizer import prompt_ids
from hirm_jax.pipelines import schedulers
from hirm_jax.pipelines.diffusers_weights import load_unet

PATCH = 2


@functools.lru_cache(maxsize=4)
def _unet(folder: str):
    return load_unet(folder)


def _encoder(world, text_encoder):
    """A Flax CLIP encoder: the world's own, a transformers folder, or a TextEncoder as is."""
    from hirm_jax.encoder.layouts import load_text_encoder
    if text_encoder is None:
        return load_text_encoder(world.text_encoder_path)
    if hasattr(text_encoder, "params"):
        return text_encoder
    return load_text_encoder(text_encoder)


def from_patches(x: np.ndarray) -> np.ndarray:
    """[N, 12, 16, 16] in [-1, 1] -> [N, 32, 32, 3] uint8 (pixel_shuffle, as the torch path)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c // PATCH ** 2, PATCH, PATCH, h, w).transpose(0, 1, 4, 2, 5, 3)
    x = x.reshape(n, c // PATCH ** 2, h * PATCH, w * PATCH)
    return np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=8)
def _sampler(unet_folder: str, steps: int, scheduler_json: str):
    unet = _unet(unet_folder)
    scheduler = schedulers.ddim_from_config(json.loads(scheduler_json), steps)

    def run(params, cond, uncond, guidance, latents):
        model = lambda x, t, context: unet.apply(x, t, context, params=params)
        return schedulers.guided_sample(model, scheduler, cond, uncond, guidance, latents)
    return unet, jax.jit(run)


def _shard(x: np.ndarray, devices) -> jax.Array:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    if len(devices) == 1 or x.shape[0] % len(devices):
        return jnp.asarray(x)
    return jax.device_put(x, NamedSharding(Mesh(np.asarray(devices), ("data",)), PartitionSpec("data")))


def generate_jax(world, text_encoder=None, prompts=(), seeds=(), steps: Optional[int] = None,
                 guidance: Optional[float] = None, batch_size: int = 128, latents: Optional[np.ndarray] = None):
    """Pictures [N, 32, 32, 3] uint8, one per (prompt, seed); see the module docstring. The
    pictures go in even batches of at most `batch_size` (the last one padded: one compile per
    batch shape), each split over the devices."""
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt but got {len(prompts)} prompts and {len(seeds)} seeds")
    steps = steps or world.config["sample_steps"]
    guidance = float(world.config["guidance"] if guidance is None else guidance)
    scheduler_json = (world.path / "scheduler" / "scheduler_config.json").read_text()
    unet, run = _sampler(str(world.path / "unet"), steps, scheduler_json)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if latents is None:
        latents = schedulers.noise(seeds, shape)
    latents = np.asarray(latents, np.float32)
    if latents.shape != (len(seeds), *shape) or not np.isfinite(latents).all():
        raise ValueError(f"latents must be finite with shape {(len(seeds), *shape)} but have shape {latents.shape}")
    encoder = _encoder(world, text_encoder)
    ids = prompt_ids(world.tokenizer, prompts + [""])
    states = np.asarray(encoder.apply(encoder.params, ids, None)["last_hidden_state"], np.float32)
    devices = jax.devices()
    batch = -(-len(seeds) // -(-len(seeds) // batch_size)) if seeds else 1  # even batches: the least padding
    batch = -(-batch // len(devices)) * len(devices) if batch >= len(devices) else batch
    out = []
    for start in range(0, len(seeds), batch):
        chunk = slice(start, start + batch)
        cond, x = states[:-1][chunk], latents[chunk]
        pad = batch - len(x)
        cond, x = (np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a for a in (cond, x))
        images = run(unet.params, _shard(cond, devices), states[-1][None], jnp.float32(guidance), _shard(x, devices))
        out.append(from_patches(np.asarray(images, np.float32))[:len(x) - pad])
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)
