"""Concepts and the prompts built from them.

A concept list file is TSV, one concept per line: `concept [\t super-category [\t type]]`;
lines starting with '#' are comments. Every problem is reported with its line number
before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from hirm_jax.config_lib import CONCEPT_TYPES, ConfigError, name_key
from hirm_jax.encoder.tokenizer import TOKENIZER_FILES, load_clip_tokenizer


@dataclasses.dataclass(frozen=True)
class Concept:
    name: str
    anchor: Optional[str]  # the super-category HiRM-S misdirects toward
    type: str
    where: str = ""  # "file:line" or "config.concepts[i]", for error messages


@dataclasses.dataclass(frozen=True)
class PromptPair:
    prompt: str  # contains the concept
    anchor_prompt: Optional[str]  # the same prompt with the concept replaced by its anchor
    concept: str


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty, non-comment lines of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def parse_concepts_file(path: str | Path, default_type: str) -> list[Concept]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"concepts_file {path} does not exist")
    concepts = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if raw.lstrip().startswith("#"):
            continue
        if not raw.strip():
            raise ConfigError(f"{path}:{number}: blank line; every line must name a concept")
        fields = [f.strip() for f in raw.split("\t")]
        if len(fields) > 3:
            raise ConfigError(f"{path}:{number}: expected 'concept[\\tsuper-category[\\ttype]]' but got {len(fields)} columns")
        name = fields[0]
        anchor = fields[1] if len(fields) > 1 and fields[1] else None
        kind = fields[2] if len(fields) > 2 and fields[2] else default_type
        if kind not in CONCEPT_TYPES:
            raise ConfigError(f"{path}:{number}: type must be one of {list(CONCEPT_TYPES)} but is {kind!r}")
        concepts.append((number, Concept(name, anchor, kind, f"{path}:{number}")))
    return _check_concepts(concepts, where=str(path))


def concepts_from_config(config) -> list[Concept]:
    """The concept list of a config (inline `concepts` or `concepts_file`; config_lib.validate
    refuses both), validated.

    An inline concept's super-category is looked up in `super_categories` by name compared
    case-insensitively (as duplicates are); names may hold dots ("Dr. Seuss")."""
    if config.concepts_file:
        concepts = parse_concepts_file(config.concepts_file, config.concept_type)
    else:
        anchors = {name_key(name): anchor for name, anchor in config.super_categories.items()}
        concepts = _check_concepts(
            [(i, Concept(str(name).strip(), anchors.get(name_key(name)), config.concept_type,
                         f"config.concepts[{i - 1}]"))
             for i, name in enumerate(config.concepts, start=1)], where="config.concepts")
    if not concepts:
        raise ConfigError("the concept list is empty: nothing to erase")
    if config.objective.name == "hirm_s":
        missing = [c for c in concepts if not c.anchor]
        if missing:
            raise ConfigError(
                f"hirm_s needs a super-category for every concept, but {[c.name for c in missing]} "
                f"({missing[0].where}) have none (set config.super_categories or the second column of concepts_file)")
    return concepts


def _check_concepts(numbered: list[tuple[int, Concept]], where: str) -> list[Concept]:
    seen: dict[str, int] = {}
    for number, concept in numbered:
        if not concept.name:
            raise ConfigError(f"{concept.where}: empty concept name")
        key = name_key(concept.name)
        if key in seen:
            raise ConfigError(f"{concept.where}: {concept.name!r} duplicates entry {seen[key]} of {where} "
                              "(names are compared case-insensitively)")
        seen[key] = number
    return [c for _, c in numbered]


def build_prompt_pairs(concepts: Sequence[Concept], templates: Sequence[str]) -> list[PromptPair]:
    """Every concept in every template, with its anchor substituted in the same template."""
    return [
        PromptPair(t.format(c.name), t.format(c.anchor) if c.anchor else None, c.name)
        for c in concepts for t in templates
    ]


# transformers 5 saves only tokenizer.json; older savers write vocab.json + merges.txt.


def tokenizer_folder(encoder_path: str | Path, component: Optional[str], tokenizer_path: Optional[str]) -> Path:
    """Where an encoder's tokenizer lives: explicit path; a pipeline's tokenizer(_N) folder
    beside the component text_encoder(_N) (Flux's T5 text_encoder_2 -> tokenizer_2, SD3's
    text_encoder_3 -> tokenizer_3); or the encoder folder itself."""
    if tokenizer_path:
        return Path(tokenizer_path)
    encoder_path = Path(encoder_path)
    if encoder_path.is_dir() and component:
        suffix = component.removeprefix("text_encoder")
        return encoder_path / (f"tokenizer{suffix}" if suffix in ("_2", "_3") else "tokenizer")
    if encoder_path.is_dir() and any((encoder_path / f).is_file() for f in (*TOKENIZER_FILES, "spiece.model")):
        return encoder_path
    raise ConfigError(
        f"cannot find a tokenizer for {encoder_path}: set encoder.tokenizer to a folder with "
        "tokenizer.json or vocab.json + merges.txt (a single-file checkpoint carries none)")


def load_tokenizer(encoder_path: str | Path, component: Optional[str] = None, tokenizer_path: Optional[str] = None,
                   architecture=None):
    """The encoder's own tokenizer, through transformers: CLIP's, or T5's when `architecture`
    (`hirm_jax.encoder.architectures.Architecture`) says so. `encoder_path` may be a hub id
    (`org/name[@revision]`, resolved through the hub cache as `hirm_jax.hub.resolve` does)."""
    from hirm_jax import hub
    if not tokenizer_path:
        encoder_path = hub.resolve(encoder_path, component=component, what="encoder.path").path
    load = load_clip_tokenizer if architecture is None else architecture.load_tokenizer
    return load(tokenizer_folder(encoder_path, component, tokenizer_path))
