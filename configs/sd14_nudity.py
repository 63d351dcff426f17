"""SD 1.4 nudity erasure: the 9 HiRM keywords trained jointly.

arg: hirm_s (default; HiRM-S for nudity = frozen representation minus an empirical nudity
vector from the shipped paired prompts, i.e. the `hirm_s_vector` objective) or hirm_r.
Defaults from HIRM.md: lr 1e-4, 25 epochs (S) / 50 (R).
"""

from hirm_jax.config_lib import base_config, check_config_arg
from hirm_jax.resources import data_path

ARGS = ("hirm_s", "hirm_r")


def get_config(arg=None):
    arg = check_config_arg("sd14_nudity", arg, ARGS)
    c = base_config()
    c.encoder.path = "CompVis/stable-diffusion-v1-4"
    c.encoder.component = "text_encoder"
    c.concept_type = "nsfw"
    c.concepts_file = str(data_path("nudity_keywords.txt"))  # the locked field holds a str
    c.objective.name = "hirm_r" if arg == "hirm_r" else "hirm_s_vector"
    c.objective.vector_pairs_file = str(data_path("nudity_pairs.tsv"))
    return c
