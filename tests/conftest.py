"""Every test runs with 8 fake CPU devices, so sharded code paths are exercised on a laptop."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (after XLA_FLAGS)

assert jax.device_count() == 8, f"tests expect 8 fake CPU devices, found {jax.device_count()}"
