"""SDXL: erase from one of its two encoders; run once per encoder for both.

arg: "text_encoder" (CLIP ViT-L/14) or "text_encoder_2" (OpenCLIP bigG, with projection).
SDXL conditions on the PENULTIMATE hidden state of both encoders and on the projected pooled
output (`text_embeds`) of the second, so those are the supervised representations here.

    hirm-jax erase --config=sdxl:text_encoder_2 --workdir=runs/xl_te2 \
        --config.encoder.path=/models/sdxl-base-1.0 --config.concepts="('Van Gogh',)" \
        --config.super_categories="{'Van Gogh': 'painting'}"
"""

from hirm_jax.config_lib import base_config, check_config_arg

ARGS = ("text_encoder", "text_encoder_2")


def get_config(arg=None):
    arg = check_config_arg("sdxl", arg, ARGS)
    c = base_config()
    c.encoder.path = "stabilityai/stable-diffusion-xl-base-1.0"
    c.encoder.component = arg
    c.concept_type = "style"
    c.concepts = ("Van Gogh",)
    c.super_categories = {"Van Gogh": "painting"}
    c.objective.name = "hirm_s"
    c.objective.hooks = ("penultimate", "text_embeds") if c.encoder.component == "text_encoder_2" else ("penultimate",)
    return c
