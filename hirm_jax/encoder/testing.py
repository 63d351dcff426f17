"""Random encoders with a real CLIP tokenizer, for tests, benchmarks and smoke runs.

    folder = random_encoder_folder("tmp/clip_l", TextEncoderConfig.clip_l())
    # a transformers folder (config.json + model.safetensors) with the tokenizer files beside
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hirm_jax.encoder.layouts import save_text_encoder
from hirm_jax.encoder.clip import TextEncoder, TextEncoderConfig
from hirm_jax.encoder.tokenizer import build_clip_tokenizer


def random_encoder_folder(out_dir: str | os.PathLike, config: TextEncoderConfig, seed: int = 0) -> Path:
    """Random weights (fixed seed) + the real CLIP tokenizer built offline from open_clip's vocabulary."""
    folder = save_text_encoder(TextEncoder.init(config, seed=seed), out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        build_clip_tokenizer(Path(tmp) / "tokenizer")
        for f in (Path(tmp) / "tokenizer").iterdir():
            shutil.copy(f, folder / f.name)
    return folder
