"""Convert a CLIP text encoder from any supported layout to a Flax checkpoint.

    python convert/to_flax.py --src path/to/sd-pipeline --component text_encoder --out te_flax
    python convert/to_flax.py --src sd_xl_base_1.0.safetensors --component text_encoder_2 --out te2_flax
    python convert/to_flax.py --src v2-1_768-ema-pruned.safetensors --out sd21_te_flax

SRC: a transformers folder, a diffusers pipeline folder (with --component), a single-file
SD 1.x / 2.x / SDXL .safetensors, or a Flax checkpoint. The output folder holds config.json and
flax_params.msgpack (`hirm_jax.encoder.layouts.save_flax_checkpoint`); it is written atomically and
not at all on error. Exit code 2 on bad input. Prints the output folder on stdout.
"""

from __future__ import annotations

import sys

from hirm_jax.cli import convert_main
from hirm_jax.encoder.layouts import save_flax_checkpoint


def main(argv=None) -> int:
    return convert_main(argv, __doc__, save_flax_checkpoint, src_help="source checkpoint (folder or single file)",
                        out_help="output folder (must not exist unless --overwrite)")


if __name__ == "__main__":
    sys.exit(main())
