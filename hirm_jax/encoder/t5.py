"""Flax (linen) T5 encoder, numerically the Hugging Face `T5EncoderModel`.

T5 v1.1 / T5-XXL is Flux's `text_encoder_2` and SD3's `text_encoder_3`; the original T5 (v1.0,
`feed_forward_proj="relu"`) is supported too. The architecture, as transformers implements it:

- token embedding `shared` (the encoder's `embed_tokens` is the same tensor), no absolute positions;
- pre-norm blocks with RMS norm (`T5LayerNorm`: no mean subtraction, no bias, statistics in float32);
- self-attention without 1/sqrt(d_kv) scaling (T5 folds it into the initialisation), plus a
  relative position bias: bidirectional log-spaced buckets looked up in a [num_buckets, heads]
  table that block 0 holds and every block uses;
- feed-forward `wo(act(wi_0 x) * wi_1 x)` (gated, T5 v1.1: gelu_new) or `wo(act(wi x))` (v1.0: relu);
- a final RMS norm.

The parameter tree mirrors the PyTorch keys (see `hirm_jax.encoder.t5_weights.T5_MAPPING_TABLE`):

    encoder.block.0.layer.0.SelfAttention.q.weight
    params["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]["kernel"]   (transposed)

Usage:

    config = T5EncoderConfig.t5_v1_1_xxl()
    encoder = T5Encoder.init(config.replace(num_layers=2), seed=0)
    out = encoder.apply(encoder.params, input_ids, attention_mask)     # pure: jit / grad / vmap
    out["last_hidden_state"], out["hidden_states"][-1], out["mlp_out"][-1]

Every output is returned; under `jax.jit` XLA drops the ones a caller does not use.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

log = logging.getLogger(__name__)

# transformers' ACT2FN names for the activations T5 checkpoints use.
T5_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_feed_forward_proj(feed_forward_proj: str) -> tuple[str, bool]:
    """(dense_act_fn, is_gated_act) as `T5Config` derives them: "gated-gelu" -> ("gelu_new", True)."""
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj must be 'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu') "
                         f"but is {feed_forward_proj!r}")
    act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
    return act, len(parts) == 2


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """Architecture of a T5 encoder; field names are Hugging Face's `T5Config`.

    `dense_act_fn` and `is_gated_act` follow from `feed_forward_proj` as in transformers
    ("gated-gelu" = T5 v1.1, gated gelu_new; "relu" = T5 v1.0).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    pad_token_id: int = 0
    eos_token_id: int = 1
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        act, _ = parse_feed_forward_proj(self.feed_forward_proj)
        if act not in T5_ACTIVATIONS:
            raise ValueError(f"the activation of feed_forward_proj {self.feed_forward_proj!r} must be one of "
                             f"{sorted(T5_ACTIVATIONS)} but is {act!r}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be at least 4 (bidirectional buckets, half "
                             f"of them exact) but is {self.relative_attention_num_buckets}")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(f"relative_attention_max_distance must exceed relative_attention_num_buckets // 4 = "
                             f"{self.relative_attention_num_buckets // 4} but is {self.relative_attention_max_distance}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)} but is {getattr(self, name)!r}")

    @property
    def dense_act_fn(self) -> str:
        return parse_feed_forward_proj(self.feed_forward_proj)[0]

    @property
    def is_gated_act(self) -> bool:
        return parse_feed_forward_proj(self.feed_forward_proj)[1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    # transformers' attribute_map names, so code written for CLIP configs can read them.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def intermediate_size(self) -> int:
        return self.d_ff

    @property
    def projection_dim(self) -> None:
        return None  # T5 has no pooled output nor text projection

    def replace(self, **changes) -> "T5EncoderConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def t5_v1_1_xxl(cls, **kw) -> "T5EncoderConfig":
        """T5 v1.1 XXL encoder: Flux `text_encoder_2`, SD3 `text_encoder_3` (4.7 B parameters)."""
        base = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                    feed_forward_proj="gated-gelu")
        return cls(**{**base, **kw})

    # Hugging Face config.json <-> config.
    HF_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
                 "feed_forward_proj", "pad_token_id", "eos_token_id")

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "T5EncoderConfig":
        """From a `T5Config` dict (config.json). As in transformers, `feed_forward_proj` decides the
        activation; `dense_act_fn` / `is_gated_act` stored beside it are checked against it."""
        kw = {k: hf[k] for k in cls.HF_FIELDS if k in hf and hf[k] is not None}
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        config = cls(**kw)
        stored = {k: hf[k] for k in ("dense_act_fn", "is_gated_act") if k in hf}
        derived = {"dense_act_fn": config.dense_act_fn, "is_gated_act": config.is_gated_act}
        differ = {k: v for k, v in stored.items() if v != derived[k]}
        if differ:
            log.warning("config.json has %s, which disagree with feed_forward_proj %r; following "
                        "feed_forward_proj (%s) as transformers does", differ, config.feed_forward_proj, derived)
        return config

    def to_hf_dict(self) -> dict:
        hf = {k: getattr(self, k) for k in self.HF_FIELDS}
        hf.update(
            architectures=["T5EncoderModel"], model_type="t5",
            dense_act_fn=self.dense_act_fn, is_gated_act=self.is_gated_act,
            num_decoder_layers=self.num_layers, is_encoder_decoder=False, is_decoder=False, use_cache=False,
            dropout_rate=0.1, initializer_factor=1.0, classifier_dropout=0.0, tie_word_embeddings=True,
            decoder_start_token_id=self.pad_token_id, torch_dtype="float32",
        )
        return hf


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of (key position - query position), [query_length, key_length] int32.

    Half of the buckets are for keys after the query. Within a half, distances below
    num_buckets // 4 get a bucket each; larger ones share log-spaced buckets up to max_distance,
    beyond which they all fall in the last. Computed with numpy at trace time (the lengths are
    static), in float32 as transformers does; tested equal to its buckets for |d| <= 20000.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
              / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = np.minimum(exact + scaled.astype(np.int64), half - 1)
    buckets = (relative > 0) * half + np.where(distance < exact, distance, large)
    return buckets.astype(np.int32)


class T5RMSNorm(nn.Module):
    """T5LayerNorm: x / sqrt(mean(x^2) + eps) * scale, the statistics in float32."""

    epsilon: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def _normal(std: float):
    return nn.initializers.normal(std)


def _dense(cfg: T5EncoderConfig, features: int, std: float, name: str) -> nn.Dense:
    # transformers' T5 initialisation (initializer_factor 1): a plain normal, scaled per matrix.
    return nn.Dense(features, use_bias=False, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
                    kernel_init=_normal(std), name=name)


class T5SelfAttention(nn.Module):
    """Unscaled multi-head self-attention plus the relative position bias.

    Block 0 holds `relative_attention_bias` and computes the bias [1, H, T, T]; the others
    receive it. Returns (attention output, position bias)."""

    config: T5EncoderConfig
    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, hidden: jax.Array, position_bias: Optional[jax.Array], mask_bias: jax.Array):
        cfg = self.config
        batch, length, _ = hidden.shape
        split = lambda x: x.reshape(batch, length, cfg.num_heads, cfg.d_kv)
        q = split(_dense(cfg, cfg.inner_dim, (cfg.d_model * cfg.d_kv) ** -0.5, "q")(hidden))
        k = split(_dense(cfg, cfg.inner_dim, cfg.d_model ** -0.5, "k")(hidden))
        v = split(_dense(cfg, cfg.inner_dim, cfg.d_model ** -0.5, "v")(hidden))
        if self.has_relative_attention_bias:
            table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                             param_dtype=DTYPES[cfg.param_dtype], embedding_init=_normal(cfg.d_model ** -0.5),
                             name="relative_attention_bias")
            buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)
            position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None].astype(jnp.float32)
        elif position_bias is None:
            raise ValueError("only block 0 holds the relative attention bias; later blocks must be given it")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores + position_bias + mask_bias, axis=-1).astype(v.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, cfg.inner_dim)
        return _dense(cfg, cfg.d_model, cfg.inner_dim ** -0.5, "o")(attended), position_bias


class T5DenseReluDense(nn.Module):
    """Feed-forward: wo(act(wi_0 x) * wi_1 x) when gated (T5 v1.1), wo(act(wi x)) otherwise."""

    config: T5EncoderConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        cfg = self.config
        act = T5_ACTIVATIONS[cfg.dense_act_fn]
        std_in = cfg.d_model ** -0.5
        if cfg.is_gated_act:
            hidden = act(_dense(cfg, cfg.d_ff, std_in, "wi_0")(hidden)) * _dense(cfg, cfg.d_ff, std_in, "wi_1")(hidden)
        else:
            hidden = act(_dense(cfg, cfg.d_ff, std_in, "wi")(hidden))
        return _dense(cfg, cfg.d_model, cfg.d_ff ** -0.5, "wo")(hidden)


def _norm(cfg: T5EncoderConfig, name: str) -> T5RMSNorm:
    return T5RMSNorm(cfg.layer_norm_epsilon, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype], name=name)


class T5LayerSelfAttention(nn.Module):
    config: T5EncoderConfig
    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, hidden, position_bias, mask_bias):
        attended, position_bias = T5SelfAttention(self.config, self.has_relative_attention_bias,
                                                  name="SelfAttention")(
            _norm(self.config, "layer_norm")(hidden), position_bias, mask_bias)
        return hidden + attended, position_bias


class T5LayerFF(nn.Module):
    """Returns (block output, feed-forward output before the residual add)."""

    config: T5EncoderConfig

    @nn.compact
    def __call__(self, hidden):
        ff_out = T5DenseReluDense(self.config, name="DenseReluDense")(_norm(self.config, "layer_norm")(hidden))
        return hidden + ff_out, ff_out


class T5BlockLayers(nn.Module):
    """A block's sub-layers under the names "0" (self-attention) and "1" (feed-forward), as
    PyTorch's `T5Block.layer` ModuleList holds them."""

    config: T5EncoderConfig
    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, hidden, position_bias, mask_bias):
        hidden, position_bias = T5LayerSelfAttention(self.config, self.has_relative_attention_bias, name="0")(
            hidden, position_bias, mask_bias)
        hidden, ff_out = T5LayerFF(self.config, name="1")(hidden)
        return hidden, ff_out, position_bias


class T5Block(nn.Module):
    config: T5EncoderConfig
    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, hidden, position_bias, mask_bias):
        return T5BlockLayers(self.config, self.has_relative_attention_bias, name="layer")(
            hidden, position_bias, mask_bias)


class T5Blocks(nn.Module):
    """Holds the blocks under the names "0", "1", ...; block 0 owns the relative attention bias."""

    config: T5EncoderConfig

    @nn.compact
    def __call__(self, hidden, mask_bias):
        hidden_states, ff_outs, position_bias = [hidden], [], None
        for i in range(self.config.num_layers):
            hidden, ff_out, position_bias = T5Block(self.config, i == 0, name=str(i))(hidden, position_bias, mask_bias)
            hidden_states.append(hidden)
            ff_outs.append(ff_out)
        return tuple(hidden_states), tuple(ff_outs)


class T5Stack(nn.Module):
    config: T5EncoderConfig

    @nn.compact
    def __call__(self, hidden, mask_bias):
        hidden_states, ff_outs = T5Blocks(self.config, name="block")(hidden, mask_bias)
        last = _norm(self.config, "final_layer_norm")(hidden_states[-1])
        return last, hidden_states, ff_outs


def padding_bias(attention_mask: Optional[jax.Array]) -> jax.Array:
    """Additive float32 bias [B or 1, 1, 1, T]: 0 for kept keys, float32 min for padding."""
    if attention_mask is None:
        return jnp.zeros((1, 1, 1, 1), jnp.float32)
    keep = attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class T5EncoderModule(nn.Module):
    """Returns a dict of named outputs (the CLIP encoder's names, so HiRM hooks read both):

    last_hidden_state  [B, T, D]  after final_layer_norm (what Flux / SD3 condition on)
    hidden_states      tuple of L+1 [B, T, D]: embeddings, then each block's output before any
                       norm (transformers' T5 replaces the last entry by last_hidden_state;
                       here it stays the raw block output, as for CLIP)
    mlp_out            tuple of L [B, T, D]: each block's DenseReluDense output (after `wo`),
                       before the residual add: HiRM's capture point
    pooled_output, text_embeds: None (T5 has neither)

    Attention is bidirectional; `attention_mask` (1 keep, 0 padding) masks padded keys.
    """

    config: T5EncoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> dict[str, Any]:
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
                         embedding_init=_normal(1.0), name="shared")
        last, hidden_states, ff_outs = T5Stack(cfg, name="encoder")(embed(input_ids), padding_bias(attention_mask))
        return dict(last_hidden_state=last, hidden_states=hidden_states, mlp_out=ff_outs,
                    pooled_output=None, text_embeds=None)


@dataclasses.dataclass
class T5Encoder:
    """A T5 encoder: its config, its parameters, and a pure `apply`.

    `apply(params, input_ids, attention_mask=None, dtype=None)` is a pure function of its
    arguments, safe to `jax.jit`, `jax.grad` and `jax.vmap`; `params` is any tree shaped like
    `.params`. `dtype` ("float32", "bfloat16") overrides the config's compute dtype; the
    parameters stay in `param_dtype` (float32) and are cast per matmul.
    """

    config: T5EncoderConfig
    params: Any

    @property
    def module(self) -> T5EncoderModule:
        return T5EncoderModule(self.config)

    def apply(self, params, input_ids, attention_mask=None, dtype: Optional[str] = None) -> dict[str, Any]:
        config = self.config if dtype is None else self.config.replace(dtype=dtype)
        return T5EncoderModule(config).apply({"params": params}, input_ids, attention_mask)

    def with_dtype(self, dtype: str) -> "T5Encoder":
        """The same parameters with another compute dtype."""
        return T5Encoder(self.config.replace(dtype=dtype), self.params)

    @classmethod
    def init(cls, config: T5EncoderConfig, seed: int = 0, length: int = 8) -> "T5Encoder":
        """Random weights, drawn as transformers initialises T5 (for tests and benchmarks)."""
        ids = jnp.zeros((1, length), jnp.int32)
        params = T5EncoderModule(config).init(jax.random.key(seed), ids)["params"]
        return cls(config, params)

    def param_shapes(self):
        """The tree of `jax.ShapeDtypeStruct` this config expects (no memory allocated)."""
        ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
        return jax.eval_shape(self.module.init, jax.random.key(0), ids)["params"]
