"""What produced an artifact: package versions and the git commit, recorded in every output."""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Optional

import hirm_jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "diffusers", "torch", "safetensors", "numpy",
            "accelerate", "nudenet", "onnxruntime")


@functools.lru_cache(maxsize=1)
def git_hash() -> Optional[str]:
    """The commit of the hirm_jax checkout (with '+dirty' for uncommitted changes), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, Optional[str]]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance() -> dict:
    return dict(hirm_jax_version=hirm_jax.__version__, git_hash=git_hash(), package_versions=package_versions())
