"""Flax (linen) UNet2DConditionModel, numerically diffusers' for the SD families: SD 1.x, SD 2.x
(linear projections, per-block head counts, upcast attention, v-prediction is the scheduler's
business), SDXL (text_time added conditioning, several transformer layers per block) and the
demo world's denoiser. No torch: weights come from a diffusers folder (`diffusers_weights`).

Module names are diffusers' own dotted names, so a parameter's path joined with '.' IS its
diffusers key (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` / `kernel` ->
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`). Arrays are NHWC inside;
`UNet.apply` takes and returns NCHW, as diffusers does.

    unet = load_unet("/models/sd15/unet")                        # hirm_jax.pipelines.diffusers_weights
    eps = unet.apply(latents_nchw, timesteps, text_states)       # [B, 4, 64, 64]
    eps = unet.apply(x, t, states, added={"text_embeds": pooled, "time_ids": ids})   # SDXL
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hirm_jax.encoder.clip import DTYPES  # compute dtypes by name, as the encoders take them
from hirm_jax.errors import HirmError

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
# Fields whose non-default values select parts of diffusers' UNet this module does not build.
UNSUPPORTED = dict(center_input_sample=False, class_embed_type=None, num_class_embeds=None, encoder_hid_dim=None,
                   encoder_hid_dim_type=None, dual_cross_attention=False, only_cross_attention=False,
                   resnet_time_scale_shift="default", resnet_skip_time_act=False, time_embedding_type="positional",
                   time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None,
                   time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3, attention_type="default",
                   class_embeddings_concat=False, cross_attention_norm=None, act_fn="silu",
                   mid_block_only_cross_attention=None, reverse_transformer_layers_per_block=None)


class UNetConfigError(HirmError, ValueError):
    """A UNet config this module cannot build: names the field, its value and what is supported."""


def _per_block(value, count: int, field: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * count
    if len(values) != count:
        raise UNetConfigError(f"UNet config {field} must have one entry per block ({count}) but is {value!r}")
    return values


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of a diffusers UNet2DConditionModel config.json that shape the computation."""
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    num_attention_heads: tuple = (8, 8, 8, 8)  # per down block (diffusers' legacy `attention_head_dim`)
    transformer_layers_per_block: tuple = (1, 1, 1, 1)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: Optional[str] = None  # None, or "text_time" (SDXL)
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    resnet_out_scale_factor: float = 1.0
    sample_size: Any = None
    dtype: str = "float32"  # compute dtype; parameters stay as loaded

    @classmethod
    def from_diffusers(cls, config: dict, dtype: str = "float32") -> "UNetConfig":
        """From a diffusers config.json; a feature this module does not build is an error naming it."""
        for field, default in UNSUPPORTED.items():
            value = config.get(field, default)
            if any(v != default for v in (value if isinstance(value, (list, tuple)) else [value])):
                raise UNetConfigError(f"UNet config {field}={value!r} is not supported (supported: {default!r})")
        blocks = len(config["block_out_channels"])
        for name, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            bad = [t for t in config[name] if t not in allowed]
            if bad:
                raise UNetConfigError(f"UNet config {name} has {bad}; supported: {list(allowed)}")
        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in ("UNetMidBlock2DCrossAttn", None):
            raise UNetConfigError(f"UNet config mid_block_type={config['mid_block_type']!r} is not supported "
                                  "(supported: 'UNetMidBlock2DCrossAttn' or null)")
        if config.get("addition_embed_type") not in (None, "text_time"):
            raise UNetConfigError(f"UNet config addition_embed_type={config['addition_embed_type']!r} is not "
                                  "supported (supported: null, 'text_time')")
        if isinstance(config.get("layers_per_block", 2), (list, tuple)) or isinstance(
                config.get("cross_attention_dim", 768), (list, tuple)):
            raise UNetConfigError("UNet config with per-block layers_per_block or cross_attention_dim is not supported")
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        layers = config.get("transformer_layers_per_block", 1)
        if any(isinstance(x, (list, tuple)) for x in _per_block(layers, blocks, "transformer_layers_per_block")):
            raise UNetConfigError("UNet config with per-layer transformer_layers_per_block lists is not supported")
        return cls(
            in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
            down_block_types=tuple(config["down_block_types"]), up_block_types=tuple(config["up_block_types"]),
            mid_block_type=config.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config.get("layers_per_block", 2), downsample_padding=config.get("downsample_padding", 1),
            mid_block_scale_factor=config.get("mid_block_scale_factor", 1.0),
            norm_num_groups=config.get("norm_num_groups", 32), norm_eps=config.get("norm_eps", 1e-5),
            cross_attention_dim=config.get("cross_attention_dim", 768),
            num_attention_heads=_per_block(heads, blocks, "attention_head_dim"),
            transformer_layers_per_block=_per_block(layers, blocks, "transformer_layers_per_block"),
            use_linear_projection=config.get("use_linear_projection", False),
            upcast_attention=config.get("upcast_attention", False) or False,
            flip_sin_to_cos=config.get("flip_sin_to_cos", True), freq_shift=config.get("freq_shift", 0),
            addition_embed_type=config.get("addition_embed_type"),
            addition_time_embed_dim=config.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim"),
            resnet_out_scale_factor=config.get("resnet_out_scale_factor", 1.0),
            sample_size=tuple(size) if isinstance(size := config.get("sample_size"), list) else size, dtype=dtype)


# ----------------------------------------------------------------------------- layers

def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, shift: float) -> jax.Array:
    """diffusers' get_timestep_embedding (max period 10000): [N] -> [N, dim] float32."""
    half = dim // 2
    exponent = -math.log(10000) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], -1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], -1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def dense(features: int, name: str, dtype, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name)


def conv(features: int, name: str, dtype, kernel: int = 3, stride: int = 1, padding: int = 1) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), (stride, stride), ((padding, padding),) * 2, dtype=dtype, name=name)


def group_norm(groups: int, eps: float, name: str, dtype) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class TimestepEmbedding(nn.Module):
    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        x = nn.silu(dense(self.features, "linear_1", self.dtype)(x))
        return dense(self.features, "linear_2", self.dtype)(x)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D ("default" time embedding norm; no time embedding in a VAE)."""
    features: int
    groups: int
    eps: float
    dtype: Any
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
        h = conv(self.features, "conv1", self.dtype)(h)
        if temb is not None:
            h = h + dense(self.features, "time_emb_proj", self.dtype)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
        h = conv(self.features, "conv2", self.dtype)(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, "conv_shortcut", self.dtype, kernel=1, padding=0)(x)
        return (x + h) / self.output_scale_factor


def _resnet(features: int, cfg: UNetConfig, scale: float, name: str) -> ResnetBlock2D:
    return ResnetBlock2D(features, cfg.norm_num_groups, cfg.norm_eps, DTYPES[cfg.dtype], scale, name=name)


class Attention(nn.Module):
    """diffusers' Attention (no bias on q/k/v, `to_out.0` with bias), scale head_dim^-0.5; the
    softmax in float32 (what upcast_attention asks for; exact in float32 compute)."""
    heads: int
    features: int
    dtype: Any
    qkv_bias: bool = False  # True in the VAE's attention

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        q, k, v = (dense(self.features, n, self.dtype, use_bias=self.qkv_bias)(y)
                   for n, y in (("to_q", x), ("to_k", context), ("to_v", context)))
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.features // self.heads)
        q, k, v = split(q), split(k), split(v)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(self.features // self.heads)
        weights = jax.nn.softmax(scores, -1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:2], self.features)
        return dense(self.features, "to_out.0", self.dtype)(out)


class BasicTransformerBlock(nn.Module):
    heads: int
    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x, context):
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, name=name)
        x = x + Attention(self.heads, self.features, self.dtype, name="attn1")(norm("norm1")(x))
        x = x + Attention(self.heads, self.features, self.dtype, name="attn2")(norm("norm2")(x), context)
        hidden, gate = jnp.split(dense(8 * self.features, "ff.net.0.proj", self.dtype)(norm("norm3")(x)), 2, -1)
        return x + dense(self.features, "ff.net.2", self.dtype)(hidden * jax.nn.gelu(gate, approximate=False))


class Transformer2DModel(nn.Module):
    heads: int
    layers: int
    config: UNetConfig

    @nn.compact
    def __call__(self, x, context):
        cfg, dtype = self.config, DTYPES[self.config.dtype]
        b, hgt, wid, c = x.shape
        h = group_norm(cfg.norm_num_groups, 1e-6, "norm", dtype)(x)
        project = (lambda n: dense(c, n, dtype)) if cfg.use_linear_projection else (
            lambda n: conv(c, n, dtype, kernel=1, padding=0))
        if cfg.use_linear_projection:
            h = project("proj_in")(h.reshape(b, hgt * wid, c))
        else:
            h = project("proj_in")(h).reshape(b, hgt * wid, c)
        for i in range(self.layers):
            h = BasicTransformerBlock(self.heads, c, dtype, name=f"transformer_blocks.{i}")(h, context)
        if cfg.use_linear_projection:
            h = project("proj_out")(h).reshape(b, hgt, wid, c)
        else:
            h = project("proj_out")(h.reshape(b, hgt, wid, c))
        return h + x


def upsample(x, features: int, dtype, name: str):
    """Nearest 2x, then a 3x3 conv (diffusers' Upsample2D)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)  # nearest
    return conv(features, name, dtype)(x)


class UNet2DConditionModel(nn.Module):
    """diffusers' UNet2DConditionModel (NHWC): sample [B, H, W, C], timesteps [B], context [B, T, D]."""
    config: UNetConfig

    @nn.compact
    def __call__(self, sample, timesteps, context, added: Optional[dict] = None):
        cfg, dtype = self.config, DTYPES[self.config.dtype]
        channels = cfg.block_out_channels
        temb = timestep_embedding(timesteps, channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(dtype)
        temb = TimestepEmbedding(4 * channels[0], dtype, name="time_embedding")(temb)
        if cfg.addition_embed_type == "text_time":
            temb = temb + self._added_embedding(added, dtype)
        h = conv(channels[0], "conv_in", dtype)(sample.astype(dtype))
        skips = [h]
        for i, kind in enumerate(cfg.down_block_types):
            h, outputs = self._down_block(i, kind, h, temb, context)
            skips += outputs
        if cfg.mid_block_type:
            h = _resnet(channels[-1], cfg, cfg.mid_block_scale_factor, "mid_block.resnets.0")(h, temb)
            h = Transformer2DModel(cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1], cfg,
                                   name="mid_block.attentions.0")(h, context)
            h = _resnet(channels[-1], cfg, cfg.mid_block_scale_factor, "mid_block.resnets.1")(h, temb)
        for i, kind in enumerate(cfg.up_block_types):
            count = cfg.layers_per_block + 1
            h = self._up_block(i, kind, h, skips[-count:], temb, context)
            skips = skips[:-count]
        h = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", dtype)(h))
        return conv(cfg.out_channels, "conv_out", dtype)(h)

    def _added_embedding(self, added: Optional[dict], dtype):
        cfg = self.config
        if not added or "text_embeds" not in added or "time_ids" not in added:
            raise UNetConfigError("this UNet (addition_embed_type='text_time', SDXL) needs added conditions "
                                  "{'text_embeds': [B, P], 'time_ids': [B, 6]}")
        time_ids = added["time_ids"]
        times = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                   cfg.freq_shift).reshape(time_ids.shape[0], -1)
        embeds = jnp.concatenate([added["text_embeds"].astype(jnp.float32), times], -1).astype(dtype)
        return TimestepEmbedding(4 * cfg.block_out_channels[0], dtype, name="add_embedding")(embeds)

    def _down_block(self, i: int, kind: str, h, temb, context):
        cfg, dtype = self.config, DTYPES[self.config.dtype]
        features, outputs = cfg.block_out_channels[i], []
        for j in range(cfg.layers_per_block):
            h = _resnet(features, cfg, cfg.resnet_out_scale_factor, f"down_blocks.{i}.resnets.{j}")(h, temb)
            if kind == "CrossAttnDownBlock2D":
                h = Transformer2DModel(cfg.num_attention_heads[i], cfg.transformer_layers_per_block[i], cfg,
                                       name=f"down_blocks.{i}.attentions.{j}")(h, context)
            outputs.append(h)
        if i < len(cfg.block_out_channels) - 1:
            h = conv(features, f"down_blocks.{i}.downsamplers.0.conv", dtype, stride=2,
                      padding=cfg.downsample_padding)(h)
            outputs.append(h)
        return h, outputs

    def _up_block(self, i: int, kind: str, h, skips: Sequence, temb, context):
        cfg, dtype = self.config, DTYPES[self.config.dtype]
        reversed_heads = cfg.num_attention_heads[::-1]
        reversed_layers = cfg.transformer_layers_per_block[::-1]
        features = cfg.block_out_channels[::-1][i]
        for j, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip], -1)
            h = _resnet(features, cfg, cfg.resnet_out_scale_factor, f"up_blocks.{i}.resnets.{j}")(h, temb)
            if kind == "CrossAttnUpBlock2D":
                h = Transformer2DModel(reversed_heads[i], reversed_layers[i], cfg,
                                       name=f"up_blocks.{i}.attentions.{j}")(h, context)
        if i < len(cfg.block_out_channels) - 1:
            h = upsample(h, features, dtype, f"up_blocks.{i}.upsamplers.0.conv")
        return h


@dataclasses.dataclass
class UNet:
    """A UNet2DConditionModel with its parameters; `apply` is NCHW in and out, as diffusers."""
    config: UNetConfig
    params: dict
    source_config: dict = dataclasses.field(default_factory=dict)  # the folder's config.json, saved back

    @property
    def module(self) -> UNet2DConditionModel:
        return UNet2DConditionModel(self.config)

    def apply(self, sample, timesteps, context, added: Optional[dict] = None, params=None):
        """The model output [B, C, H, W] float32 (jitted; inside a caller's jit it is traced)."""
        return _apply(self.config, self.params if params is None else params, sample,
                      jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],)), context, added)


@functools.partial(jax.jit, static_argnums=0)
def _apply(config: UNetConfig, params, sample, timesteps, context, added):
    out = UNet2DConditionModel(config).apply({"params": params}, jnp.transpose(sample, (0, 2, 3, 1)), timesteps,
                                            context, added)
    return jnp.transpose(out, (0, 3, 1, 2)).astype(jnp.float32)
