"""`hirm-jax generate --backend jax`: an SD 1.x / 2.x diffusers folder drawn with the Flax CLIP
encoder, UNet and VAE and the JAX DDIM sampler, with no torch; HiRM deltas applied in memory to
the Flax encoder (every fingerprint checked first); schedulers `ddim`, `euler` and `pndm` (PLMS,
what SD 1.x ships), by default the folder's own.

    pipe = JaxSDPipeline.load("/models/sd15", deltas=["deltas/vangogh"])
    images = pipe.images(prompts, seeds, steps=25, guidance=7.5, height=512, width=512)   # uint8 [B, H, W, 3]

The whole sampler (CFG batched with the conditional pass, DDIM as one lax.scan, the VAE decode)
is one jitted function per (shape, steps, scheduler). Each image's starting latents come from
`jax.random` keyed by its seed (a different stream from torch's, so images differ between
backends), or are given (`latents`, diffusers' layout [B, 4, H/8, W/8], before
init_noise_sigma), with which both backends draw the same image.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hirm_jax.artifacts.delta import DeltaError, FingerprintError, check_fingerprint, load_delta, local_key
from hirm_jax.encoder.files import read_json
from hirm_jax.errors import HirmError
from hirm_jax.pipelines import schedulers
from hirm_jax.pipelines.diffusers_weights import load_unet, load_vae
from hirm_jax.pipelines.vae import to_uint8

JAX_SCHEDULERS = ("ddim", "euler", "pndm")
# A folder's own scheduler class, as the name --scheduler would give it.
OWN_SCHEDULERS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler", "PNDMScheduler": "pndm"}
SAFETENSORS_PRECISION = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class JaxBackendError(HirmError, ValueError):
    """A request the JAX backend does not serve (a family, scheduler or dtype not built)."""


def apply_delta_to_flax(encoder, delta_dir: str | os.PathLike, component: str, stored: dict[str, str]):
    """The Flax CLIP `encoder` with the delta's `component` tensors in place of its own; every
    fingerprint is checked against the weights as stored (`stored`: key -> precision) first."""
    from hirm_jax.encoder.clip import TextEncoder
    from hirm_jax.encoder.clip_weights import flax_to_hf, hf_to_flax
    delta = load_delta(delta_dir)
    tensors = delta.components().get(component)
    if tensors is None:
        raise DeltaError(f"delta {delta_dir} patches {sorted(delta.components())}, not {component}")
    state = flax_to_hf(encoder.params, encoder.config)
    errors = []
    for canonical, value in sorted(tensors.items()):
        name = local_key(canonical, state)
        if name is None or state[name].shape != value.shape:
            errors.append(f"{component}.{canonical}: the encoder has no parameter of shape {value.shape} there")
            continue
        error = check_fingerprint(f"{component}.{canonical}", component, np.asarray(state[name], np.float32),
                                  stored.get(canonical, "float32"), delta.entry(component, canonical))
        if error:
            errors.append(error)
        state[name] = value
    if errors:
        raise FingerprintError(f"the delta does not fit this pipeline ({len(errors)} problem(s)). No weight was "
                               "changed.\n  " + "\n  ".join(errors))
    return TextEncoder(encoder.config, hf_to_flax(state, encoder.config))


def stored_precisions(folder: Path) -> dict[str, str]:
    """{canonical key: storage precision} of a text encoder folder's safetensors."""
    from safetensors import safe_open

    from hirm_jax.encoder.files import weight_files
    from hirm_jax.encoder.hf_names import canonical_name
    found = {}
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="numpy") as f:
                found.update({canonical_name(k): SAFETENSORS_PRECISION.get(f.get_slice(k).get_dtype(), "float32")
                              for k in f.keys()})
    return found


@dataclasses.dataclass
class JaxSDPipeline:
    tokenizer: object
    encoder: object  # Flax TextEncoder (deltas applied)
    unet: object
    vae: object
    scheduler_config: dict
    scheduler_name: str = "ddim"

    @classmethod
    def load(cls, pipeline_dir: str | os.PathLike, deltas: Sequence[str | os.PathLike] = (), dtype: str = "float32",
             scheduler: Optional[str] = None) -> "JaxSDPipeline":
        from hirm_jax.encoder.layouts import load_text_encoder
        from hirm_jax.encoder.tokenizer import load_clip_tokenizer
        pipeline_dir = Path(pipeline_dir)
        scheduler_config = read_json(pipeline_dir / "scheduler" / "scheduler_config.json")
        own = (read_json(pipeline_dir / "model_index.json").get("scheduler") or [None, None])[1]  # as diffusers picks
        scheduler = scheduler or OWN_SCHEDULERS.get(own, own)
        if scheduler not in JAX_SCHEDULERS:
            raise JaxBackendError(f"--backend jax implements the schedulers {list(JAX_SCHEDULERS)} so far, but "
                                  f"--scheduler is {scheduler!r}: pass one of them (or --backend torch)")
        if dtype not in ("float32", "bfloat16"):
            raise JaxBackendError(f"--backend jax computes in float32 or bfloat16, not {dtype!r}")
        encoder = load_text_encoder(pipeline_dir, "text_encoder")
        for delta_dir in deltas:
            encoder = apply_delta_to_flax(encoder, delta_dir, "text_encoder",
                                          stored_precisions(pipeline_dir / "text_encoder"))
        return cls(load_clip_tokenizer(pipeline_dir / "tokenizer"), encoder, load_unet(pipeline_dir / "unet", dtype),
                   load_vae(pipeline_dir / "vae", dtype), scheduler_config, scheduler)

    def latent_shape(self, height: int, width: int) -> tuple:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.unet.config.in_channels, height // factor, width // factor)

    def images(self, prompts: Sequence, seeds: Sequence[int], steps: int, guidance: float, height: int, width: int,
               latents: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 [B, H, W, 3]; a prompt is a string or a row of token ids (attacks.jsonl)."""
        from hirm_jax.encoder.tokenizer import prompt_ids
        shape = self.latent_shape(height, width)
        if latents is None:
            latents = schedulers.noise(seeds, shape)
        ids = prompt_ids(self.tokenizer, list(prompts) + [""], self.encoder.config.max_position_embeddings)
        states = self.encoder.apply(self.encoder.params, ids, None)["last_hidden_state"]
        run = _sampler(self.unet.config, self.vae.config, steps, self.scheduler_name, _frozen(self.scheduler_config))
        decoded = run(self.unet.params, self.vae.params, states[:-1], states[-1:], jnp.float32(guidance),
                      jnp.asarray(latents, jnp.float32))
        return to_uint8(decoded)


def _frozen(config: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()))


@functools.lru_cache(maxsize=8)
def _sampler(unet_config, vae_config, steps: int, scheduler_name: str, scheduler_items: tuple):
    from hirm_jax.pipelines.unet import UNet
    from hirm_jax.pipelines.vae import VAE
    scheduler = schedulers.from_name(scheduler_name, dict(scheduler_items), steps)

    @jax.jit
    def run(unet_params, vae_params, cond, uncond, guidance, latents):
        x = schedulers.guided_sample(UNet(unet_config, unet_params).apply, scheduler, cond, uncond, guidance, latents)
        return VAE(vae_config, vae_params).decode(x)
    return run
