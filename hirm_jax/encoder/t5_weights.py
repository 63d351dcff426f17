"""T5 encoder weights: ONE mapping table between PyTorch `T5EncoderModel` keys and the Flax tree,
plus the transformers-folder reader and writer (numpy + safetensors; torch is never needed).

    state = t5_flax_to_hf(params, config)        # {key: np.ndarray}, what transformers saves
    params = t5_hf_to_flax(state, config)        # nested dict of np.ndarray (param_dtype)
    encoder = load_t5_folder("flux/text_encoder_2")            # or ("flux", component="text_encoder_2")
    save_t5_folder(encoder, "out/text_encoder_2")

Keys (torch Linear weights are [out, in], Flax Dense kernels [in, out]):

    shared.weight                                               [vocab, d_model]
    encoder.block.{i}.layer.0.layer_norm.weight                 [d_model]
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight      [H*d_kv, d_model]
    encoder.block.{i}.layer.0.SelfAttention.o.weight            [d_model, H*d_kv]
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   [num_buckets, H]
    encoder.block.{i}.layer.1.layer_norm.weight                 [d_model]
    encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1}.weight [d_ff, d_model]   (gated; else .wi.)
    encoder.block.{i}.layer.1.DenseReluDense.wo.weight          [d_model, d_ff]
    encoder.final_layer_norm.weight                             [d_model]

`encoder.embed_tokens.weight` is the same tensor as `shared.weight` in `T5EncoderModel`
(tied); a checkpoint may hold either or both (both must then be equal). Written folders hold
`shared.weight` only, as `T5EncoderModel.save_pretrained` writes them. The decoder and LM head
of a full T5 checkpoint (`decoder.*`, `lm_head.weight`) are ignored and logged, as
`T5EncoderModel.from_pretrained` ignores them. Any other unmapped key, a missing key or a
wrong shape raises `WeightsError` naming it.

Weight files are read by `hirm_jax.encoder.files.read_weight_files` (the one safetensors reader: a
single file or the shards of an index; F16 and BF16, as Flux and SD3 ship T5, are upcast
exactly to float32 by the mapping). A pickle (pytorch_model.bin) is refused unless allow_pickle=True.
`hirm_jax.encoder.layouts.load_text_encoder` picks T5 from config.json and comes here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator, Mapping, Optional

import numpy as np

import hirm_jax
from hirm_jax.fileio import atomic_dir, save_safetensors
from hirm_jax.encoder.files import WEIGHTS_NAME, read_weight_files
from hirm_jax.encoder.t5 import DTYPES, T5Encoder, T5EncoderConfig
from hirm_jax.encoder.clip_weights import (IDENTITY, Transform, WeightsError, check_param_tree, flat_paths, set_path,
                              short_list)

log = logging.getLogger(__name__)

T5_MODEL_TYPE = "t5"



def _transpose(x: np.ndarray, rows: int = 512) -> np.ndarray:
    """x.T as a contiguous copy, a band of rows at a time: 2-3x faster than np.ascontiguousarray(x.T)
    on T5-XXL's [10240, 4096] matrices (the band stays in cache). Exact: it only moves values."""
    if x.ndim != 2:
        return np.ascontiguousarray(x.T)
    out = np.empty(x.shape[::-1], x.dtype)
    for start in range(0, x.shape[0], rows):
        out[:, start:start + rows] = x[start:start + rows].T
    return out


# torch Linear stores [out, in]; Flax Dense kernels are [in, out].
TRANSPOSE = Transform("transpose", _transpose, _transpose)

# Which feed-forward variant a row belongs to.
ALWAYS, GATED, PLAIN = "always", "gated", "plain"

_ATTN = "encoder.block.{i}.layer.0.SelfAttention"
_FATTN = "encoder/block/{i}/layer/0/SelfAttention"
_FF = "encoder.block.{i}.layer.1.DenseReluDense"
_FFF = "encoder/block/{i}/layer/1/DenseReluDense"

# (Hugging Face key, Flax path, transform, variant). "{i}" is a block index.
T5_MAPPING_TABLE: tuple[tuple[str, str, Transform, str], ...] = (
    ("shared.weight", "shared/embedding", IDENTITY, ALWAYS),
    *((f"{_ATTN}.{p}.weight", f"{_FATTN}/{p}/kernel", TRANSPOSE, ALWAYS) for p in ("q", "k", "v", "o")),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
     "encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding", IDENTITY, ALWAYS),
    ("encoder.block.{i}.layer.0.layer_norm.weight", "encoder/block/{i}/layer/0/layer_norm/scale", IDENTITY, ALWAYS),
    (f"{_FF}.wi_0.weight", f"{_FFF}/wi_0/kernel", TRANSPOSE, GATED),
    (f"{_FF}.wi_1.weight", f"{_FFF}/wi_1/kernel", TRANSPOSE, GATED),
    (f"{_FF}.wi.weight", f"{_FFF}/wi/kernel", TRANSPOSE, PLAIN),
    (f"{_FF}.wo.weight", f"{_FFF}/wo/kernel", TRANSPOSE, ALWAYS),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "encoder/block/{i}/layer/1/layer_norm/scale", IDENTITY, ALWAYS),
    ("encoder.final_layer_norm.weight", "encoder/final_layer_norm/scale", IDENTITY, ALWAYS),
)

# Tied aliases: (alias, canonical key). T5EncoderModel's encoder.embed_tokens IS shared.
TIED_KEYS = (("encoder.embed_tokens.weight", "shared.weight"),)
# Parts of a full T5 (T5Model / T5ForConditionalGeneration) that the encoder does not use.
IGNORED_PREFIXES = ("decoder.", "lm_head.")


def expand_t5_table(config: T5EncoderConfig) -> Iterator[tuple[str, tuple[str, ...], Transform]]:
    """The concrete (hf_key, flax_path, transform) rows for one architecture."""
    variant = GATED if config.is_gated_act else PLAIN
    for hf_key, flax_path, transform, applies in T5_MAPPING_TABLE:
        if applies not in (ALWAYS, variant):
            continue
        for i in (range(config.num_layers) if "{i}" in hf_key else [None]):
            yield hf_key.format(i=i), tuple(flax_path.format(i=i).split("/")), transform


def _describe(config: T5EncoderConfig) -> str:
    return (f"a T5 encoder with {config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads "
            f"of {config.d_kv}, d_ff {config.d_ff} ({config.feed_forward_proj}), vocab {config.vocab_size}")


def canonical_t5_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fold the tied `encoder.embed_tokens.weight` onto `shared.weight` and drop decoder / LM-head keys.

    Both spellings may be present only with equal values (they are one tensor in PyTorch)."""
    out = dict(state)
    for alias, key in TIED_KEYS:
        if alias not in out:
            continue
        value = out.pop(alias)
        if key in out:
            if np.shape(out[key]) != np.shape(value) or not np.array_equal(out[key], value):
                raise WeightsError(f"checkpoint holds both {key!r} and {alias!r}, which T5EncoderModel ties into "
                                   f"one tensor, but with different values (shapes {tuple(np.shape(out[key]))} "
                                   f"and {tuple(np.shape(value))})")
        else:
            out[key] = value
    ignored = sorted(k for k in out if k.startswith(IGNORED_PREFIXES))
    if ignored:
        log.info("ignoring %d decoder / LM-head tensors of a full T5 checkpoint (%s ...): the encoder does "
                 "not use them", len(ignored), ignored[0])
        for k in ignored:
            del out[k]
    return out


def t5_hf_to_flax(state: Mapping[str, np.ndarray], config: T5EncoderConfig) -> dict:
    """PyTorch `T5EncoderModel` state dict -> Flax params (numpy, `param_dtype`).

    Raises WeightsError on a missing, unexpected or wrongly shaped key."""
    state = canonical_t5_state(state)
    rows = list(expand_t5_table(config))
    expected = {hf_key for hf_key, _, _ in rows}
    missing = sorted(expected - state.keys())
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsError(f"checkpoint keys do not match {_describe(config)}: "
                           f"missing {short_list(missing)}, unexpected {short_list(unexpected)}")
    shapes = flat_paths(T5Encoder(config, None).param_shapes())
    param_dtype = DTYPES[config.param_dtype]
    params: dict = {}
    for hf_key, path, transform in rows:
        value = np.asarray(state[hf_key])
        want = tuple(shapes[path].shape)
        want_hf = want if transform is IDENTITY else want[::-1]
        if value.shape != want_hf:
            raise WeightsError(f"{hf_key} must have shape {want_hf} for {_describe(config)} "
                               f"but has {value.shape}")
        # fp16/bf16 checkpoints arrive upcast exactly; float32 ones pass through bit for bit.
        set_path(params, path, transform.to_flax(value).astype(param_dtype, copy=False))
    assert len(flat_paths(params)) == len(shapes), "T5 mapping table does not cover the model"
    return params


def check_t5_params(params, config: T5EncoderConfig) -> None:
    """Raise WeightsError unless `params` has exactly the leaves and shapes `config` expects."""
    check_param_tree(params, T5Encoder(config, None).param_shapes(), _describe(config))


def t5_flax_to_hf(params, config: T5EncoderConfig) -> dict[str, np.ndarray]:
    """Flax params -> PyTorch `T5EncoderModel` state dict as save_pretrained writes it (numpy, contiguous)."""
    check_t5_params(params, config)
    flat = flat_paths(params)
    return {hf_key: transform.to_hf(np.asarray(flat[path])) for hf_key, path, transform in expand_t5_table(config)}


# ---------------------------------------------------------------------------------------------
# Folders.

def is_t5_config(hf_config: Mapping) -> bool:
    """Whether a config.json describes a T5 (encoder): model_type "t5" or a T5 architecture."""
    architectures = hf_config.get("architectures") or []
    return hf_config.get("model_type") == T5_MODEL_TYPE or any(str(a).startswith("T5") for a in architectures)


def _read_t5_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder} is not a transformers T5 folder: it has no config.json; found "
                           f"{sorted(p.name for p in folder.iterdir())[:12]}")
    try:
        hf_config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(hf_config, dict) or not is_t5_config(hf_config):
        model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
        raise WeightsError(f"{path} must describe a T5 encoder (model_type 't5', architectures "
                           f"['T5EncoderModel']) but has model_type {model_type!r}")
    return hf_config


def _t5_components(pipeline: Path) -> list[str]:
    found = []
    for sub in sorted(p for p in pipeline.iterdir() if p.is_dir() and p.name.startswith("text_encoder")):
        try:
            if is_t5_config(json.loads((sub / "config.json").read_text())):
                found.append(sub.name)
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
    return found


def resolve_t5_folder(source: str | os.PathLike, component: Optional[str] = None) -> Path:
    """The transformers folder of a T5 encoder: `source` itself, or a component of a diffusers
    pipeline (model_index.json): `component`, or the only text_encoder* whose config is T5."""
    source = Path(source)
    if not source.is_dir():
        raise WeightsError(f"{source} is not a folder (a T5 encoder is read from a transformers folder "
                           "or a diffusers pipeline)")
    if not (source / "model_index.json").is_file():
        if component is not None:
            raise WeightsError(f"{source} is not a diffusers pipeline (no model_index.json); component must be "
                               f"None but is {component!r}")
        return source
    candidates = _t5_components(source)
    if component is None:
        if len(candidates) != 1:
            raise WeightsError(f"{source} is a diffusers pipeline with T5 components {candidates}: pass "
                               "component= (text_encoder_2 for Flux, text_encoder_3 for SD3)")
        component = candidates[0]
    if Path(component).name != component or not (source / component / "config.json").is_file():
        raise WeightsError(f"diffusers pipeline {source} has no component {component!r} with a config.json; "
                           f"T5 components there: {candidates}")
    return source / component


def load_t5_folder(source: str | os.PathLike, component: Optional[str] = None, *,
                   dtype: Optional[str] = None, allow_pickle: bool = False) -> T5Encoder:
    """A T5 encoder from a transformers folder (config.json + model.safetensors, or the shards of
    model.safetensors.index.json) or a diffusers pipeline component (Flux `text_encoder_2`, SD3
    `text_encoder_3`; pass the pipeline with `component`, or the subfolder itself).

    Parameters are float32 (fp16/bf16 storage upcast exactly); `dtype` sets the compute dtype."""
    folder = resolve_t5_folder(source, component)
    config = T5EncoderConfig.from_hf_dict(_read_t5_config(folder))
    state = read_weight_files(folder, allow_pickle)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    return T5Encoder(config, t5_hf_to_flax(state, config))


def save_t5_folder(encoder: T5Encoder, out_dir: str | os.PathLike, *, overwrite: bool = False,
                   inputs: Optional[Mapping[str, Optional[str | os.PathLike]]] = None, params=None) -> Path:
    """Write a transformers folder: config.json + model.safetensors (float32, `shared.weight`,
    byte-deterministic), atomically. `T5EncoderModel.from_pretrained` loads it with no missing or
    unexpected keys; it can replace a Flux `text_encoder_2` / SD3 `text_encoder_3` folder."""
    params = encoder.params if params is None else params
    state = {k: np.asarray(v, dtype=np.float32) for k, v in t5_flax_to_hf(params, encoder.config).items()}
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "hirm_jax_version": hirm_jax.__version__})
        (tmp / "config.json").write_text(json.dumps(encoder.config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
