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

import argparse
import logging
import sys
from pathlib import Path

from hirm_jax.layouts import load_text_encoder, save_text_encoder
from hirm_jax.weights import WeightsError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="source checkpoint (Flax checkpoint or any other layout)")
    parser.add_argument("--component", default=None, help="text_encoder or text_encoder_2 (pipelines, SDXL files)")
    parser.add_argument("--out", required=True, help="output transformers folder (must not exist unless --overwrite)")
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
        out = save_text_encoder(encoder, args.out, overwrite=args.overwrite)
    except (WeightsError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
