"""Weights: ONE mapping between diffusers model folders and the Flax models of hirm_jax.pipelines,
both ways, with no torch.

The Flax modules are named with diffusers' dotted names, so a key is the parameter's path
joined with '.' and its leaf renamed; the layout change is a rule per leaf kind (LEAF_RULES):

    Flax leaf          diffusers leaf   transform
    kernel, 4-d        weight           conv: [kh, kw, in, out] <-> [out, in, kh, kw]
    kernel, 2-d        weight           linear: [in, out] <-> [out, in]
    scale              weight           (GroupNorm / LayerNorm)
    bias               bias

Every key of the folder is mapped, every Flax leaf is produced exactly once and every shape is
checked against `jax.eval_shape` of the module's init; anything else raises WeightsError naming
the keys. float16 / bfloat16 storage is upcast exactly to float32 parameters and written back
in the dtype asked for, so a load -> save round trip gives the same bytes.

    unet = load_unet("/models/sd15/unet")
    save_unet(unet, "out/unet", dtype="float16")
    vae = load_vae("/models/sd15/vae")                 # the decoding half (encoder keys skipped)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hirm_jax.encoder.files import DIFFUSERS_MODEL, WeightsError, read_json, read_weight_files
from hirm_jax.fileio import atomic_dir, save_safetensors
from hirm_jax.pipelines.unet import UNet, UNetConfig, UNet2DConditionModel
from hirm_jax.pipelines.vae import VAE, Decoder, VAEConfig

LEAF_RULES: dict[tuple[str, int], tuple[str, Callable, Callable]] = {
    ("kernel", 4): ("weight", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
    ("kernel", 2): ("weight", lambda w: w.T, lambda k: k.T),
    ("scale", 1): ("weight", lambda w: w, lambda s: s),
    ("bias", 1): ("bias", lambda b: b, lambda b: b),
}
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def _leaves(abstract: dict) -> dict[tuple, jax.ShapeDtypeStruct]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def _rule(path: tuple, ndim: int) -> tuple[str, str, Callable, Callable]:
    """(diffusers key, its leaf name, to_flax, to_diffusers) of a Flax leaf."""
    if (path[-1], ndim) not in LEAF_RULES:
        raise WeightsError(f"no mapping rule for the Flax leaf {'/'.join(path)} ({ndim}-d)")
    name, to_flax, to_diffusers = LEAF_RULES[(path[-1], ndim)]
    return ".".join((*path[:-1], name)), name, to_flax, to_diffusers


def diffusers_to_flax(state: dict[str, np.ndarray], abstract: dict, where: str, skip: tuple = ()) -> dict:
    """Nested Flax params (float32) from a diffusers state dict, checked against `abstract`
    (jax.eval_shape of the module's init params); keys starting with a `skip` prefix (parts
    of the model not built, e.g. the VAE's encoder) are left out."""
    state = {k: v for k, v in state.items() if not k.startswith(skip)} if skip else state
    leaves = _leaves(abstract)
    rules = {path: _rule(path, len(leaf.shape)) for path, leaf in leaves.items()}
    keys = {path: rule[0] for path, rule in rules.items()}
    missing = sorted(set(keys.values()) - set(state))
    unexpected = sorted(set(state) - set(keys.values()))
    if missing or unexpected:
        raise WeightsError(f"{where} does not match the model its config describes: missing {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                           f"{' ...' if len(unexpected) > 8 else ''}")
    params: dict = {}
    for path, leaf in leaves.items():
        key, _, to_flax, to_diffusers = rules[path]
        value = np.asarray(to_flax(np.asarray(state[key])))
        if value.shape != tuple(leaf.shape):
            raise WeightsError(f"{where}: {key} has shape {np.shape(state[key])}, the config asks for "
                               f"{to_diffusers(np.broadcast_to(np.float32(0), leaf.shape)).shape}")
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)
    return params


def flax_to_diffusers(params: dict, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The diffusers state dict of Flax params, stored as `dtype`."""
    if dtype not in STORAGE_DTYPES:
        raise WeightsError(f"storage dtype must be one of {STORAGE_DTYPES} but is {dtype!r}")
    state = {}
    for path, leaf in _leaves(params).items():
        key, _, _, to_diffusers = _rule(path, np.ndim(leaf))
        state[key] = np.ascontiguousarray(to_diffusers(np.asarray(leaf, np.float32)).astype(jnp.dtype(dtype)))
    return state


def unet_abstract(config: UNetConfig) -> dict:
    """The shapes of a UNet's parameters (no memory used), from the smallest valid inputs."""
    size = 2 ** (len(config.block_out_channels) - 1)
    added = None
    if config.addition_embed_type == "text_time":
        text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": jnp.zeros((1, text)), "time_ids": jnp.zeros((1, 6))}
    init = lambda: UNet2DConditionModel(config).init(
        jax.random.key(0), jnp.zeros((1, size, size, config.in_channels)), jnp.zeros((1,)),
        jnp.zeros((1, 1, config.cross_attention_dim)), added)["params"]
    return jax.eval_shape(init)


def vae_abstract(config: VAEConfig) -> dict:
    size = 2 ** (len(config.block_out_channels) - 1)
    return jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0),
                                                       jnp.zeros((1, size, size, config.latent_channels)))["params"])


def _read_folder(folder: str | os.PathLike, class_name: str) -> tuple[Path, dict]:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder} is not a diffusers model folder: it has no config.json")
    raw = read_json(folder / "config.json")
    if raw.get("_class_name", class_name) != class_name:
        raise WeightsError(f"{folder}/config.json describes a {raw['_class_name']}, not a {class_name}")
    return folder, raw


def _params(folder: Path, abstract: dict, skip: tuple = ()) -> dict:
    state = read_weight_files(folder, allow_pickle=False, stem=DIFFUSERS_MODEL)  # pickles are never read
    return jax.tree_util.tree_map(jnp.asarray, diffusers_to_flax(state, abstract, str(folder), skip))


def load_unet(folder: str | os.PathLike, dtype: str = "float32") -> UNet:
    """A diffusers UNet2DConditionModel folder (config.json + diffusion_pytorch_model.safetensors
    or its sharded index) as a Flax UNet computing in `dtype`."""
    folder, raw = _read_folder(folder, "UNet2DConditionModel")
    config = UNetConfig.from_diffusers(raw, dtype)
    return UNet(config, _params(folder, unet_abstract(config)), raw)


def load_vae(folder: str | os.PathLike, dtype: str = "float32") -> VAE:
    """A diffusers AutoencoderKL folder's decoding half as a Flax VAE computing in `dtype`."""
    folder, raw = _read_folder(folder, "AutoencoderKL")
    config = VAEConfig.from_diffusers(raw, dtype)
    return VAE(config, _params(folder, vae_abstract(config), skip=("encoder.", "quant_conv.")), raw)


def save_unet(unet: UNet, out_dir: str | os.PathLike, dtype: str = "float32", overwrite: bool = False) -> Path:
    """A diffusers folder UNet2DConditionModel.from_pretrained loads (its own config.json kept)."""
    state = flax_to_diffusers(unet.params, dtype)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_safetensors(state, tmp / f"{DIFFUSERS_MODEL}.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(unet.source_config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
