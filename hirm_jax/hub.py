"""Hugging Face hub ids where a path is expected: `org/name` or `org/name@revision`.

    source = hub.resolve("CompVis/stable-diffusion-v1-4", component="text_encoder")
    load_text_encoder(source.path, "text_encoder"); run_json["base"]["revision"] = source.revision

A value that exists on disk is a path, whatever it looks like. Anything else shaped like
`org/name[@revision]` is fetched with `huggingface_hub.snapshot_download` into the usual cache
(HF_HOME, HF_HUB_CACHE), honouring HF_HUB_OFFLINE (then only the cache is read). For a text
encoder only its component folder, its tokenizer folder and model_index.json are downloaded
(safetensors only: no UNet, no VAE, no pickles; `encoder_patterns`); a whole pipeline
(`generate --pipeline`, `apply --base`) downloads everything but pickled duplicates of
safetensors weights. The snapshot's commit sha is the Source's `revision`, which every command
records (run.json, generation.json, hirm_applied.json).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Optional

from hirm_jax.errors import InputMissingError

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# Patterns are fnmatch-ed against repo paths, where `*` also matches "/": a pattern that starts with
# a wildcard would reach into every folder (unet/, vae/), so each one is anchored to a folder or a name.
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "spiece.model")
_TOP_LEVEL_WEIGHTS = ("config.json", "model*.safetensors", "model*.safetensors.index.json")  # transformers' names
_COMPONENT_WEIGHTS = ("config.json", "*.safetensors", "*.safetensors.index.json")  # under "<component>/"
_PICKLES = ["*.ckpt", "*.pt", "*.pth", "*.bin", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data"]


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a model lives on disk, and which hub snapshot it came from (None for a local path)."""

    path: Path
    hub_id: Optional[str] = None  # "org/name"
    revision: Optional[str] = None  # the commit sha of the snapshot

    def provenance(self) -> dict:
        """What run.json / hirm_applied.json record about this source."""
        if self.hub_id is None:
            return dict(source=str(self.path.resolve()))
        return dict(source=self.hub_id, revision=self.revision, snapshot=str(self.path))


def parse_hub_id(value: str) -> Optional[tuple[str, Optional[str]]]:
    """(repo_id, revision) when `value` looks like `org/name[@revision]` and is not an existing path
    (a path always wins, also a local folder named like `org/name`); None otherwise."""
    if not value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return None
    match = _HUB_ID.match(value)
    if match is None:
        return None
    return match.group("repo"), match.group("revision")


def _tokenizer_for(component: Optional[str]) -> list[str]:
    """A pipeline keeps the tokenizer of `text_encoder[_N]` in `tokenizer[_N]/`; a bare encoder
    repo keeps its tokenizer files at the top."""
    if component is None:
        return list(_TOKENIZER_FILES)
    suffix = component[len("text_encoder"):] if component.startswith("text_encoder") else ""
    return [f"tokenizer{suffix}/*"]


def encoder_patterns(component: Optional[str]) -> list[str]:
    """`allow_patterns` for a text encoder: model_index.json, the component's config and
    safetensors weights (a bare encoder repo: the top-level ones) and its tokenizer; never a
    UNet, VAE or any other component."""
    weights = [f"{component}/{name}" for name in _COMPONENT_WEIGHTS] if component else list(_TOP_LEVEL_WEIGHTS)
    return ["model_index.json", *weights, *_tokenizer_for(component)]


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def resolve(value: str | os.PathLike, component: Optional[str] = None, whole_pipeline: bool = False,
            what: str = "model") -> Source:
    """A local path as it is, or the snapshot folder of a hub id (downloaded unless cached).

    component: the text encoder inside a pipeline repo (only it and its tokenizer are fetched);
    whole_pipeline: fetch every component (for generation or for writing a patched pipeline)."""
    text = os.fspath(value)
    parsed = parse_hub_id(text)
    if parsed is None:
        if not os.path.exists(text):
            raise InputMissingError(f"{what} {text} does not exist (neither a local path nor a hub id "
                                    "of the form org/name or org/name@revision)")
        return Source(Path(text))
    repo_id, revision = parsed
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError  # also in hub < 0.23
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise InputMissingError(f"{what} {text} is a hub id, but huggingface_hub is not installed") from e
    patterns = None if whole_pipeline else encoder_patterns(component)
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=_PICKLES)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        hint = ("HF_HUB_OFFLINE is set and the hub cache (HF_HOME / HF_HUB_CACHE) has no snapshot of it"
                if _offline() else f"the hub refused or could not be reached: {type(e).__name__}: {e}")
        raise InputMissingError(f"{what} {text} does not exist as a local path, and as a hub id it could not be resolved: "
                                f"{hint}") from e
    folder = Path(folder)
    return Source(folder, hub_id=repo_id, revision=folder.name)
