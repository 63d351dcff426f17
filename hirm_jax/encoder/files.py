"""Weight files on disk: the one reader of safetensors, sharded indexes and (opt-in) pickles.

    state = read_weight_files(Path("text_encoder"))     # model.safetensors, or the index + shards
    files = weight_files(Path("text_encoder"))          # which files that reads, in that order

Both encoder families read their files here (`encoder.layouts` for CLIP, `encoder.t5_weights`
for T5). Pickled checkpoints (.ckpt, .pt, .pth, .bin) can run code when unpickled: they are
refused (PickleRefusedError) unless `allow_pickle=True`, and then read with
`torch.load(weights_only=True)`. Every bad file is a WeightsError naming it and the rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import safe_open

from hirm_jax.errors import HirmError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
FLAX_PARAMS_NAME = "flax_params.msgpack"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class WeightsError(HirmError, ValueError):
    """A checkpoint does not match the model: names the offending keys and the rule."""


def read_safetensors(path: Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, np.ndarray]:
    """The tensors of one .safetensors file whose names pass `keep` (only those are read);
    bfloat16 ones (numpy has no such type) upcast exactly to float32."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = [key for key in f.keys() if keep(key)]
            bf16 = {key for key in keys if f.get_slice(key).get_dtype() == "BF16"}
            tensors = {key: f.get_tensor(key) for key in keys if key not in bf16}
        if bf16:
            with safe_open(str(path), framework="flax") as f:
                tensors.update({key: np.asarray(f.get_tensor(key)).astype(np.float32) for key in bf16})
        return {key: tensors[key] for key in keys}
    except Exception as e:  # safetensors raises several types for corrupt/truncated files
        raise WeightsError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from e


def safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except Exception as e:
        raise WeightsError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from e


class PickleRefusedError(WeightsError):
    """A pickled checkpoint read without opting in; `path` is the file, `switch` names the opt-in."""

    def __init__(self, path: Path, switch: str = "allow_pickle=True (--allow-pickle)"):
        self.path = path
        super().__init__(f"{path} is a pickle ({path.suffix}); unpickling can run arbitrary code, so it is "
                         f"refused. Convert it to .safetensors, or pass {switch} if you trust it")


def read_pickle(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    if not allow_pickle:
        raise PickleRefusedError(path)
    try:
        import torch
    except ImportError as e:
        raise WeightsError(f"reading {path} needs torch (pip install torch)") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style SD .ckpt
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict but a {type(obj).__name__}")
    # float() upcasts fp16/bf16 exactly; numpy has no bfloat16 of its own.
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items() if torch.is_tensor(v)}


def read_json(path: Path) -> dict:
    """A JSON object from `path`; WeightsError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise WeightsError(f"{path} must hold a JSON object but holds a {type(value).__name__}")
    return value


DIFFUSERS_MODEL = "diffusion_pytorch_model"  # diffusers' file stem; transformers' is "model"


def weight_files(folder: Path, stem: str = "model") -> list[Path]:
    """The files a transformers (stem "model") or diffusers (stem DIFFUSERS_MODEL) folder's
    weights are read from, in order of preference: STEM.safetensors, else
    STEM.safetensors.index.json and its shards, else the pickle (pytorch_model.bin / STEM.bin)."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    pickle = folder / (PICKLE_WEIGHTS_NAME if stem == "model" else f"{stem}.bin")
    if single.is_file():
        return [single]
    if index.is_file():
        return [index, *(folder / shard for shard in sorted(set(weight_map(folder, stem).values())))]
    if pickle.is_file():
        return [pickle]
    raise WeightsError(f"{folder} has config.json but no {single.name}, {index.name} or {pickle.name}; "
                       f"found {sorted(p.name for p in folder.iterdir())}")


def read_weight_files(folder: Path, allow_pickle: bool = False, stem: str = "model") -> dict[str, np.ndarray]:
    """The state dict of a transformers or diffusers folder (see `weight_files`; a pickle only
    with allow_pickle)."""
    first = weight_files(folder, stem)[0]
    if first.name.endswith(".index.json"):
        return read_sharded(folder, stem)
    if first.suffix == ".safetensors":
        return read_safetensors(first)
    return read_pickle(first, allow_pickle)


def weight_map(folder: Path, stem: str = "model") -> dict[str, str]:
    index_path = folder / f"{stem}.safetensors.index.json"
    try:
        weight_map = read_json(index_path)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        return weight_map
    except (KeyError, TypeError) as e:
        raise WeightsError(f"{index_path} must be JSON with a 'weight_map' object but is not: {e}") from e


def read_sharded(folder: Path, stem: str = "model") -> dict[str, np.ndarray]:
    index_path = folder / f"{stem}.safetensors.index.json"
    listed_shards = weight_map(folder, stem)
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(listed_shards.values())):
        if not (folder / shard).is_file():
            raise WeightsError(f"{index_path} lists shard {shard!r}, which is not in {folder}")
        listed = {k for k, v in listed_shards.items() if v == shard}
        tensors = read_safetensors(folder / shard)
        if set(tensors) != listed:
            raise WeightsError(f"shard {shard} does not hold what {index_path.name} lists: missing "
                               f"{sorted(listed - set(tensors))[:8]}, unlisted {sorted(set(tensors) - listed)[:8]}")
        state.update(tensors)
    return state
