"""Convert a CLIP text encoder from any supported layout to a Flax checkpoint.

    python convert/to_flax.py --src path/to/sd-pipeline --component text_encoder --out te_flax
    python convert/to_flax.py --src sd_xl_base_1.0.safetensors --component text_encoder_2 --out te2_flax
    python convert/to_flax.py --src v2-1_768-ema-pruned.safetensors --out sd21_te_flax

SRC: a transformers folder, a diffusers pipeline folder (with --component), a single-file
SD 1.x / 2.x / SDXL .safetensors, or a Flax checkpoint. The output folder holds config.json and
flax_params.msgpack (`hirm_jax.layouts.save_flax_checkpoint`); it is written atomically and
not at all on error. Exit code 2 on bad input. Prints the output folder on stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hirm_jax.layouts import load_text_encoder, save_flax_checkpoint
from hirm_jax.weights import WeightsError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="source checkpoint (folder or single file)")
    parser.add_argument("--component", default=None, help="text_encoder or text_encoder_2 (pipelines, SDXL files)")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.pt/.bin (runs the unpickler)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hirm_jax").setLevel(logging.INFO)
    if Path(args.out).exists() and not args.overwrite:  # before the (slow) load, not after
        print(f"error: output folder {args.out} already exists; choose another, remove it or pass --overwrite",
              file=sys.stderr)
        return 2
    try:
        encoder = load_text_encoder(args.src, args.component, allow_pickle=args.allow_pickle)
        out = save_flax_checkpoint(encoder, args.out, overwrite=args.overwrite)
    except (WeightsError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
