"""The demo world: a tiny, fully offline text-to-image setting in which HiRM can be shown.

Pictures of 32x32 pixels show one of 10 objects in one of 8 styles ("a striped heart"); the
world ships a real CLIP tokenizer, a small CLIPTextModel of CLIP-L's depth (12 blocks, width
128: the thing HiRM erases), a diffusers UNet conditioned
on that encoder's 77-token `last_hidden_state` like SD 1.x, a DDIM scheduler, and a judge CNN
that names the object and style of any picture.

    from hirm_jax import world as w
    world = w.load_world()                                   # the shipped world
    images = w.generate(world, prompts=["a striped heart"], seeds=[0])   # [1, 32, 32, 3] uint8
    images = w.generate(world, erased_encoder, prompts, seeds)           # torch module or folder
    world.judge.classify(images)["object"]                   # ["heart"]

Class names: w.OBJECTS, w.STYLES (the concepts), w.OBJECT_ANCHOR ("blob") and
w.STYLE_ANCHOR ("plain") (the neutral super-categories HiRM-S maps onto), w.ALL_OBJECTS /
w.ALL_STYLES (the judge's classes), w.super_category("circle") == "blob",
w.TRAIN_TEMPLATES / w.HELDOUT_TEMPLATES, w.caption(). Every class has several names
(w.names("heart") == ("heart", "love heart", "valentine")); the last, w.heldout_name(), is kept
out of every erasure prompt, so erasure can be tested on a synonym it was not trained on.

Rebuild everything with `hirm-jax world train --out DIR` (see hirm_jax.world.train).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from hirm_jax.errors import HirmError
from hirm_jax.fileio import sha256_file as sha256
from hirm_jax.world.data import (ALL_OBJECTS, ALL_STYLES, HELDOUT_TEMPLATES, NAMES, OBJECT_ANCHOR, OBJECTS,
                                 STYLE_ANCHOR, STYLES, TRAIN_TEMPLATES, caption, heldout_name, name_of, names,
                                 render_cell, sample, super_category, trained_names)

SHIPPED = Path(__file__).parent / "shipped"
WORLD_FORMAT = 2
# Every file a world folder must hold; world.json records their sha256.
WORLD_FILES = (
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "judge/judge_config.json", "judge/judge.safetensors",
)
BACKENDS = ("torch", "jax")  # how `generate` draws pictures
# PyTorch threads while generating: once JAX has run in the process, PyTorch with 2 threads on a
# 2-core machine was measured 3-40x slower than with 1 (the thread pools fight).
TORCH_THREADS = 1
REBUILD = "rebuild it with `hirm-jax world train --out DIR` and pass that folder to load_world(DIR)"


class WorldError(HirmError, RuntimeError):
    """A world folder is missing, incomplete or corrupt."""




@dataclasses.dataclass
class World:
    path: Path
    config: dict              # world.json
    tokenizer: Any            # transformers CLIPTokenizer (77 positions, pads with <|endoftext|>)
    text_encoder_path: Path   # transformers CLIPTextModel folder: load it, erase it, pass it back
    unet: Any                 # diffusers UNet2DConditionModel (float32, eval)
    scheduler: Any            # diffusers DDIMScheduler
    judge: Any                # hirm_jax.world.judge.Judge
    backend: str = "torch"    # how `generate` draws pictures by default (BACKENDS)
    _text_encoder: Any = None

    @property
    def text_encoder(self):
        """The world's own (unerased) PyTorch CLIPTextModel, loaded on first use."""
        if self._text_encoder is None:
            from hirm_jax.world.denoiser import load_text_encoder_torch
            self._text_encoder = load_text_encoder_torch(self.text_encoder_path)
        return self._text_encoder


def _check(path: Path, verify: bool) -> dict:
    if not path.is_dir():
        raise WorldError(f"world folder {path} does not exist; {REBUILD}")
    missing = [name for name in ("world.json",) + WORLD_FILES if not (path / name).is_file()]
    if missing:
        raise WorldError(f"world folder {path} is missing {', '.join(missing)}; {REBUILD}")
    try:
        config = json.loads((path / "world.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorldError(f"{path / 'world.json'} is not valid JSON ({e}); {REBUILD}") from e
    if config.get("format") != WORLD_FORMAT:
        raise WorldError(f"{path} has world format {config.get('format')!r} but this code reads "
                         f"format {WORLD_FORMAT}; {REBUILD}")
    if verify:
        bad = [name for name in WORLD_FILES if sha256(path / name) != config.get("sha256", {}).get(name)]
        if bad:
            raise WorldError(f"world folder {path}: {', '.join(bad)} do not match the sha256 recorded "
                             f"in world.json (corrupt or edited); {REBUILD}")
    return config


def load_world(path: Optional[str | Path] = None, verify: bool = True, backend: str = "torch") -> World:
    """Load a world folder (default: the one shipped with the package), checking every file;
    `backend` is how its pictures are drawn (`generate`)."""
    from transformers import CLIPTokenizer
    from diffusers import DDIMScheduler, UNet2DConditionModel
    import torch

    from hirm_jax.world.judge import Judge

    path = Path(path) if path is not None else SHIPPED
    config = _check(path, verify)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
        unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), torch_dtype=torch.float32).eval()
        scheduler = DDIMScheduler.from_pretrained(str(path / "scheduler"))
        judge = Judge.load(path / "judge")
    except Exception as e:  # a file that passed the checksum but still does not load
        raise WorldError(f"cannot load the world in {path} ({type(e).__name__}: {e}); {REBUILD}") from e
    if tokenizer.model_max_length != 77:
        raise WorldError(f"tokenizer in {path} must have model_max_length 77 but has "
                         f"{tokenizer.model_max_length}; {REBUILD}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} but is {backend!r}")
    return World(path, config, tokenizer, path / "text_encoder", unet, scheduler, judge, backend)


def generate(world: World, text_encoder=None, prompts=(), seeds=(), steps: Optional[int] = None,
             guidance: Optional[float] = None, batch_size: int = 128, backend: Optional[str] = None):
    """Pictures [N, 32, 32, 3] uint8, one per (prompt, seed); a picture does not depend on its batch.

    text_encoder: None (the world's own), a PyTorch CLIPTextModel, or a transformers folder
    (e.g. an erased encoder saved by hirm_jax); with backend="jax" a folder or a Flax
    TextEncoder. The empty prompt for classifier-free guidance goes through the same encoder,
    as in SD pipelines.
    backend: "torch" (diffusers) or "jax" (hirm_jax.world.sample_jax: Flax UNet, no torch; its
    noise is a different stream, so its pictures differ from torch's for the same seeds);
    None: the world's (`load_world(backend=...)`).
    PyTorch generates with TORCH_THREADS threads (restored afterwards).
    """
    import copy

    backend = backend or world.backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} but is {backend!r}")
    if backend == "jax":
        from hirm_jax.world.sample_jax import generate_jax
        return generate_jax(world, text_encoder, prompts, seeds, steps, guidance, batch_size)

    import torch

    from hirm_jax.world.denoiser import embed_prompts, sample_images

    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt but got {len(prompts)} prompts and {len(seeds)} seeds")
    encoder = world.text_encoder if text_encoder is None else text_encoder
    steps = steps or world.config["sample_steps"]
    guidance = world.config["guidance"] if guidance is None else guidance
    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        embeddings = embed_prompts(world.tokenizer, encoder, prompts + [""])
        return sample_images(world.unet, copy.deepcopy(world.scheduler), embeddings[:-1], embeddings[-1],
                             seeds, steps=steps, guidance=guidance, batch_size=batch_size)
    finally:
        torch.set_num_threads(previous)


__all__ = ["ALL_OBJECTS", "ALL_STYLES", "HELDOUT_TEMPLATES", "NAMES", "OBJECT_ANCHOR", "OBJECTS", "STYLE_ANCHOR",
           "STYLES", "TRAIN_TEMPLATES", "World", "WorldError", "caption", "generate", "heldout_name", "load_world",
           "name_of", "names", "render_cell", "sample", "super_category", "trained_names"]
