"""Stable Diffusion 3: erase from its three text encoders (default), or from one of them.

SD3 conditions on the PENULTIMATE hidden states of its two CLIP encoders (`text_encoder`,
CLIP ViT-L/14, and `text_encoder_2`, OpenCLIP bigG, both with projection) and on their projected
pooled outputs (`text_embeds`), and on the last hidden state (`final_ln`) of its T5-XXL
`text_encoder_3`, padded to max_sequence_length = 256 tokens; those are the supervised
representations here, with HiRM's `last_mlp_out` for T5.

arg "all" (default): the three, one after the other, into WORKDIR/components/<component>/;
`hirm-jax export` writes one delta keyed by component.

    hirm-jax erase --config=sd3 --workdir=runs/sd3_vg \
        --config.encoder.path=/models/stable-diffusion-3-medium-diffusers \
        --config.concepts="('Van Gogh',)" --config.super_categories="{'Van Gogh': 'painting'}"

arg "text_encoder" / "text_encoder_2" / "text_encoder_3": that encoder only.
"""

from hirm_jax.config_lib import base_config, check_config_arg, with_components

ARGS = ("all", "text_encoder", "text_encoder_2", "text_encoder_3")
COMPONENT_FIELDS = {
    "text_encoder": {"objective.hooks": ("penultimate", "text_embeds")},
    "text_encoder_2": {"objective.hooks": ("penultimate", "text_embeds")},
    "text_encoder_3": {"objective.hooks": ("last_mlp_out", "final_ln"), "encoder.max_length": 256},
}


def get_config(arg=None):
    arg = check_config_arg("sd3", arg, ARGS)
    c = base_config()
    c.encoder.path = "stabilityai/stable-diffusion-3-medium-diffusers"
    c.concept_type = "style"
    c.concepts = ("Van Gogh",)
    c.super_categories = {"Van Gogh": "painting"}
    c.objective.name = "hirm_s"
    return with_components(c, arg, "all", COMPONENT_FIELDS)
