"""The base erase config; every other config starts here. See hirm_jax/config_lib.py for the
meaning and rules of each field.

    hirm-jax erase --config=default --config.encoder.path=PIPELINE \
        --config.concepts="('Van Gogh',)" --config.super_categories="{'Van Gogh': 'painting'}" --workdir=DIR
"""

from hirm_jax.config_lib import base_config


def get_config(arg=None):
    del arg
    return base_config()
