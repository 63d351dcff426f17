"""hirm_jax: HiRM concept erasure for CLIP text encoders, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="hirm_jax",
    version="0.1.0",
    description="HiRM concept erasure (high-level representation misdirection) in JAX/Flax",
    python_requires=">=3.10",
    packages=find_packages(include=["hirm_jax", "hirm_jax.*"]),
    include_package_data=True,
    package_data={"hirm_jax": ["data/*", "data/suites/*", "world/shipped/*", "world/shipped/*/*"]},
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
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["hirm-jax=hirm_jax.cli:main"]},
)
