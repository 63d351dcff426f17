"""The shipped erase configs, installed as the package `hirm_jax.configs` (see setup.py)."""
