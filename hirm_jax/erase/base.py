"""The base encoder an erase trains from: loaded, checked finite, and fingerprinted.

    encoder = load_base(hub.resolve("sd-v1-4/", component="text_encoder"), "text_encoder", allow_pickle=False)
    record = base_file_fingerprints(Path("sd-v1-4"), "text_encoder")   # {file: sha256}

The fingerprints go into run.json's `base` (`erase.workdir.BaseRecord`), so an export can
refuse a base that changed since erase.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from hirm_jax import hub
from hirm_jax.encoder.clip import TextEncoder
from hirm_jax.encoder.clip_weights import WeightsError
from hirm_jax.encoder.files import FLAX_PARAMS_NAME, PickleRefusedError, weight_files
from hirm_jax.encoder.layouts import describe_layout, load_text_encoder
from hirm_jax.erase import masking
from hirm_jax.fileio import sha256_file


ERASE_PICKLE_FLAG = "--config.encoder.allow_pickle=True"


def load_base(source: hub.Source, component: Optional[str], allow_pickle: bool) -> TextEncoder:
    """The base encoder, refused when any weight is NaN/inf (it would surface only as a NaN loss).

    A refused pickle names erase's own switch, encoder.allow_pickle (the loaders name the
    converters' --allow-pickle)."""
    try:
        encoder = load_text_encoder(source.path, component, allow_pickle=allow_pickle)
    except PickleRefusedError as e:
        raise PickleRefusedError(e.path, ERASE_PICKLE_FLAG) from e
    check_finite_weights(encoder.params, f"{source.path}" + (f" (component {component})" if component else ""))
    return encoder


def check_finite_weights(params, where: str) -> None:
    """Every base weight must be finite; the error names the first bad tensor by Flax path."""
    bad = {}
    for path, value in masking.flatten(params).items():
        value = np.asarray(value)
        if not np.isfinite(value).all():
            bad[path] = (int(np.isnan(value).sum()), int(np.isinf(value).sum()), value.size)
    if bad:
        path, (nans, infs, size) = sorted(bad.items())[0]
        others = f"; {len(bad) - 1} more tensor(s) too: {sorted(bad)[1:4]}" if len(bad) > 1 else ""
        raise WeightsError(f"the base encoder {where} has non-finite weights: {path} holds {nans} NaN and {infs} inf "
                           f"of {size} values{others}; every weight must be finite (a corrupt or badly converted "
                           "checkpoint?)")


def base_weight_files(path: Path, component: Optional[str]) -> list[Path]:
    """The files `load_text_encoder(path, component)` reads weights from, in the loaders' order of
    preference: model.safetensors, else the index and its shards, else pytorch_model.bin."""
    layout = describe_layout(path)
    if layout == "single_file":
        return [path]
    folder = path / component if layout == "pipeline" and component else path
    return [folder / FLAX_PARAMS_NAME] if layout == "flax" else weight_files(folder)


def base_file_fingerprints(path: Path, component: Optional[str]) -> dict[str, str]:
    """{file name relative to the source (a single file: its name): sha256} of the weight files."""
    return {(f.relative_to(path).as_posix() if path.is_dir() else f.name): sha256_file(f)
            for f in base_weight_files(path, component)}
