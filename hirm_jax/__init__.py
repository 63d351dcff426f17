"""hirm_jax: HiRM concept erasure for CLIP text encoders, in JAX/Flax.

The public names are imported on first use, so `hirm_jax.artifacts.delta` (applying a delta to
PyTorch weights) works where JAX is not installed.
"""

import importlib

__version__ = "0.1.0"

from hirm_jax import _compat  # noqa: E402  (old flat import paths, one release)

_compat.install()

_LAZY = {
    "TextEncoder": "hirm_jax.encoder.clip",
    "TextEncoderConfig": "hirm_jax.encoder.clip",
    "load_text_encoder": "hirm_jax.encoder.layouts",
    "save_text_encoder": "hirm_jax.encoder.layouts",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hirm_jax' has no attribute {name!r}")
