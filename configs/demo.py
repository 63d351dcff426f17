"""The demo world's erase config, as `hirm-jax demo` uses it (the data lives in hirm_jax.demo).

arg: "hirm_s" (default; misdirect toward the world's neutral anchor "blob" / "plain") or "hirm_r".
The demo fills in the encoder path, the concept, its kind, its prompt templates and the retain
prompts of the preservation term; see hirm_jax/demo.py.
"""

from hirm_jax.demo import demo_config


def get_config(arg="hirm_s"):
    return demo_config(arg)
