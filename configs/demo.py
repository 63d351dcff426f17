"""The demo world's erase config, as `hirm-jax demo` uses it (the data lives in hirm_jax.world.demo).

arg: "hirm_s" (default; misdirect toward the world's neutral anchor "blob" / "plain") or "hirm_r".
Or "hirm_s_adv": robust HiRM-S (objective.adversarial on).
The demo fills in the encoder path, the concept's trained names (all but its held-out synonym),
its kind, its prompt templates and the retain prompts of the preservation term; see
hirm_jax/world/demo.py.
"""

from hirm_jax.config_lib import check_config_arg
from hirm_jax.world.demo import demo_config

ARGS = ("hirm_s", "hirm_r", "hirm_s_adv")


def get_config(arg=None):
    return demo_config(check_config_arg("demo", arg, ARGS))
