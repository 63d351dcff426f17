"""Which parameters train, as data: split the tree into trainable and frozen parts, merge back.

Both parts are flat dicts {"encoder/layers/0/mlp/fc1/kernel": array}. Only the trainable
part is differentiated, optimised, donated and checkpointed; the frozen part is passed
through untouched, so frozen weights are bit-identical by construction (no optax.masked,
which hands raw gradients to masked-out leaves).
"""

from __future__ import annotations

import re
from typing import Sequence

from flax import traverse_util

from hirm_jax.config_lib import ConfigError

SEP = "/"


def flatten(params) -> dict:
    return traverse_util.flatten_dict(params, sep=SEP)


def unflatten(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep=SEP)


def trainable_paths(params, blocks: Sequence[int], modules: Sequence[str], regex: str = "",
                    architecture=None) -> list[str]:
    """Paths of the leaves that train: `regex` if given, else `modules` of `blocks`.

    `architecture` (`hirm_jax.encoder.architectures.Architecture`, default CLIP) says where the blocks
    are and which leaves a module name means; for T5 no module includes the relative
    attention bias block 0 holds for every block (see hirm_jax.encoder.architectures)."""
    if architecture is None:
        from hirm_jax.encoder.architectures import architecture as by_name  # noqa: PLC0415
        architecture = by_name("clip")
    paths = list(flatten(params))
    if regex:
        pattern = re.compile(regex)
        chosen = [p for p in paths if pattern.fullmatch(p)]
        rule = f"train.trainable_regex {regex!r}"
    else:
        num_layers = architecture.num_blocks(params)
        bad = [b for b in blocks if not -num_layers <= b < num_layers]
        if bad:
            raise ConfigError(f"train.trainable_blocks must index the {num_layers} blocks but has {bad}")
        prefixes = tuple(p for b in blocks for p in architecture.module_prefixes(b % num_layers, modules))
        chosen = [p for p in paths if p.startswith(prefixes)]
        rule = f"train.trainable_blocks {tuple(blocks)} and train.trainable_modules {tuple(modules)}"
    if not chosen:
        raise ConfigError(f"{rule} select no parameter; nothing would train")
    return chosen


def split(params, paths: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) flat dicts."""
    flat = flatten(params)
    chosen = set(paths)
    trainable = {p: v for p, v in flat.items() if p in chosen}
    frozen = {p: v for p, v in flat.items() if p not in chosen}
    return trainable, frozen


def merge(trainable: dict, frozen: dict) -> dict:
    """The full nested params tree again (cheap: dict plumbing at trace time)."""
    return unflatten({**frozen, **trainable})
