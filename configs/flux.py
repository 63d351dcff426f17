"""Flux: erase from its CLIP ViT-L/14 `text_encoder` slot (T5 is left as is, which is why
transfer to Flux is partial). Flux reads only the pooled EOS output of CLIP, so it is
supervised together with the paper's default hook.

    hirm-jax erase --config=flux --workdir=runs/flux_vg \
        --config.encoder.path=/models/FLUX.1-dev --config.concepts="('Van Gogh',)" \
        --config.super_categories="{'Van Gogh': 'painting'}"
"""

from hirm_jax.config_lib import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.encoder.path = "black-forest-labs/FLUX.1-dev"
    c.encoder.component = "text_encoder"
    c.concept_type = "style"
    c.concepts = ("Van Gogh",)
    c.super_categories = {"Van Gogh": "painting"}
    c.objective.name = "hirm_s"
    c.objective.hooks = ("last_mlp_out", "final_ln")
    return c
