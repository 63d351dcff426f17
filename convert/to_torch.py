"""Convert a CLIP text encoder (usually a Flax checkpoint) to a transformers folder.

    python convert/to_torch.py --src te_flax --out te_torch
    cp -r te_torch/. my-sd-pipeline/text_encoder/     # or point diffusers at it

The output (config.json + model.safetensors, `text_model.*` names, float32) loads with
`CLIPTextModel` / `CLIPTextModelWithProjection.from_pretrained` under transformers 4.x and 5.x
with no missing or unexpected keys, and can replace a diffusers pipeline's text_encoder or
text_encoder_2 folder. SRC may be any layout `convert/to_flax.py` accepts. Written atomically,
not at all on error; exit code 2 on bad input. Prints the output folder on stdout.
"""

from __future__ import annotations

import sys

from hirm_jax.cli import convert_main
from hirm_jax.encoder.layouts import save_text_encoder


def main(argv=None) -> int:
    return convert_main(argv, __doc__, save_text_encoder, src_help="source checkpoint (Flax checkpoint or any other layout)",
                        out_help="output transformers folder (must not exist unless --overwrite)")


if __name__ == "__main__":
    sys.exit(main())
