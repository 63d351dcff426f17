"""SD 1.4 style erasure (CLIP ViT-L/14 `text_encoder`), as the HiRM paper and reference README.

    hirm-jax erase --config=sd14_style:hirm_s --workdir=runs/vangogh \
        --config.encoder.path=/models/stable-diffusion-v1-4 \
        --config.concepts="('Van Gogh',)" --config.super_categories="{'Van Gogh': 'painting'}"

arg: hirm_s (default; super-category target) or hirm_r (random target, c = 500).
`--config=sd14_style:ARG` finds this file from any folder; `configs/sd14_style.py:ARG` works too.
The example concept is replaced with --config.concepts (or cleared with --config.concepts="()"
to read --config.concepts_file instead; setting both is an error).
Defaults from HIRM.md: lr 5e-5, 30 epochs (S) / 40 (R), the bare keyword as the prompt.
"""

from hirm_jax.config_lib import base_config, check_config_arg

ARGS = ("hirm_s", "hirm_r")


def get_config(arg=None):
    arg = check_config_arg("sd14_style", arg, ARGS)
    c = base_config()
    c.encoder.path = "CompVis/stable-diffusion-v1-4"  # a local folder on machines without hub access
    c.encoder.component = "text_encoder"
    c.concept_type = "style"
    c.concepts = ("Van Gogh",)
    c.super_categories = {"Van Gogh": "painting"}
    c.objective.name = arg
    return c
