"""The demo world's erase config (used by `hirm-jax demo`): HiRM on the shipped world encoder.

arg: "hirm_s" (default; misdirect toward the world's neutral anchor, "blob" or "plain") or
"hirm_r". The demo fills in the encoder path, the concept, its kind and its prompt templates
(the world's training caption templates, with every class of the other kind filled in, so
the concept is erased in the contexts the denoiser was trained on; the evaluation uses
held-out templates and seeds).
"""

from hirm_jax.config_lib import base_config


def get_config(arg="hirm_s"):
    c = base_config()
    c.encoder.component = ""
    c.objective.name = arg or "hirm_s"
    c.train.learning_rate = 1e-3
    c.train.epochs = 60
    c.train.log_every = 20
    c.train.checkpoint_every = 1000
    c.report.enabled = False
    return c
