"""Reading and writing text encoders in every supported on-disk layout (numpy + safetensors).

    encoder = load_text_encoder("path/to/sd-pipeline", component="text_encoder")
    encoder = load_text_encoder("sd_xl_base_1.0.safetensors", component="text_encoder_2")
    save_text_encoder(encoder, "out/text_encoder")          # transformers folder
    save_flax_checkpoint(encoder, "out/flax_encoder")       # config.json + flax_params.msgpack

`load_text_encoder(source, component=None)` recognises:

- a transformers folder: config.json + model.safetensors, or shards listed in
  model.safetensors.index.json (`CLIPTextModel` or `CLIPTextModelWithProjection`; flat
  `encoder.layers.*` or `text_model.*` names), or a `T5EncoderModel` folder (config.json says
  T5: Flux `text_encoder_2`, SD3 `text_encoder_3`), which loads as a `hirm_jax.encoder.t5.T5Encoder`;
- a diffusers pipeline folder (model_index.json) plus `component` (text_encoder, text_encoder_2);
- a single-file Stable Diffusion checkpoint (.safetensors) plus `component` where it holds two
  encoders; see SINGLE_FILE_ENCODERS. Each encoder is detected on its own, so a file holding
  only one of SDXL's two loads it (and asking for the absent one names what the file has).
  These carry no config.json: the architecture is inferred from the weights and logged;
- a Flax checkpoint written by `save_flax_checkpoint`.

Pickled checkpoints (.ckpt, .pt, .pth, .bin) can run code when unpickled: they are refused
unless `allow_pickle=True`, and then read with `torch.load(weights_only=True)`.
Weights are always loaded as float32 parameters (fp16/bf16 are upcast exactly).

Every bad input is a `WeightsError` naming the file and the rule: a truncated or corrupt
safetensors file (validated by the safetensors library), invalid JSON, or a config.json that
describes no valid encoder (e.g. num_attention_heads not dividing hidden_size).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import jax
import numpy as np
from flax import serialization

import hirm_jax
from hirm_jax.encoder.files import (FLAX_PARAMS_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, read_json, read_pickle,
                                    read_safetensors, read_weight_files, safetensors_keys)
from hirm_jax.fileio import atomic_dir, save_safetensors
from hirm_jax.encoder.clip import TextEncoder, TextEncoderConfig
from hirm_jax.encoder.clip_weights import (WeightsError, canonical_hf_state, check_params, flax_to_hf, hf_to_flax,
                              infer_config, openclip_layer_count, openclip_to_hf)

log = logging.getLogger(__name__)

FLAX_FORMAT = "hirm_jax.flax_text_encoder"
FLAX_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SingleFileEncoder:
    """Where one text encoder lives inside a single-file SD checkpoint, and how it is spelled."""

    component: str          # the diffusers component it becomes
    prefix: str             # key prefix inside the checkpoint
    key_format: str         # "hf": transformers names; "openclip": OpenCLIP names (OPENCLIP_TABLE)
    hidden_act: str         # not stored in the weights: quick_gelu = OpenAI CLIP-L, gelu = OpenCLIP
    drop_last_layer: bool   # SD 2.x conditions on the penultimate block; diffusers keeps 23 of 24
    projection: bool        # keep text_projection (SDXL text_encoder_2 consumes text_embeds)


# Families, detected by their key prefixes; the order matters only for SDXL (two encoders).
SINGLE_FILE_ENCODERS: dict[str, tuple[SingleFileEncoder, ...]] = {
    "sdxl": (
        SingleFileEncoder("text_encoder", "conditioner.embedders.0.transformer.", "hf", "quick_gelu", False, False),
        SingleFileEncoder("text_encoder_2", "conditioner.embedders.1.model.", "openclip", "gelu", False, True),
    ),
    "sdxl_refiner": (
        SingleFileEncoder("text_encoder_2", "conditioner.embedders.0.model.", "openclip", "gelu", False, True),
    ),
    "sd1": (SingleFileEncoder("text_encoder", "cond_stage_model.transformer.", "hf", "quick_gelu", False, False),),
    "sd2": (SingleFileEncoder("text_encoder", "cond_stage_model.model.", "openclip", "gelu", True, False),),
}


# --------------------------------------------------------------------------------------------
# Reading tensors.

# --------------------------------------------------------------------------------------------
# Loaders, one per layout.

def _encoder_from_hf_state(state: dict[str, np.ndarray], hf_config: Optional[dict], source: str,
                           hidden_act: str = "quick_gelu") -> TextEncoder:
    state = canonical_hf_state(state)
    has_projection = "text_projection.weight" in state
    if hf_config is None:
        config = infer_config(state, hidden_act=hidden_act, source=source)
    else:
        config = config_from_hf(hf_config, has_projection, where=f"{source}/config.json")
    return TextEncoder(config, hf_to_flax(state, config))


def _valid_config(where: str, build: Callable[[], TextEncoderConfig]) -> TextEncoderConfig:
    """`build()`; a value the model refuses (hidden_size not a multiple of num_attention_heads,
    an unknown hidden_act, ...) is a WeightsError naming `where`, the file it came from."""
    try:
        return build()
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{where} does not describe a valid CLIP text encoder: {e}") from e


def config_from_hf(hf_config: dict, has_projection: bool, where: str) -> TextEncoderConfig:
    """TextEncoderConfig from a config.json dict (see `_valid_config`)."""
    return _valid_config(where, lambda: TextEncoderConfig.from_hf_dict(hf_config, has_projection=has_projection))


def _read_hf_config(folder: Path) -> dict:
    """config.json of a transformers folder, checked to describe a CLIP text encoder before any
    weight is read."""
    hf_config = read_json(folder / "config.json")
    model_type = hf_config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise WeightsError(f"{folder / 'config.json'} must describe a CLIP text model "
                           f"(model_type 'clip_text_model') but has model_type {model_type!r}")
    config_from_hf(hf_config, has_projection=False, where=str(folder / "config.json"))
    return hf_config


def load_transformers_folder(folder: Path, allow_pickle: bool = False):
    """config.json + weights (see `read_weight_files`): a CLIP text encoder, or a T5 encoder when
    config.json says T5 (`hirm_jax.encoder.t5_weights`)."""
    from hirm_jax.encoder import t5_weights  # noqa: PLC0415  (it reads its files through this module)
    if t5_weights.is_t5_config(read_json(folder / "config.json")):
        return t5_weights.load_t5_folder(folder, allow_pickle=allow_pickle)
    hf_config = _read_hf_config(folder)
    return _encoder_from_hf_state(read_weight_files(folder, allow_pickle), hf_config, source=str(folder))


def _pipeline_components(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("text_encoder") and p.is_dir())


def load_pipeline_component(folder: Path, component: Optional[str], allow_pickle: bool = False) -> TextEncoder:
    """One text encoder of a diffusers pipeline folder (a transformers folder inside it)."""
    available = _pipeline_components(folder)
    if component is None:
        raise WeightsError(f"{folder} is a diffusers pipeline: pass component= one of {available}")
    if not (folder / component / "config.json").is_file():
        raise WeightsError(f"diffusers pipeline {folder} has no component {component!r} with a config.json; "
                           f"text-encoder components there: {available}")
    return load_transformers_folder(folder / component, allow_pickle)


def present_encoders(family: str, keys: Iterable[str]) -> dict[str, SingleFileEncoder]:
    """{component: encoder} for the encoders of `family` that some key lies under; each encoder
    is detected on its own (an SDXL file may hold only one of its two)."""
    keys = list(keys)
    return {enc.component: enc for enc in SINGLE_FILE_ENCODERS[family]
            if any(k.startswith(enc.prefix) for k in keys)}


def detect_single_file_family(keys: Iterable[str]) -> str:
    """The family with the most of its encoders present (their key prefixes are unique across
    families); WeightsError when no known encoder prefix occurs."""
    keys = list(keys)
    found = {family: len(present_encoders(family, keys)) for family in SINGLE_FILE_ENCODERS}
    family = max(found, key=found.get)  # the first of a tie, in SINGLE_FILE_ENCODERS order
    if found[family]:
        return family
    tops = sorted({".".join(k.split(".")[:2]) for k in keys})
    raise WeightsError(
        "unknown single-file layout: no text encoder under any known prefix "
        f"({sorted({e.prefix for encs in SINGLE_FILE_ENCODERS.values() for e in encs})}); "
        f"the file's top-level prefixes are {tops[:12]}")


def _choose_single_file_encoder(path: Path, family: str, keys: list[str],
                                component: Optional[str]) -> SingleFileEncoder:
    """The encoder asked for; with component=None, the only one the file holds."""
    present = present_encoders(family, keys)
    known = {enc.component for enc in SINGLE_FILE_ENCODERS[family]}
    if component is None and len(present) == 1:
        return next(iter(present.values()))
    if component in present:
        return present[component]
    if component in known:
        enc = next(e for e in SINGLE_FILE_ENCODERS[family] if e.component == component)
        raise WeightsError(f"{path} is a {family} checkpoint holding only {sorted(present)}: this file has "
                           f"{' and '.join(sorted(present))} but not {component} (no key starts with {enc.prefix!r})")
    raise WeightsError(f"{path} is a {family} checkpoint: component must be one of {sorted(present)} "
                       f"but is {component!r}")


def load_single_file(path: Path, component: Optional[str], allow_pickle: bool = False) -> TextEncoder:
    """A text encoder out of a single-file SD 1.x / 2.x / SDXL checkpoint."""
    if path.suffix in PICKLE_SUFFIXES:
        tensors = read_pickle(path, allow_pickle)
        keys = list(tensors)
    else:
        tensors, keys = None, safetensors_keys(path)
    family = detect_single_file_family(keys)
    enc = _choose_single_file_encoder(path, family, keys, component)
    component = enc.component
    if tensors is None:
        tensors = read_safetensors(path, keep=lambda key: key.startswith(enc.prefix))
    state = {k[len(enc.prefix):]: v for k, v in tensors.items() if k.startswith(enc.prefix)}
    source = f"{path} ({family} {component})"
    if enc.key_format == "openclip":
        present = openclip_layer_count(state)
        num_layers = present - 1 if enc.drop_last_layer else present
        if enc.drop_last_layer:
            log.info("%s: keeping %d of %d OpenCLIP blocks; SD 2.x conditions on the penultimate block, "
                     "as diffusers' text_encoder does", source, num_layers, present)
        state = openclip_to_hf(state, num_layers=num_layers, with_projection=enc.projection)
    return _encoder_from_hf_state(state, None, source=source, hidden_act=enc.hidden_act)


def load_flax_checkpoint(folder: Path) -> TextEncoder:
    """A folder written by `save_flax_checkpoint`."""
    meta = read_json(folder / "config.json")
    if meta.get("format") != FLAX_FORMAT or meta.get("format_version") != FLAX_FORMAT_VERSION:
        raise WeightsError(f"{folder / 'config.json'} must declare format {FLAX_FORMAT!r} version "
                           f"{FLAX_FORMAT_VERSION} but declares {meta.get('format')!r} {meta.get('format_version')!r}")
    fields = {f.name for f in dataclasses.fields(TextEncoderConfig)}
    if not isinstance(meta.get("config"), dict):
        raise WeightsError(f"{folder / 'config.json'} must hold a 'config' object (TextEncoderConfig fields)")
    unknown = sorted(set(meta["config"]) - fields)
    if unknown:
        raise WeightsError(f"{folder / 'config.json'} has unknown config fields {unknown}")
    config = _valid_config(str(folder / "config.json"), lambda: TextEncoderConfig(**meta["config"]))
    try:
        params = serialization.msgpack_restore((folder / FLAX_PARAMS_NAME).read_bytes())
    except Exception as e:
        raise WeightsError(f"cannot read {folder / FLAX_PARAMS_NAME} as msgpack (truncated or corrupt?): {e}") from e
    check_params(params, config)
    return TextEncoder(config, params)


def describe_layout(source: Path) -> str:
    """Name the layout of `source`: transformers | flax | pipeline | single_file; WeightsError otherwise."""
    if source.is_dir():
        if (source / "model_index.json").is_file():
            return "pipeline"
        if (source / FLAX_PARAMS_NAME).is_file():
            return "flax"
        if (source / "config.json").is_file():
            return "transformers"
        raise WeightsError(f"{source} is a folder but not a supported layout: it needs model_index.json "
                           f"(diffusers pipeline), config.json (transformers folder) or {FLAX_PARAMS_NAME} "
                           f"(Flax checkpoint); found {sorted(p.name for p in source.iterdir())[:12]}")
    if source.is_file():
        if source.suffix in (".safetensors",) + PICKLE_SUFFIXES:
            return "single_file"
        raise WeightsError(f"{source} is a file with suffix {source.suffix!r}; supported single files are "
                           f".safetensors (or {', '.join(PICKLE_SUFFIXES)} with allow_pickle=True)")
    raise WeightsError(f"{source} does not exist")


def load_text_encoder(source: str | os.PathLike, component: Optional[str] = None, *,
                      allow_pickle: bool = False, dtype: Optional[str] = None) -> TextEncoder:
    """Load a text encoder from any supported layout (see module docstring).

    component: the encoder inside a diffusers pipeline folder or an SDXL single file
    ("text_encoder", "text_encoder_2"). dtype: compute dtype ("float32", "bfloat16").
    """
    source = Path(source)
    layout = describe_layout(source)
    if component is not None and layout in ("transformers", "flax"):
        raise WeightsError(f"{source} is a {layout} folder holding one encoder; component must be None "
                           f"but is {component!r}")
    if layout == "pipeline":
        encoder = load_pipeline_component(source, component, allow_pickle)
    elif layout == "flax":
        encoder = load_flax_checkpoint(source)
    elif layout == "transformers":
        encoder = load_transformers_folder(source, allow_pickle)
    else:
        encoder = load_single_file(source, component, allow_pickle)
    if dtype is not None:
        encoder = type(encoder)(encoder.config.replace(dtype=dtype), encoder.params)
    return encoder


# --------------------------------------------------------------------------------------------
# Writers.

def save_text_encoder(encoder: TextEncoder, out_dir: str | os.PathLike, params=None, overwrite: bool = False,
                      inputs: Optional[Mapping[str, str | os.PathLike]] = None) -> Path:
    """Write a transformers folder (config.json + model.safetensors, `text_model.*` layout, float32).

    `CLIPTextModel` / `CLIPTextModelWithProjection.from_pretrained` (transformers 4.x and 5.x)
    load it with no missing or unexpected keys; it can replace a diffusers pipeline's
    text_encoder / text_encoder_2 folder.
    """
    from hirm_jax.encoder import t5_weights  # noqa: PLC0415
    if isinstance(encoder, t5_weights.T5Encoder):
        return t5_weights.save_t5_folder(encoder, out_dir, overwrite=overwrite, inputs=inputs, params=params)
    params = encoder.params if params is None else params
    state = flax_to_hf(params, encoder.config)
    state = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "hirm_jax_version": hirm_jax.__version__})
        (tmp / "config.json").write_text(json.dumps(encoder.config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def save_flax_checkpoint(encoder: TextEncoder, out_dir: str | os.PathLike, params=None,
                         overwrite: bool = False, inputs: Optional[Mapping[str, str | os.PathLike]] = None) -> Path:
    """Write a Flax checkpoint: config.json (format, version, TextEncoderConfig) + flax_params.msgpack.

    The params are stored as `flax.serialization.msgpack_serialize` of the numpy tree, in
    `param_dtype`; `load_text_encoder(out_dir)` reads it back bit for bit.
    """
    params = encoder.params if params is None else params
    check_params(params, encoder.config)
    numpy_params = serialization.to_state_dict(jax.tree_util.tree_map(np.asarray, params))
    meta = dict(format=FLAX_FORMAT, format_version=FLAX_FORMAT_VERSION, hirm_jax_version=hirm_jax.__version__,
                config=dataclasses.asdict(encoder.config))
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        (tmp / FLAX_PARAMS_NAME).write_bytes(serialization.msgpack_serialize(numpy_params))
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
