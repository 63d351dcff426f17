"""Flax (linen) CLIP text transformer, numerically the Hugging Face `CLIPTextModel`.

The parameter tree mirrors the PyTorch key names so the two can be mapped by eye:

    text_model.encoder.layers.0.self_attn.q_proj.weight
    params["encoder"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]   (transposed)

Usage:

    config = TextEncoderConfig.clip_l()
    model = CLIPTextTransformer(config)
    params = model.init(jax.random.key(0), ids)["params"]
    out = model.apply({"params": params}, ids, attention_mask)
    out["last_hidden_state"], out["hidden_states"][-2], out["mlp_out"][-1], out["pooled_output"]

Every output is returned; under `jax.jit` XLA drops the ones a caller does not use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

# Hugging Face's legacy configs (SD 1.x) carry eos_token_id == 2 and pool at argmax(input_ids),
# which works because <|endoftext|> has the largest id in the CLIP vocabulary.
LEGACY_EOS_TOKEN_ID = 2

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Architecture of a CLIP text encoder; field names are Hugging Face's `CLIPTextConfig`."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: Optional[int] = None  # None: no text_projection (CLIPTextModel)
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)} but is {self.hidden_act!r}")
        if self.num_attention_heads <= 0 or self.hidden_size <= 0:
            raise ValueError(f"hidden_size and num_attention_heads must be positive but are "
                             f"{self.hidden_size} and {self.num_attention_heads}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size must be divisible by num_attention_heads but is "
                f"{self.hidden_size} with {self.num_attention_heads} heads")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)} but is {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> "TextEncoderConfig":
        return dataclasses.replace(self, **changes)

    # Reference shapes of the encoders the pipelines use.
    @classmethod
    def clip_l(cls, **kw) -> "TextEncoderConfig":
        """CLIP ViT-L/14 text: SD 1.x, SDXL `text_encoder`, Flux `text_encoder`."""
        return cls(**kw)

    @classmethod
    def openclip_h(cls, **kw) -> "TextEncoderConfig":
        """OpenCLIP ViT-H/14 text as diffusers stores it for SD 2.x (23 of 24 layers)."""
        base = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                    num_attention_heads=16, hidden_act="gelu", projection_dim=None)
        return cls(**{**base, **kw})

    @classmethod
    def openclip_bigg(cls, **kw) -> "TextEncoderConfig":
        """OpenCLIP ViT-bigG/14 text with projection: SDXL `text_encoder_2`."""
        base = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                    num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
        return cls(**{**base, **kw})

    # Hugging Face config.json <-> config.
    HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings", "hidden_act",
                 "layer_norm_eps", "projection_dim", "bos_token_id", "eos_token_id", "pad_token_id")

    @classmethod
    def from_hf_dict(cls, hf: dict, has_projection: bool) -> "TextEncoderConfig":
        kw = {k: hf[k] for k in cls.HF_FIELDS if k in hf and hf[k] is not None}
        if not has_projection:
            kw["projection_dim"] = None
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        hf = {k: getattr(self, k) for k in self.HF_FIELDS}
        hf["projection_dim"] = self.projection_dim or self.hidden_size
        hf.update(
            architectures=["CLIPTextModelWithProjection" if self.projection_dim else "CLIPTextModel"],
            model_type="clip_text_model",
            attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
            torch_dtype="float32",
        )
        return hf


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the token whose final state is the pooled output, by Hugging Face's rule."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    # First occurrence of EOS (argmax of a boolean picks the first True).
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPAttention(nn.Module):
    config: TextEncoderConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda name: nn.Dense(cfg.hidden_size, dtype=DTYPES[cfg.dtype],
                                      param_dtype=DTYPES[cfg.param_dtype], name=name)
        batch, length, _ = hidden.shape
        split = lambda x: x.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
        q = split(dense("q_proj")(hidden)) * (cfg.head_dim ** -0.5)
        k = split(dense("k_proj")(hidden))
        v = split(dense("v_proj")(hidden))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias.astype(q.dtype)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, cfg.hidden_size)
        return dense("out_proj")(attended)


class CLIPMLP(nn.Module):
    config: TextEncoderConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
        hidden = nn.Dense(cfg.intermediate_size, name="fc1", **kw)(hidden)
        hidden = ACTIVATIONS[cfg.hidden_act](hidden)
        return nn.Dense(cfg.hidden_size, name="fc2", **kw)(hidden)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block; returns (block output, MLP output before the residual add)."""

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array):
        cfg = self.config
        norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=DTYPES[cfg.dtype],
                                         param_dtype=DTYPES[cfg.param_dtype], name=name)
        hidden = hidden + CLIPAttention(cfg, name="self_attn")(norm("layer_norm1")(hidden), bias)
        mlp_out = CLIPMLP(cfg, name="mlp")(norm("layer_norm2")(hidden))
        return hidden + mlp_out, mlp_out


class CLIPLayers(nn.Module):
    """Holds the blocks under the names "0", "1", ... as PyTorch's ModuleList does."""

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array):
        hidden_states, mlp_outs = [hidden], []
        for i in range(self.config.num_hidden_layers):
            hidden, mlp_out = CLIPEncoderLayer(self.config, name=str(i))(hidden, bias)
            hidden_states.append(hidden)
            mlp_outs.append(mlp_out)
        return tuple(hidden_states), tuple(mlp_outs)


class CLIPEncoder(nn.Module):
    config: TextEncoderConfig

    @nn.compact
    def __call__(self, hidden, bias):
        return CLIPLayers(self.config, name="layers")(hidden, bias)


class CLIPEmbeddings(nn.Module):
    config: TextEncoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_embeds: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
                  embedding_init=nn.initializers.normal(0.02))
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", **kw)
        tokens = embed(input_ids) if token_embeds is None else token_embeds.astype(DTYPES[cfg.dtype])
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                             name="position_embedding", **kw)(jnp.arange(input_ids.shape[-1]))
        return tokens + positions[None]


def attention_bias(length: int, attention_mask: Optional[jax.Array], dtype) -> jax.Array:
    """Additive bias [batch or 1, 1, q, k]: causal, plus padding over keys when a mask is given."""
    allowed = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


class CLIPTextTransformer(nn.Module):
    """Returns a dict of named outputs (Hugging Face's names, plus HiRM's capture points):

    last_hidden_state  [B, T, D]  after final_layer_norm (what SD 1.x/2.x condition on)
    hidden_states      tuple of L+1 [B, T, D]: embeddings, then each block's output
    mlp_out            tuple of L [B, T, D]: each block's fc2 output, before the residual add
    pooled_output      [B, D]     last_hidden_state at the EOS position (Hugging Face's rule)
    text_embeds        [B, P]     pooled_output @ text_projection, or None without projection
    """

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                 token_embeds: Optional[jax.Array] = None) -> dict[str, Any]:
        cfg = self.config
        hidden = CLIPEmbeddings(cfg, name="embeddings")(input_ids, token_embeds)
        bias = attention_bias(input_ids.shape[-1], attention_mask, jnp.float32)
        hidden_states, mlp_outs = CLIPEncoder(cfg, name="encoder")(hidden, bias)
        last = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=DTYPES[cfg.dtype],
                            param_dtype=DTYPES[cfg.param_dtype], name="final_layer_norm")(hidden_states[-1])
        positions = pooled_positions(input_ids, cfg.eos_token_id)
        pooled = jnp.take_along_axis(last, positions[:, None, None], axis=1)[:, 0]
        text_embeds = None
        if cfg.projection_dim:
            text_embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=DTYPES[cfg.dtype],
                                   param_dtype=DTYPES[cfg.param_dtype], name="text_projection")(pooled)
        return dict(last_hidden_state=last, hidden_states=hidden_states, mlp_out=mlp_outs,
                    pooled_output=pooled, text_embeds=text_embeds)


@dataclasses.dataclass
class TextEncoder:
    """A CLIP text encoder: its config, its parameters, and a pure `apply`.

    `apply(params, input_ids, attention_mask=None)` is a pure function of its arguments,
    safe to `jax.jit`, `jax.grad` and `jax.vmap`; `params` is any tree shaped like `.params`.
    """

    config: TextEncoderConfig
    params: Any

    @property
    def module(self) -> CLIPTextTransformer:
        return CLIPTextTransformer(self.config)

    def apply(self, params, input_ids, attention_mask=None, token_embeds=None) -> dict[str, Any]:
        """`token_embeds` ([B, T, D]) replaces the token-embedding lookup (soft prompts, gradients
        through one-hot tokens); `input_ids` still place the pooled (EOS) output."""
        return self.module.apply({"params": params}, input_ids, attention_mask, token_embeds)

    @classmethod
    def init(cls, config: TextEncoderConfig, seed: int = 0, length: int = 77) -> "TextEncoder":
        """Random weights (for tests and benchmarks)."""
        ids = jnp.zeros((1, length), jnp.int32)
        params = CLIPTextTransformer(config).init(jax.random.key(seed), ids)["params"]
        return cls(config, params)

    def param_shapes(self):
        """The tree of `jax.ShapeDtypeStruct` this config expects (no memory allocated)."""
        ids = jax.ShapeDtypeStruct((1, self.config.max_position_embeddings), jnp.int32)
        return jax.eval_shape(self.module.init, jax.random.key(0), ids)["params"]
