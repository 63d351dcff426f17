"""hirm_jax: HiRM concept erasure for CLIP text encoders, in JAX/Flax.

What the wheel holds (and nothing else; the rule `tests/test_bad_input_packaging.py` checks):
- the Python packages under hirm_jax/;
- the repository's configs/ as the package `hirm_jax.configs`, so `--config=sd14_style:hirm_s`
  finds the shipped configs from any folder once installed;
- the data files named in PACKAGE_DATA (globs match files only), declared explicitly. `include_package_data` stays off:
  with it, setuptools takes every file under the package from the source manifest and warns
  once per data folder ("Package 'hirm_jax.world.shipped.unet' is absent from the `packages`
  configuration").
"""

from setuptools import find_packages, setup

CONFIGS_PACKAGE = "hirm_jax.configs"
PACKAGE_DATA = {
    "hirm_jax": [
        "data/*",  # prompts, keywords, templates (hirm_jax.resources)
        "data/suites/*",  # evaluation suite specs and their data (hirm_jax.evaluation.suites)
        "world/shipped/*", "world/shipped/*/*",  # the demo world (hirm_jax.world.SHIPPED)
    ],
}

setup(
    name="hirm_jax",
    version="0.1.0",
    description="HiRM concept erasure (high-level representation misdirection) in JAX/Flax",
    python_requires=">=3.10",
    packages=[*find_packages(include=["hirm_jax", "hirm_jax.*"]), CONFIGS_PACKAGE],
    package_dir={CONFIGS_PACKAGE: "configs"},
    include_package_data=False,
    package_data=PACKAGE_DATA,
    install_requires=[
        "jax>=0.8",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "transformers>=4.40",
        "safetensors>=0.4",
        "numpy>=1.26",
        "absl-py",
        "matplotlib",
        "pillow",
    ],
    extras_require={
        "torch": ["torch>=2.2", "diffusers>=0.30", "accelerate>=0.30"],
        "eval": ["nudenet==3.4.2", "onnxruntime>=1.16"],
        "test": ["pytest>=8", "pytest-xdist>=3"],
    },
    entry_points={"console_scripts": ["hirm-jax=hirm_jax.cli:main"]},
)
