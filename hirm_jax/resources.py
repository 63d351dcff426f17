"""Data files shipped with hirm_jax (hirm_jax/data/), found without importing anything heavy.

    data_path("ordinary_prompts.txt")      # Path to the shipped file
    prompts.read_lines(data_path("nudity_keywords.txt"), "nudity keywords")   # its lines

Shipped: ordinary_prompts.txt (everyday captions for drift and preservation),
nudity_keywords.txt (HiRM's 9 nudity keywords), nudity_pairs.tsv (with/without-nudity
sentence pairs for a Ring-A-Bell-style concept vector), paraphrase_templates_style.txt and
paraphrase_templates_object.txt (held-out "{}" templates for the text report).
"""

from __future__ import annotations

from pathlib import Path

from hirm_jax.errors import InputMissingError

DATA_DIR = Path(__file__).resolve().parent / "data"  # in the wheel too: setup.py's PACKAGE_DATA


def data_path(name: str) -> Path:
    """The path of a shipped data file; InputMissingError (a FileNotFoundError) lists what is shipped."""
    path = DATA_DIR / name
    if not path.is_file():
        shipped = sorted(p.name for p in DATA_DIR.iterdir() if p.is_file()) if DATA_DIR.is_dir() else []
        raise InputMissingError(f"hirm_jax ships no data file {name!r}; it ships {shipped}")
    return path

