"""Flax AutoencoderKL decoding, numerically diffusers' (SD 1.x / 2.x / XL, Flux): latents ->
pictures. Module names are diffusers' dotted names (see hirm_jax.pipelines.unet); the encoder
half is not built (its keys are skipped when a folder is read).

    vae = load_vae("/models/sd15/vae")                  # hirm_jax.pipelines.diffusers_weights
    pictures = vae.decode(latents_nchw)                 # [B, 3, H, W] in about [-1, 1]
    uint8 = to_uint8(pictures)                          # [B, H, W, 3], as diffusers' postprocess
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hirm_jax.pipelines.unet import DTYPES, ResnetBlock2D, UNetConfigError, conv, group_norm, upsample

SUPPORTED = dict(act_fn="silu", norm_type="group", mid_block_add_attention=True)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers AutoencoderKL config.json that shape decoding."""
    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    dtype: str = "float32"

    @classmethod
    def from_diffusers(cls, config: dict, dtype: str = "float32") -> "VAEConfig":
        for field, value in SUPPORTED.items():
            if config.get(field, value) != value:
                raise UNetConfigError(f"VAE config {field}={config[field]!r} is not supported (supported: {value!r})")
        bad = [t for t in config.get("up_block_types", ()) if t != "UpDecoderBlock2D"]
        if bad:
            raise UNetConfigError(f"VAE config up_block_types has {bad}; supported: ['UpDecoderBlock2D']")
        return cls(latent_channels=config.get("latent_channels", 4), out_channels=config.get("out_channels", 3),
                   block_out_channels=tuple(config.get("block_out_channels", (64,))),
                   layers_per_block=config.get("layers_per_block", 1), norm_num_groups=config.get("norm_num_groups", 32),
                   use_post_quant_conv=config.get("use_post_quant_conv", True),
                   scaling_factor=config.get("scaling_factor", 0.18215), shift_factor=config.get("shift_factor"),
                   dtype=dtype)


class VAEAttention(nn.Module):
    """The VAE's single-head self-attention over pixels: group norm, q/k/v with bias, residual."""
    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = group_norm(self.groups, 1e-6, "group_norm", self.dtype)(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        scores = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / np.sqrt(c)
        out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(scores, -1).astype(v.dtype), v)
        return x + nn.Dense(c, dtype=self.dtype, name="to_out.0")(out).reshape(b, h, w, c)


class Decoder(nn.Module):
    """post_quant_conv + diffusers' Decoder (NHWC): latents [B, h, w, C] -> pictures [B, H, W, 3]."""
    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg, dtype = self.config, DTYPES[self.config.dtype]
        channels = cfg.block_out_channels[::-1]
        resnet = lambda features, name: ResnetBlock2D(features, cfg.norm_num_groups, 1e-6, dtype, name=name)
        z = z.astype(dtype)
        if cfg.use_post_quant_conv:
            z = conv(cfg.latent_channels, "post_quant_conv", dtype, kernel=1, padding=0)(z)
        h = conv(channels[0], "decoder.conv_in", dtype)(z)
        h = resnet(channels[0], "decoder.mid_block.resnets.0")(h)
        h = VAEAttention(cfg.norm_num_groups, dtype, name="decoder.mid_block.attentions.0")(h)
        h = resnet(channels[0], "decoder.mid_block.resnets.1")(h)
        for i, features in enumerate(channels):
            for j in range(cfg.layers_per_block + 1):
                h = resnet(features, f"decoder.up_blocks.{i}.resnets.{j}")(h)
            if i < len(channels) - 1:
                h = upsample(h, features, dtype, f"decoder.up_blocks.{i}.upsamplers.0.conv")
        h = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, "decoder.conv_norm_out", dtype)(h))
        return conv(cfg.out_channels, "decoder.conv_out", dtype)(h)


@dataclasses.dataclass
class VAE:
    config: VAEConfig
    params: dict
    source_config: dict = dataclasses.field(default_factory=dict)

    def decode(self, latents) -> jax.Array:
        """Pictures [B, 3, H, W] float32 from a pipeline's latents [B, C, h, w] (unscaled here:
        latents / scaling_factor (+ shift_factor) as the pipeline does)."""
        z = latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)
        return _decode(self.config, self.params, z)


@functools.partial(jax.jit, static_argnums=0)
def _decode(config: VAEConfig, params, z):
    out = Decoder(config).apply({"params": params}, jnp.transpose(z, (0, 2, 3, 1)))
    return jnp.transpose(out, (0, 3, 1, 2)).astype(jnp.float32)


def to_uint8(pictures) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, as diffusers' image processor does."""
    x = np.clip(np.asarray(pictures, np.float32) / 2 + 0.5, 0, 1)
    return np.round(x * 255).astype(np.uint8).transpose(0, 2, 3, 1)
