"""SD 1.4 object erasure. arg: hirm_s (default) or hirm_r.

    hirm-jax erase --config=sd14_object:hirm_s --workdir=runs/cat \
        --config.encoder.path=/models/stable-diffusion-v1-4 \
        --config.concepts="('cat',)" --config.super_categories="{'cat': 'animal'}"

Defaults from HIRM.md: lr 5e-5, 15 epochs (S) / 25 (R).
"""

from hirm_jax.config_lib import base_config, check_config_arg

ARGS = ("hirm_s", "hirm_r")


def get_config(arg=None):
    arg = check_config_arg("sd14_object", arg, ARGS)
    c = base_config()
    c.encoder.path = "CompVis/stable-diffusion-v1-4"
    c.encoder.component = "text_encoder"
    c.concept_type = "object"
    c.concepts = ("cat",)
    c.super_categories = {"cat": "animal"}
    c.objective.name = arg
    return c
