"""The one rule between flat and `text_model.`-prefixed CLIP weight names (no JAX, no numpy).

transformers 5 saves `CLIPTextModel` (and diffusers `text_encoder` folders) with flat names
(`encoder.layers.0...`); older files and `CLIPTextModelWithProjection` keep `text_model.*`.
The mapping tables use the prefixed (canonical) names; checkpoints are read through
`canonical_name` and patched in place through `name_in_checkpoint`.
"""

from __future__ import annotations

from typing import Collection, Optional

PREFIX = "text_model."
# Top-level modules of `text_model` that are saved without the prefix.
FLAT_PREFIXES = ("embeddings.", "encoder.", "final_layer_norm.")


def canonical_name(key: str) -> str:
    """A CLIP checkpoint's name in the mapping tables' form (`text_model.` added where flat)."""
    return PREFIX + key if key.startswith(FLAT_PREFIXES) else key


def name_in_checkpoint(canonical: str, available: Collection[str]) -> Optional[str]:
    """The name a checkpoint holding `available` uses for a canonical key (None: it has neither)."""
    if canonical in available:
        return canonical
    flat = canonical.removeprefix(PREFIX)
    return flat if flat != canonical and flat in available else None
