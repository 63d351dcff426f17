"""hirm_jax: HiRM concept erasure for CLIP text encoders, in JAX/Flax.

The public names are imported on first use, so `hirm_jax.delta` (applying a delta to
PyTorch weights) works where JAX is not installed.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "TextEncoder": "hirm_jax.model",
    "TextEncoderConfig": "hirm_jax.model",
    "load_text_encoder": "hirm_jax.layouts",
    "save_text_encoder": "hirm_jax.layouts",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hirm_jax' has no attribute {name!r}")
