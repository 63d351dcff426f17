"""Weights: ONE mapping table between Hugging Face CLIP text keys and the Flax tree, both ways.

Canonical PyTorch layout (what `CLIPTextModelWithProjection` saves, what real SD checkpoints
use, and what transformers 4.x and 5.x both load):

    text_model.embeddings.token_embedding.weight
    text_model.encoder.layers.{i}.self_attn.q_proj.weight      (torch Linear: [out, in])
    ...
    text_projection.weight                                      (only with projection)

Two other spellings are normalised onto it before anything else happens:

- flat names (`encoder.layers.0.*`, `embeddings.*`, `final_layer_norm.*`) as transformers 5
  `CLIPTextModel` and diffusers' `text_encoder` folders save them: `canonical_hf_state`;
- the OpenCLIP names of SD 2.x / SDXL single files (`transformer.resblocks.{i}.attn.in_proj_weight`,
  `positional_embedding`, `ln_final`, `text_projection` as [D, P]): a second explicit table,
  OPENCLIP_TABLE, with named transforms (qkv split, transpose): `openclip_to_hf`.

Every source key is mapped or on an explicit ignore list, every Flax leaf is produced exactly
once, and every shape is checked against `jax.eval_shape(model.init)`; anything else raises
`WeightsError` naming the keys. numpy + safetensors only: torch is never needed here.

    state = flax_to_hf(params, config)      # {key: np.ndarray}
    params = hf_to_flax(state, config)      # nested dict of np.ndarray (param_dtype)
    config = infer_config(state, hidden_act="gelu")   # when there is no config.json
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Iterator, Optional

import numpy as np
import jax

from hirm_jax.encoder.hf_names import canonical_name
from hirm_jax.encoder.files import WeightsError  # noqa: F401  (defined with the files it names)
from hirm_jax.encoder.clip import DTYPES, LEGACY_EOS_TOKEN_ID, TextEncoder, TextEncoderConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear stores [out, in]; flax Dense kernels are [in, out].
TRANSPOSE = Transform("transpose", _transpose, _transpose)

# (Hugging Face key, Flax path, transform). "{i}" is a block index.
MAPPING_TABLE: tuple[tuple[str, str, Transform], ...] = (
    ("text_model.embeddings.token_embedding.weight", "embeddings/token_embedding/embedding", IDENTITY),
    ("text_model.embeddings.position_embedding.weight", "embeddings/position_embedding/embedding", IDENTITY),
    *(
        entry
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
        for entry in (
            (f"text_model.encoder.layers.{{i}}.self_attn.{proj}.weight", f"encoder/layers/{{i}}/self_attn/{proj}/kernel", TRANSPOSE),
            (f"text_model.encoder.layers.{{i}}.self_attn.{proj}.bias", f"encoder/layers/{{i}}/self_attn/{proj}/bias", IDENTITY),
        )
    ),
    *(
        entry
        for fc in ("fc1", "fc2")
        for entry in (
            (f"text_model.encoder.layers.{{i}}.mlp.{fc}.weight", f"encoder/layers/{{i}}/mlp/{fc}/kernel", TRANSPOSE),
            (f"text_model.encoder.layers.{{i}}.mlp.{fc}.bias", f"encoder/layers/{{i}}/mlp/{fc}/bias", IDENTITY),
        )
    ),
    *(
        entry
        for norm in ("layer_norm1", "layer_norm2")
        for entry in (
            (f"text_model.encoder.layers.{{i}}.{norm}.weight", f"encoder/layers/{{i}}/{norm}/scale", IDENTITY),
            (f"text_model.encoder.layers.{{i}}.{norm}.bias", f"encoder/layers/{{i}}/{norm}/bias", IDENTITY),
        )
    ),
    ("text_model.final_layer_norm.weight", "final_layer_norm/scale", IDENTITY),
    ("text_model.final_layer_norm.bias", "final_layer_norm/bias", IDENTITY),
    ("text_projection.weight", "text_projection/kernel", TRANSPOSE),
)

# Buffers that carry no learned state.
IGNORED_KEYS = ("text_model.embeddings.position_ids",)

def canonical_hf_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Prefix flat `CLIPTextModel` names with `text_model.`; refuse a mix that names one weight twice."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        name = canonical_name(key)
        if name in out:
            raise WeightsError(f"checkpoint holds both {key!r} and {name!r}: flat and text_model.* names "
                               "for the same weight")
        out[name] = value
    return out


def expand_table(config: TextEncoderConfig) -> Iterator[tuple[str, tuple[str, ...], Transform]]:
    """The concrete (hf_key, flax_path, transform) rows for one architecture."""
    for hf_key, flax_path, transform in MAPPING_TABLE:
        if hf_key.startswith("text_projection") and not config.projection_dim:
            continue
        indices = range(config.num_hidden_layers) if "{i}" in hf_key else [None]
        for i in indices:
            yield (hf_key.format(i=i), tuple(flax_path.format(i=i).split("/")), transform)


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def flat_paths(tree) -> dict[tuple[str, ...], object]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _describe(config: TextEncoderConfig) -> str:
    return (f"a CLIP text encoder with {config.num_hidden_layers} layers, width {config.hidden_size}, "
            f"projection_dim {config.projection_dim}")


def hf_to_flax(state: dict[str, np.ndarray], config: TextEncoderConfig) -> dict:
    """Hugging Face state dict (canonical or flat names) -> Flax params (numpy, `param_dtype`).

    Raises WeightsError on a missing, unexpected or wrongly shaped key.
    """
    state = canonical_hf_state(state)
    rows = list(expand_table(config))
    expected = {hf_key for hf_key, _, _ in rows}
    missing = sorted(expected - state.keys())
    unexpected = sorted(set(state) - expected - set(IGNORED_KEYS))
    if missing or unexpected:
        raise WeightsError(f"checkpoint keys do not match {_describe(config)}: "
                           f"missing {short_list(missing)}, unexpected {short_list(unexpected)}")
    shapes = flat_paths(TextEncoder(config, None).param_shapes())
    param_dtype = DTYPES[config.param_dtype]
    params: dict = {}
    for hf_key, path, transform in rows:
        value = transform.to_flax(np.asarray(state[hf_key]))
        want = tuple(shapes[path].shape)
        if value.shape != want:
            raise WeightsError(
                f"{hf_key} must have shape {want if transform is IDENTITY else want[::-1]} "
                f"for {_describe(config)} but has {tuple(np.shape(state[hf_key]))}")
        # fp16/bf16 checkpoints are upcast exactly; float32 ones pass through bit for bit.
        set_path(params, path, value.astype(param_dtype, copy=False))
    assert len(flat_paths(params)) == len(shapes), "mapping table does not cover the model"
    return params


def check_param_tree(params, expected, description: str) -> None:
    """Raise WeightsError unless `params` has exactly the leaves and shapes of `expected` (a tree
    of ShapeDtypeStructs); `description` names the model in the message. Shared by every
    architecture's mapping (CLIP here, T5 in `hirm_jax.encoder.t5_weights`)."""
    flat = flat_paths(params)
    shapes = flat_paths(expected)
    missing = sorted("/".join(p) for p in set(shapes) - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - set(shapes))
    if missing or extra:
        raise WeightsError(f"Flax params do not match {description}: "
                           f"missing {short_list(missing)}, unexpected {short_list(extra)}")
    wrong = sorted(f"{'/'.join(p)} {tuple(np.shape(flat[p]))} (expected {tuple(shapes[p].shape)})"
                   for p in shapes if tuple(np.shape(flat[p])) != tuple(shapes[p].shape))
    if wrong:
        raise WeightsError(f"Flax params have the wrong shapes for {description}: {short_list(wrong)}")


def check_params(params, config: TextEncoderConfig) -> None:
    """Raise WeightsError unless `params` has exactly the leaves and shapes `config` expects."""
    check_param_tree(params, TextEncoder(config, None).param_shapes(), _describe(config))


def flax_to_hf(params, config: TextEncoderConfig) -> dict[str, np.ndarray]:
    """Flax params -> canonical Hugging Face state dict (numpy, contiguous)."""
    check_params(params, config)
    flat = flat_paths(params)
    return {hf_key: transform.to_hf(np.asarray(flat[path])) for hf_key, path, transform in expand_table(config)}


# ---------------------------------------------------------------------------------------------
# OpenCLIP names (SD 2.x `cond_stage_model.model.*`, SDXL `conditioner.embedders.1.model.*`).

@dataclasses.dataclass(frozen=True)
class FanOut:
    """A transform from one OpenCLIP tensor to one or more canonical HF tensors."""

    name: str
    apply: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _qkv_split(x: np.ndarray) -> tuple[np.ndarray, ...]:
    # nn.MultiheadAttention fuses [q; k; v] along the output axis: in_proj_weight is [3D, D].
    if x.shape[0] % 3:
        raise WeightsError(f"a fused in_proj tensor must have a first axis divisible by 3 but has shape {x.shape}")
    return tuple(np.ascontiguousarray(part) for part in np.split(x, 3, axis=0))


ONE = FanOut("identity", lambda x: (x,))
QKV_SPLIT = FanOut("qkv_split", _qkv_split)
# OpenCLIP applies `x @ text_projection` ([D, P]); a torch Linear weight is [P, D].
PROJ_TRANSPOSE = FanOut("transpose", lambda x: (_transpose(x),))

_HF_LAYER = "text_model.encoder.layers.{i}"
# (OpenCLIP key, canonical HF keys it becomes, transform). "{i}" is a block index.
OPENCLIP_TABLE: tuple[tuple[str, tuple[str, ...], FanOut], ...] = (
    ("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",), ONE),
    ("positional_embedding", ("text_model.embeddings.position_embedding.weight",), ONE),
    *(
        (f"transformer.resblocks.{{i}}.attn.in_proj_{kind}",
         tuple(f"{_HF_LAYER}.self_attn.{p}_proj.{kind}" for p in "qkv"), QKV_SPLIT)
        for kind in ("weight", "bias")
    ),
    *(
        (f"transformer.resblocks.{{i}}.{src}.{kind}", (f"{_HF_LAYER}.{dst}.{kind}",), ONE)
        for src, dst in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
        for kind in ("weight", "bias")
    ),
    ("ln_final.weight", ("text_model.final_layer_norm.weight",), ONE),
    ("ln_final.bias", ("text_model.final_layer_norm.bias",), ONE),
    ("text_projection", ("text_projection.weight",), PROJ_TRANSPOSE),
)

# Not weights of the text tower: CLIP's contrastive temperature and the causal-mask buffer.
OPENCLIP_IGNORED_KEYS = ("logit_scale", "attn_mask")

_BLOCK_INDEX = re.compile(r"^transformer\.resblocks\.(\d+)\.")


def openclip_layer_count(state: dict[str, np.ndarray]) -> int:
    indices = {int(m.group(1)) for key in state if (m := _BLOCK_INDEX.match(key))}
    return max(indices) + 1 if indices else 0


def openclip_to_hf(state: dict[str, np.ndarray], num_layers: Optional[int] = None,
                   with_projection: bool = True) -> dict[str, np.ndarray]:
    """OpenCLIP text-tower state dict -> canonical Hugging Face state dict.

    num_layers: keep blocks 0..num_layers-1 and ignore the rest (SD 2.x conditions on the
    penultimate block, so its text_encoder has 23 of ViT-H's 24); None keeps them all.
    with_projection: False ignores `text_projection` (SD 2.x's text_encoder has none).
    """
    present = openclip_layer_count(state)
    num_layers = present if num_layers is None else num_layers
    if num_layers > present:
        raise WeightsError(f"asked for {num_layers} OpenCLIP blocks but the checkpoint has {present}")
    ignored = set(OPENCLIP_IGNORED_KEYS)
    dropped = {key for key in state
               if (m := _BLOCK_INDEX.match(key)) and int(m.group(1)) >= num_layers}
    if dropped:
        log.info("ignoring OpenCLIP blocks %d..%d (%d tensors): the pipeline does not use them",
                 num_layers, present - 1, len(dropped))
    if not with_projection and "text_projection" in state:
        log.info("ignoring OpenCLIP text_projection: this text encoder has no projection")
        ignored.add("text_projection")

    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for src_pattern, dst_patterns, transform in OPENCLIP_TABLE:
        for i in (range(num_layers) if "{i}" in src_pattern else [None]):
            src = src_pattern.format(i=i)
            if src not in state or src in ignored:
                continue  # a missing tensor is reported by hf_to_flax under its canonical name
            used.add(src)
            for dst, value in zip((d.format(i=i) for d in dst_patterns), transform.apply(np.asarray(state[src])),
                                  strict=True):
                out[dst] = value
    unexpected = sorted(set(state) - used - ignored - dropped)
    if unexpected:
        raise WeightsError(f"OpenCLIP checkpoint has keys that are neither mapped nor ignored: {short_list(unexpected)}")
    return out


# ---------------------------------------------------------------------------------------------
# Architecture from the weights alone (single-file checkpoints carry no config.json).

HEAD_DIM = 64  # every CLIP text tower SD uses (L/14, H/14, bigG/14) has 64-wide heads
_HF_BLOCK_INDEX = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")


def infer_config(state: dict[str, np.ndarray], hidden_act: str, source: str = "checkpoint") -> TextEncoderConfig:
    """TextEncoderConfig from a canonical HF state dict; `hidden_act` cannot be read from weights.

    Token ids follow the configs of the released SD encoders (bos 0, eos 2 = pool at
    argmax(ids), pad 1); for CLIP's vocabulary that is the first <|endoftext|>.
    """
    state = canonical_hf_state(state)

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise WeightsError(f"cannot infer the architecture of {source}: it has no {key!r}")
        return tuple(np.shape(state[key]))

    vocab_size, width = shape("text_model.embeddings.token_embedding.weight")
    positions = shape("text_model.embeddings.position_embedding.weight")[0]
    indices = sorted({int(m.group(1)) for key in state if (m := _HF_BLOCK_INDEX.match(key))})
    if not indices:
        raise WeightsError(f"cannot infer the architecture of {source}: it has no text_model.encoder.layers.*")
    if indices != list(range(len(indices))):
        raise WeightsError(f"cannot infer the architecture of {source}: block indices must run 0..n-1 "
                           f"but are {indices}")
    layers = len(indices)
    intermediate = shape("text_model.encoder.layers.0.mlp.fc1.weight")[0]
    if width % HEAD_DIM:
        raise WeightsError(f"cannot infer the number of heads of {source}: width must be a multiple of "
                           f"{HEAD_DIM} but is {width}")
    projection = shape("text_projection.weight")[0] if "text_projection.weight" in state else None
    config = TextEncoderConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=width // HEAD_DIM,
        max_position_embeddings=positions, hidden_act=hidden_act, projection_dim=projection,
        bos_token_id=0, eos_token_id=LEGACY_EOS_TOKEN_ID, pad_token_id=1)
    log.warning("%s has no config.json: inferred %d layers, width %d, %d heads, intermediate %d, "
                "vocab %d, %d positions, projection %s, activation %s (from the checkpoint format)",
                source, layers, width, config.num_attention_heads, intermediate, vocab_size,
                positions, projection, hidden_act)
    return config


def short_list(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "[]"
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more
