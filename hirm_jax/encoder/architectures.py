"""What the trainer needs to know about each text-encoder architecture, as data.

    arch = architecture_of(encoder)          # or of encoder.config
    arch.name                                 # "clip" or "t5"
    arch.block_prefix(0)                      # "encoder/layers/0/" (CLIP), "encoder/block/0/" (T5)
    arch.module_prefixes(0, ("self_attn",))   # Flax path prefixes of block 0's self-attention
    arch.max_length(encoder.config, config.encoder.max_length)   # tokens per prompt
    arch.has_bos                              # whether position 0 is a BOS token
    arch.expand_table(encoder.config)         # (hf_key, flax_path, transform) rows (export, delta)

The erase config names trainable modules with one vocabulary for every architecture
(config_lib.TRAINABLE_MODULES: self_attn, mlp, layer_norm1, layer_norm2); each architecture
says which parameters those are.

CLIP (`hirm_jax.encoder.clip.TextEncoder`): block i is `encoder/layers/i`; modules are its own names;
prompts are 77 tokens (max_position_embeddings) starting with <|startoftext|>.

T5 (`hirm_jax.encoder.t5.T5Encoder`, Flux `text_encoder_2`, SD3 `text_encoder_3`): block i is
`encoder/block/i`. "Block 0" for HiRM means block 0's OWN computation:
    self_attn   = layer/0/SelfAttention/{q,k,v,o}      (NOT relative_attention_bias)
    layer_norm1 = layer/0/layer_norm                  (the RMS norm before self-attention)
    mlp         = layer/1/DenseReluDense              (wi_0/wi_1 or wi, and wo)
    layer_norm2 = layer/1/layer_norm                  (the RMS norm before the feed-forward)
Block 0 also stores `relative_attention_bias`, the relative-position table EVERY block's
attention adds; training it would change every layer, not the early one HiRM trains, so the
block/module selection never includes it (only an explicit train.trainable_regex can).
T5 has no position limit and no BOS token: the prompt length is the config's
encoder.max_length (the pipeline's max_sequence_length: 512 for Flux-dev, 256 for
Flux-schnell and SD3), every prompt ends with </s> (id 1) and is padded with <pad> (id 0);
the token-position rules that skip BOS ("all_but_bos", "non_padding_but_bos") skip nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

from hirm_jax.config_lib import ConfigError

MAX_LENGTH_FIELD = "encoder.max_length"


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    encoder_class: Callable[..., Any]  # (config, params) -> encoder with .apply(params, ids, mask)
    config_class: type
    blocks_path: str  # Flax path of the block container
    modules: dict  # config module name -> sub-paths (prefixes) under a block
    has_bos: bool
    expand_table: Callable[[Any], Iterator]  # config -> (hf_key, flax_path tuple, transform)
    config_fields: tuple  # the config fields that must match between a run and its base
    load_tokenizer: Callable[[Any], Any]  # folder -> transformers tokenizer
    default_max_length: Callable[[Any], int | None]  # encoder config -> length (None: must be set)
    length_hint: str = ""  # what to set when the length has no default

    def num_blocks(self, params) -> int:
        tree = params
        for part in self.blocks_path.split("/"):
            tree = tree[part]
        return len(tree)

    def block_prefix(self, block: int) -> str:
        return f"{self.blocks_path}/{block}/"

    def module_prefixes(self, block: int, modules: Sequence[str]) -> tuple[str, ...]:
        return tuple(self.block_prefix(block) + sub for m in modules for sub in self.modules[m])

    def max_length(self, encoder_config, requested: int) -> int:
        """Tokens per prompt: `requested` (encoder.max_length) or the architecture's default."""
        limit = getattr(encoder_config, "max_position_embeddings", None)
        if requested:
            if limit is not None and requested > limit:
                raise ConfigError(f"{MAX_LENGTH_FIELD}={requested} exceeds the {self.name} encoder's "
                                  f"{limit} positions (max_position_embeddings)")
            return requested
        default = self.default_max_length(encoder_config)
        if default is None:
            raise ConfigError(f"{MAX_LENGTH_FIELD} must be set for a {self.name} encoder (it has no position "
                              f"limit; use the pipeline's own prompt length): {self.length_hint}")
        return default


def _clip() -> Architecture:
    from hirm_jax.encoder.clip import TextEncoder, TextEncoderConfig  # noqa: PLC0415
    from hirm_jax.encoder.tokenizer import load_clip_tokenizer  # noqa: PLC0415
    from hirm_jax.encoder.clip_weights import expand_table  # noqa: PLC0415
    return Architecture(
        name="clip", encoder_class=TextEncoder, config_class=TextEncoderConfig, blocks_path="encoder/layers",
        modules={m: (f"{m}/",) for m in ("self_attn", "mlp", "layer_norm1", "layer_norm2")},
        has_bos=True, expand_table=expand_table, config_fields=TextEncoderConfig.HF_FIELDS,
        load_tokenizer=load_clip_tokenizer,
        default_max_length=lambda config: config.max_position_embeddings)


def _t5() -> Architecture:
    from hirm_jax.encoder.t5 import T5Encoder, T5EncoderConfig  # noqa: PLC0415
    from hirm_jax.encoder.t5_weights import expand_t5_table  # noqa: PLC0415
    from hirm_jax.encoder.tokenizer import load_t5_tokenizer  # noqa: PLC0415
    return Architecture(
        name="t5", encoder_class=T5Encoder, config_class=T5EncoderConfig, blocks_path="encoder/block",
        modules={"self_attn": tuple(f"layer/0/SelfAttention/{p}/" for p in ("q", "k", "v", "o")),
                 "layer_norm1": ("layer/0/layer_norm/",),
                 "mlp": ("layer/1/DenseReluDense/",),
                 "layer_norm2": ("layer/1/layer_norm/",)},
        has_bos=False, expand_table=expand_t5_table, config_fields=T5EncoderConfig.HF_FIELDS,
        load_tokenizer=load_t5_tokenizer,
        default_max_length=lambda config: None,
        length_hint="--config.encoder.max_length=512 for FLUX.1-dev, 256 for FLUX.1-schnell and SD3")


_BUILDERS = {"clip": _clip, "t5": _t5}
_CACHE: dict[str, Architecture] = {}


def architecture(name: str) -> Architecture:
    if name not in _CACHE:
        _CACHE[name] = _BUILDERS[name]()
    return _CACHE[name]


def architecture_of(encoder_or_config) -> Architecture:
    """The architecture of an encoder (TextEncoder / T5Encoder) or of its config."""
    config = getattr(encoder_or_config, "config", encoder_or_config)
    for name in _BUILDERS:
        arch = architecture(name)
        if isinstance(config, arch.config_class):
            return arch
    raise TypeError(f"no text-encoder architecture for {type(config).__name__}")
