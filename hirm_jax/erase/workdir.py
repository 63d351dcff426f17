"""An erase workdir on disk: its files, their typed records, written and read here only.

    wd = Workdir("workdirs/vangogh")
    record = wd.read_run()                    # RunRecord (run.json), old workdirs included
    loaded = load_run("workdirs/vangogh")     # ErasedRun: base encoder + erased params + record

A finished workdir holds
    config.json                     the resolved config (`config_lib.from_resolved` reads it back)
    run.json                        RunRecord: base, concepts, anchors, objective, hyper-parameters,
                                    provenance (and, for a joint run, timings_s)
    erased_trainable.safetensors    the trained leaves, keyed by Flax path
    metrics.jsonl, loss.png         the loss curve
    checkpoints/                    orbax training state (resume)
    .lock                           held (flock) by the erase running in it
and, for independent jobs (joint=False), one folder per concept under concepts/ (each with its
own run.json and erased_trainable.safetensors) instead of the top-level two, plus index.json
(IndexRecord: concept -> folder, the chunks, timings). A several-encoder erase (config
`components`, e.g. Flux's CLIP-L and T5) holds config.json and one such workdir per component
under components/<component>/.

run.json's `base` (BaseRecord) says which base the deltas apply to: `source` (an absolute path,
or the hub id with its `revision` and local `snapshot`), `component`, `trainable_sha256`
({Flax path: `fileio.fingerprint` of the base value} for every trained leaf) and `files_sha256`
({file relative to the source: sha256} of the weight files the base was read from).

Schema: records carry `schema_version` (2). Workdirs of hirm_jax 0.1 have none (version 1) and
may lack fields added since (base fingerprints, encoder_config): they load, with None there.

Rules for a workdir: it is absent, empty, or one an erase wrote (anything else, such as an
encoder folder, is refused before it is touched); resuming needs the same config (the mesh and
the logging/checkpoint cadence may differ).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, NamedTuple, Optional

import ml_collections
import numpy as np
from safetensors.numpy import load_file

from hirm_jax import config_lib, hub, log
from hirm_jax.encoder.architectures import architecture_of
from hirm_jax.encoder.clip import TextEncoder
from hirm_jax.encoder.clip_weights import WeightsError
from hirm_jax.encoder.files import FLAX_PARAMS_NAME
from hirm_jax.encoder.layouts import describe_layout, load_text_encoder
from hirm_jax.erase.masking import flatten, unflatten
from hirm_jax.errors import HirmError, OutputError
from hirm_jax.fileio import atomic_file, fingerprint, safetensors_bytes, write_json

SCHEMA_VERSION = 2  # 1: hirm_jax 0.1 (no schema_version field)
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
INDEX_FILE = "index.json"
TRAINED_FILE = "erased_trainable.safetensors"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
CHECKPOINTS_DIR = "checkpoints"
CONCEPTS_DIR = "concepts"
COMPONENTS_DIR = "components"

_log = log.get(__name__)


class RunError(HirmError, ValueError):
    """A workdir is missing, unfinished or corrupt."""


def slug(name: str) -> str:
    """A folder name for a concept: readable, and unique by a hash of the exact name."""
    readable = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40] or "concept"
    return f"{readable}-{zlib.crc32(name.encode('utf-8')):08x}"


# ----------------------------------------------------------------------------- records

@dataclasses.dataclass(frozen=True)
class BaseRecord:
    """The base encoder a run trained from (run.json's and index.json's `base`)."""
    source: str
    component: Optional[str] = None
    revision: Optional[str] = None  # hub sources only, with snapshot
    snapshot: Optional[str] = None
    trainable_sha256: Optional[dict] = None  # absent in 0.1 workdirs
    files_sha256: Optional[dict] = None

    def to_json(self) -> dict:
        hub_fields = ("revision", "snapshot") if self.revision is not None else ()
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("revision", "snapshot") or k in hub_fields}

    @classmethod
    def from_json(cls, d: dict) -> "BaseRecord":
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


class _Record:
    """to_json / from_json of the records in run.json and index.json."""

    def to_json(self) -> dict:
        """The record as its file holds it (timings_s only once there are timings)."""
        out = {**dataclasses.asdict(self), "base": self.base.to_json()}
        if out.get("timings_s", {}) is None:
            del out["timings_s"]
        return out

    @classmethod
    def from_json(cls, d: dict):
        """Unknown keys are ignored, missing or null ones take their defaults, no schema_version
        means version 1 (hirm_jax 0.1); a missing required field is a TypeError."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in d.items() if k in known and v is not None}
        fields["base"] = BaseRecord.from_json(d["base"])
        fields.setdefault("schema_version", 1)
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class RunRecord(_Record):
    """run.json: one erasure (a joint run, or one concept of a joint=False run)."""
    base: BaseRecord
    concepts: list
    trainable_paths: list
    anchors: dict = dataclasses.field(default_factory=dict)
    prompts: list = dataclasses.field(default_factory=list)  # [{prompt, anchor_prompt, concept}]
    final_loss: Optional[float] = None
    component_name: str = "text_encoder"
    encoder_config: Optional[dict] = None
    concept_type: Optional[str] = None
    objective: Optional[dict] = None
    preservation: Optional[dict] = None
    train: Optional[dict] = None
    method: str = "hirm"
    seed: Optional[int] = None
    steps: Optional[int] = None
    hirm_jax_version: Optional[str] = None
    git_hash: Optional[str] = None
    package_versions: Optional[dict] = None
    timings_s: Optional[dict] = None  # joint runs, once finished
    schema_version: int = SCHEMA_VERSION


@dataclasses.dataclass(frozen=True)
class IndexRecord(_Record):
    """index.json of a joint=False run: concept -> its folder (relative to the workdir)."""
    concepts: dict
    base: BaseRecord
    objective: Optional[dict] = None
    steps: Optional[int] = None
    chunks: list = dataclasses.field(default_factory=list)
    timings_s: Optional[dict] = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_json(cls, d: dict) -> "IndexRecord":
        """An index without `base` (written by hand, or by a tool) still lists its concepts: the
        base each concept trained from is in its own run.json."""
        return super().from_json({"base": {"source": None}, **d} if d.get("base") is None else d)


# ----------------------------------------------------------------------------- the folder

class Workdir:
    """The files of one erase workdir (or of one concept folder of a joint=False run)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    config_path = property(lambda self: self.path / CONFIG_FILE)
    run_path = property(lambda self: self.path / RUN_FILE)
    index_path = property(lambda self: self.path / INDEX_FILE)
    trained_path = property(lambda self: self.path / TRAINED_FILE)
    metrics_path = property(lambda self: self.path / METRICS_FILE)
    loss_plot_path = property(lambda self: self.path / LOSS_PLOT_FILE)
    checkpoints_dir = property(lambda self: self.path / CHECKPOINTS_DIR)

    def concept_folder(self, name: str) -> Path:
        return self.path / CONCEPTS_DIR / slug(name)

    def component_workdirs(self) -> dict[str, "Workdir"]:
        """{component: its workdir} of a several-encoder erase (config `components`); {} otherwise."""
        saved = self.saved_config() or {}
        return {name: Workdir(self.path / COMPONENTS_DIR / name) for name in sorted(saved.get("components") or {})}

    def run_workdir(self) -> "Workdir":
        """The workdir that holds config.json: this one, or, for a concepts/<slug> folder, its run's."""
        parent = self.path.parent.parent
        if not self.config_path.is_file() and self.path.parent.name == CONCEPTS_DIR and (parent / CONFIG_FILE).is_file():
            return Workdir(parent)
        return self

    # --- config.json
    def saved_config(self) -> Optional[dict]:
        """The config.json an erase wrote (None when there is none, or it is another program's
        config.json: an erase config has encoder, objective and train sections)."""
        try:
            saved = json.loads(self.config_path.read_text())
        except (OSError, ValueError):
            return None
        return saved if isinstance(saved, dict) and {"encoder", "objective", "train"} <= set(saved) else None

    def read_config(self) -> ml_collections.ConfigDict:
        """The run's resolved config (from this folder or its run's), as a ConfigDict."""
        path = self.run_workdir().config_path
        try:
            resolved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{path} is missing or corrupt ({e}); run `hirm-jax erase` first") from e
        return config_lib.from_resolved(resolved)

    def write_config(self, resolved: dict) -> None:
        write_json(self.config_path, resolved)

    # --- run.json, index.json, the trained leaves
    def read_run(self) -> RunRecord:
        try:
            return RunRecord.from_json(json.loads(self.run_path.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise _need_erase(self.path, f"{RUN_FILE} is corrupt or incomplete ({type(e).__name__}: {e})") from e

    def write_run(self, record: RunRecord) -> None:
        write_json(self.run_path, record.to_json())

    def read_index(self) -> IndexRecord:
        if not self.index_path.is_file():
            raise _need_erase(self.path, f"{INDEX_FILE} is missing (not a joint=False run)")
        try:
            index = IndexRecord.from_json(json.loads(self.index_path.read_text()))
            if not isinstance(index.concepts, dict):
                raise TypeError(f"concepts is a {type(index.concepts).__name__}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _need_erase(self.path, f"{INDEX_FILE} is corrupt ({type(e).__name__}: {e})") from e
        if not index.concepts:
            raise _need_erase(self.path, f"{INDEX_FILE} lists no concepts")
        return index

    def write_index(self, index: IndexRecord) -> None:
        write_json(self.index_path, index.to_json())

    def concept_workdirs(self) -> dict[str, "Workdir"]:
        """{concept: its folder} of a joint=False run, in index.json's order."""
        return {name: Workdir(self.path / folder) for name, folder in self.read_index().concepts.items()}

    def write_trained(self, trained: dict[str, np.ndarray], producer: str) -> None:
        with atomic_file(self.trained_path, "wb") as f:
            f.write(safetensors_bytes(trained, metadata={"format": "flax", "producer": producer}))

    def read_trained(self, trainable_paths: list) -> dict[str, np.ndarray]:
        if not self.trained_path.is_file():
            raise _need_erase(self.path, f"{TRAINED_FILE} is missing")
        try:
            trained = load_file(str(self.trained_path))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise _need_erase(self.path, f"{TRAINED_FILE} is unreadable ({e})") from e
        if sorted(trained) != sorted(trainable_paths):
            raise _need_erase(self.path, f"{TRAINED_FILE} holds {sorted(trained)} but {RUN_FILE} lists "
                                         f"trainable_paths {sorted(trainable_paths)}")
        return trained

    # --- metrics.jsonl
    def append_metrics(self, rows: list[dict]) -> None:
        with open(self.metrics_path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def drop_torn_metrics_tail(self) -> None:
        """Cut a torn last line (a process killed in the middle of writing it) off metrics.jsonl,
        so the rows appended next start on a line of their own."""
        if not self.metrics_path.is_file():
            return
        data = self.metrics_path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.metrics_path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
            _log.info(f"{self.metrics_path}: dropped a torn last line left by an interrupted run")

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    # --- the rules
    def check_kind(self) -> None:
        """A workdir is absent, empty (hidden files aside), or a folder an erase wrote (its
        config.json); anything else, such as an encoder or pipeline folder, is refused untouched."""
        path = self.path
        if not path.exists() or (path.is_dir() and self.saved_config() is not None):
            return
        if not path.is_dir():
            raise OutputError(f"--workdir={path} is a file, not a folder; choose a new or empty folder for the run")
        entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        if entries:
            raise OutputError(f"--workdir={path} exists and is not an erase workdir: it {_looks_like(path, entries)}; "
                              "choose a new or empty folder (an existing erase workdir resumes its run)")

    def check_same_config(self, resolved: dict) -> None:
        """Resuming needs the config the workdir's run started with (mesh and cadence aside)."""
        previous = self.saved_config()
        if previous is None:
            return
        with contextlib.suppress(KeyError, AttributeError, TypeError, ValueError):  # (then compared as it is)
            previous = json.loads(config_lib.from_resolved(previous).to_json())  # fields added since: defaults
        ignore = {"log_every", "checkpoint_every", "checkpoints_to_keep", "memory_budget_gib"}
        strip = lambda d: {**{k: v for k, v in d.items() if k != "mesh"},
                           "train": {k: v for k, v in d["train"].items() if k not in ignore}}
        if strip(previous) != strip(resolved):
            raise config_lib.ConfigError(
                f"workdir {self.path} holds a run with a different config; resume needs the same config "
                "(the mesh may differ; use a new --workdir to start another run)")

    def keep_saved_chunking(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """Resuming a concepts_per_chunk=-1 run: use the chunk size it chose (recorded in its
        config.json), not a new fit to this machine's memory, so the chunks stay the same."""
        saved = self.saved_config()
        if config.train.concepts_per_chunk != -1 or saved is None:
            return config
        chosen = saved.get("train", {}).get("concepts_per_chunk", 0)
        config = config.copy_and_resolve_references()
        config.train.concepts_per_chunk = chosen if chosen > 0 else -1
        return config


def read_metrics(metrics_path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line that is not JSON (torn by an interrupted run, or two
    rows run together by an older version) is skipped with a note."""
    rows = []
    for number, line in enumerate(Path(metrics_path).read_text().splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            _log.info(f"{metrics_path}:{number}: skipped a line that is not JSON (torn by an interrupted run)")
    return rows


def _looks_like(folder: Path, entries: list[str]) -> str:
    try:
        layout = describe_layout(folder)
    except WeightsError:
        listing = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        noun = "entry" if len(entries) == 1 else "entries"
        return f"holds {len(entries)} {noun} ({listing}) but no config.json written by erase"
    return {"pipeline": "looks like a diffusers pipeline folder (model_index.json)",
            "flax": f"looks like a Flax encoder checkpoint ({FLAX_PARAMS_NAME})",
            "transformers": "looks like a transformers model folder (its config.json describes a model, not an "
                            "erase run)"}[layout]


def _need_erase(workdir: Path, problem: str) -> RunError:
    return RunError(f"{workdir} is not a finished erase workdir: {problem}; run `hirm-jax erase` first")


# ----------------------------------------------------------------------------- a finished run, loaded

class ErasedRun(NamedTuple):
    """A finished erasure: the base encoder, the erased parameters and its record."""
    base: TextEncoder  # the base encoder (as loaded from the record's base, or handed over in memory)
    erased_params: Any  # base params with the trained leaves substituted
    record: RunRecord
    base_path: Optional[Path] = None  # where the base was read (None when the caller passed it)
    folder: Optional[Path] = None  # the workdir (or concept folder) the run is in

    @property
    def run(self) -> dict:
        """run.json as a dict (the 0.1 API)."""
        return self.record.to_json()


def erased_run(base: TextEncoder, trained: dict[str, np.ndarray], record: RunRecord,
               folder: Optional[Path] = None) -> ErasedRun:
    """An ErasedRun from leaves in memory (what the trainer hands to the report and export)."""
    flat = flatten(base.params)
    erased = unflatten({**flat, **{p: np.asarray(v, np.float32) for p, v in trained.items()}})
    return ErasedRun(base, erased, record, None, folder)


def load_run(workdir: str | os.PathLike, base: Optional[TextEncoder] = None) -> ErasedRun:
    """The base encoder, the erased parameters and run.json of a finished erase workdir.

    `base`: the already-loaded base encoder (saves re-reading it for each concept of a batch)."""
    wd = Workdir(workdir)
    _check_finished(wd)
    record = wd.read_run()
    trained = wd.read_trained(record.trainable_paths)
    base_path = None
    if base is None:
        base_path = _base_location(record.base, wd.run_path).path
        base = load_text_encoder(base_path, record.base.component)
    _check_same_architecture(record, base)
    flat = flatten(base.params)
    for path, value in trained.items():
        if path not in flat:
            raise RunError(f"{wd.trained_path} holds {path!r}, which is not a parameter of the base encoder")
        if tuple(value.shape) != tuple(flat[path].shape):
            raise RunError(f"{path} in {wd.trained_path} must have the base's shape {tuple(flat[path].shape)} "
                           f"but has {tuple(value.shape)}")
    check_base_unchanged(record.base, flat, wd.run_path, base_path)
    return erased_run(base, trained, record, wd.path)._replace(base_path=base_path)


def _check_finished(wd: Workdir) -> None:
    if not wd.path.is_dir():
        raise _need_erase(wd.path, "the folder does not exist")
    if wd.run_path.is_file():
        return
    if wd.index_path.is_file():
        folders = None
        with contextlib.suppress(ValueError, AttributeError, TypeError):  # (a corrupt index: the next rules)
            folders = sorted(json.loads(wd.index_path.read_text()).get("concepts", {}).values())
        if folders is not None:
            raise RunError(f"{wd.path} holds one erasure per concept (joint=False): export a concept's own "
                           f"folder, one of {[str(wd.path / f) for f in folders]}")
    if wd.checkpoints_dir.is_dir():
        raise RunError(f"{wd.path} holds an unfinished run (checkpoints but no {RUN_FILE}): rerun "
                       "`hirm-jax erase` with the same --config and --workdir to resume it")
    raise _need_erase(wd.path, f"{RUN_FILE} is missing")


def _check_same_architecture(record: RunRecord, base: TextEncoder) -> None:
    recorded = record.encoder_config or {}
    mismatched = {k: (recorded[k], getattr(base.config, k)) for k in architecture_of(base).config_fields
                  if k in recorded and recorded[k] != getattr(base.config, k)}
    if mismatched:
        raise RunError(f"the base {record.base.source!r} (component {record.base.component!r}) is not the encoder "
                       f"this run trained: (run.json, base) differ in {mismatched}")


def _base_location(base: BaseRecord, run_path: Path) -> hub.Source:
    """Where run.json's base is now. A hub source (it records a revision) resolves to that exact
    snapshot through the hub cache; a path must exist (relative to where erase ran)."""
    if base.revision:
        return hub.resolve(f"{base.source}@{base.revision}", component=base.component,
                           what=f"the base recorded in {run_path}")
    if not Path(base.source).exists():
        raise RunError(f"the base encoder {base.source!r} recorded in {run_path} does not exist here "
                       "(a relative path is relative to where `hirm-jax erase` ran)")
    return hub.Source(Path(base.source))


def check_base_unchanged(base: BaseRecord, flat_base: dict, run_path: Path, base_path: Optional[Path]) -> None:
    """The base read now must hold, in every trainable tensor, what erase trained from.

    base.trainable_sha256 = {flax path: `fileio.fingerprint` of the float32 base tensor} at
    erase time; any difference is a RunError naming the tensor and the base. A workdir without
    it (older hirm-jax) cannot be checked: one warning line on stderr."""
    recorded, source = base.trainable_sha256, repr(base.source)
    if base_path is not None and str(base_path) != base.source:
        source += f" (read from {base_path})"
    if recorded is None:
        _log.warning(f"{run_path} records no base fingerprints (base.trainable_sha256; an older erase): "
                     f"cannot check that the base {source} is unchanged since erase")
        return
    if not isinstance(recorded, dict):
        raise RunError(f"{run_path}: base.trainable_sha256 must map parameter paths to sha256 hex digests "
                       f"but is a {type(recorded).__name__}")
    for path, digest in sorted(recorded.items()):
        if path not in flat_base:
            raise RunError(f"{run_path} records a fingerprint of {path!r}, which is not a parameter of the "
                           f"base {source}")
        found = fingerprint(np.asarray(flat_base[path], np.float32))
        if found != digest:
            raise RunError(f"the base changed since erase: {path} of the base {source} has sha256 "
                           f"{found} but {run_path} records {digest}; export against the base erase trained "
                           "from, or erase again")
