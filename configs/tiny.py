"""A tiny config for tests and smoke runs: a few steps on a small encoder folder.

arg: "hirm_s" (default) or "hirm_r". Set --config.encoder.path to a transformers folder
with a tokenizer (tests build one).
"""

from hirm_jax.config_lib import base_config, check_config_arg

ARGS = ("hirm_s", "hirm_r")


def get_config(arg=None):
    arg = check_config_arg("tiny", arg, ARGS)
    c = base_config()
    c.encoder.component = ""
    c.concept_type = "style"
    c.concepts = ("Van Gogh",)
    c.super_categories = {"Van Gogh": "painting"}
    c.templates = ("{}", "a painting by {}", "an image in the style of {}")
    c.objective.name = arg
    c.train.learning_rate = 1e-3
    c.train.epochs = 30
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.report.enabled = False
    return c
