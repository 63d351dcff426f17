"""Export an erase workdir: a full encoder folder, a patched pipeline copy, or a small delta.

    run = load_run("workdirs/vangogh")              # Run(base, erased_params, run, base_path)
    export_full("workdirs/vangogh", "out/text_encoder")             # transformers folder
    export_delta("workdirs/vangogh", "out/vangogh-delta")           # hirm_delta.safetensors + hirm_config.json
    export_pipeline("workdirs/vangogh", "sd-v1-4/", "out/sd14-no-vangogh")

Applying a delta (numpy + safetensors; no JAX needed) lives in `hirm_jax.delta` and is
re-exported here: `apply_delta(delta_dir, base, out_dir)`, `apply_delta_to_pipeline(pipe,
delta_dir)`, `check_delta(delta_dir, base)`.

The delta holds only the tensors training changed, float32, in canonical Hugging Face
orientation, keyed `<component>.text_model.encoder.layers.0.self_attn.q_proj.weight` (T5:
`<component>.encoder.block.0.layer.1.DenseReluDense.wo.weight`, from the encoder's own mapping
table, `hirm_jax.architectures`);
`hirm_config.json` records the method, objective, hyper-parameters, concepts, provenance and
each replaced BASE tensor's sha256 (see `hirm_jax.delta` for the fingerprint rule).

Rules every export follows:
- the base is the one run.json records: a hub id with its revision resolves to that snapshot
  (`hirm_jax.hub`), a path must exist; when run.json holds `base.trainable_sha256` (erase
  records the fingerprint of every trainable base tensor), a base that changed since erase
  is refused (RunError naming the tensor); older workdirs get one warning line on stderr;
- the output may not equal, contain or lie inside the workdir, the base recorded in
  run.json, or (--format=pipeline) the pipeline; it is written atomically and follows the
  umask (`hirm_jax.fileio.atomic_dir`);
- the same workdir gives the same bytes: safetensors through `fileio.save_safetensors`
  (sorted header), JSON with sorted keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np
from safetensors.numpy import load_file

import hirm_jax
from hirm_jax import hub, provenance
from hirm_jax.delta import (APPLIED_RECORD, DELTA_CONFIG, DELTA_FORMAT, DELTA_FORMAT_VERSION, DELTA_WEIGHTS,
                            DeltaError, FingerprintError, apply_delta, apply_delta_to_pipeline,
                            base_fingerprints, check_delta, fingerprint, load_delta, resolve_base,
                            write_patched_copy)
from hirm_jax.errors import HirmError
from hirm_jax.fileio import atomic_dir, check_output_location, save_safetensors, sha256_file
from hirm_jax.layouts import load_text_encoder, save_text_encoder
from hirm_jax.masking import flatten, unflatten
from hirm_jax.model import TextEncoder
from hirm_jax.architectures import architecture_of

RUN_FILE = "run.json"
TRAINED_FILE = "erased_trainable.safetensors"
BASE_INPUT = "run.json's base"  # how an output-vs-input refusal names the recorded base

__all__ = ["Run", "RunError", "load_run", "changed_tensors", "export_full", "export_delta", "export_pipeline",
           "apply_delta", "apply_delta_to_pipeline", "check_delta", "load_delta", "DeltaError", "FingerprintError",
           "APPLIED_RECORD"]


class RunError(HirmError, ValueError):
    """A workdir is missing, unfinished or corrupt."""


class Run(NamedTuple):
    base: TextEncoder  # the base encoder as loaded from run.json's base
    erased_params: Any  # base params with the trained leaves substituted
    run: dict  # run.json
    base_path: Optional[Path] = None  # where the base was read (None when the caller passed it)


def _need_erase(workdir: Path, problem: str) -> RunError:
    return RunError(f"{workdir} is not a finished erase workdir: {problem}; run `hirm-jax erase` first")


def load_run(workdir: str | os.PathLike, base: Optional[TextEncoder] = None) -> Run:
    """The base encoder, the erased parameters and run.json of a finished erase workdir.

    `base`: the already-loaded base encoder (saves re-reading it for each concept of a batch)."""
    workdir = Path(workdir)
    run_path, trained_path = workdir / RUN_FILE, workdir / TRAINED_FILE
    if not workdir.is_dir():
        raise _need_erase(workdir, "the folder does not exist")
    if not run_path.is_file():
        if (workdir / "index.json").is_file():
            folders = sorted(json.loads((workdir / "index.json").read_text()).get("concepts", {}).values())
            raise RunError(f"{workdir} holds one erasure per concept (joint=False): export a concept's own "
                           f"folder, one of {[str(workdir / f) for f in folders]}")
        if (workdir / "checkpoints").is_dir():
            raise RunError(f"{workdir} holds an unfinished run (checkpoints but no {RUN_FILE}): rerun "
                           "`hirm-jax erase` with the same --config and --workdir to resume it")
        raise _need_erase(workdir, f"{RUN_FILE} is missing")
    try:
        run = json.loads(run_path.read_text())
        source, component = run["base"]["source"], run["base"].get("component")
        trainable_paths = run["trainable_paths"]
    except (ValueError, KeyError, TypeError) as e:
        raise _need_erase(workdir, f"{RUN_FILE} is corrupt or incomplete ({type(e).__name__}: {e})") from e
    if not trained_path.is_file():
        raise _need_erase(workdir, f"{TRAINED_FILE} is missing")
    try:
        trained = load_file(str(trained_path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise _need_erase(workdir, f"{TRAINED_FILE} is unreadable ({e})") from e
    if sorted(trained) != sorted(trainable_paths):
        raise _need_erase(workdir, f"{TRAINED_FILE} holds {sorted(trained)} but {RUN_FILE} lists trainable_paths "
                                   f"{sorted(trainable_paths)}")

    base_path = None
    if base is None:
        base_path = _base_location(run["base"], run_path).path
        base = load_text_encoder(base_path, component)
    recorded = run.get("encoder_config") or {}
    mismatched = {k: (recorded[k], getattr(base.config, k)) for k in architecture_of(base).config_fields
                  if k in recorded and recorded[k] != getattr(base.config, k)}
    if mismatched:
        raise RunError(f"the base {source!r} (component {component!r}) is not the encoder this run trained: "
                       f"(run.json, base) differ in {mismatched}")
    flat = flatten(base.params)
    for path, value in trained.items():
        if path not in flat:
            raise RunError(f"{trained_path} holds {path!r}, which is not a parameter of the base encoder")
        if tuple(value.shape) != tuple(flat[path].shape):
            raise RunError(f"{path} in {trained_path} must have the base's shape {tuple(flat[path].shape)} "
                           f"but has {tuple(value.shape)}")
    _check_base_unchanged(run["base"], flat, run_path, base_path)
    erased = unflatten({**flat, **{p: np.asarray(v, np.float32) for p, v in trained.items()}})
    return Run(base, erased, run, base_path)


def _base_location(base: dict, run_path: Path) -> hub.Source:
    """Where run.json's base is now. A hub source (it records a revision) resolves to that exact
    snapshot through the hub cache; a path must exist (relative to where erase ran)."""
    source, component = base["source"], base.get("component")
    if base.get("revision"):
        return hub.resolve(f"{source}@{base['revision']}", component=component,
                           what=f"the base recorded in {run_path}")
    if not Path(source).exists():
        raise RunError(f"the base encoder {source!r} recorded in {run_path} does not exist here "
                       "(a relative path is relative to where `hirm-jax erase` ran)")
    return hub.Source(Path(source))


def _check_base_unchanged(base: dict, flat_base: dict, run_path: Path, base_path: Optional[Path]) -> None:
    """The base read now must hold, in every trainable tensor, what erase trained from.

    run.json's base.trainable_sha256 = {flax path: `delta.fingerprint` of the float32 base
    tensor} at erase time; any difference is a RunError naming the tensor and the base. A
    workdir without it (older hirm-jax) cannot be checked: one warning line on stderr."""
    recorded, source = base.get("trainable_sha256"), repr(base.get("source"))
    if base_path is not None and str(base_path) != base.get("source"):
        source += f" (read from {base_path})"
    if recorded is None:
        print(f"warning: {run_path} records no base fingerprints (base.trainable_sha256; an older erase): "
              f"cannot check that the base {source} is unchanged since erase", file=sys.stderr)
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


def _inputs(workdir: str | os.PathLike, loaded: Run, **more: Optional[str | os.PathLike]) -> dict:
    """The folders an export's output may not equal, contain or lie inside."""
    return {"--workdir": workdir, BASE_INPUT: loaded.base_path, **more}


def changed_tensors(loaded: Run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{canonical HF key: (base, erased)} (float32, HF orientation) for trained tensors that changed.

    The keys come from the base encoder's own mapping table (CLIP: `hirm_jax.weights`, T5:
    `hirm_jax.t5_weights`, e.g. encoder.block.0.layer.1.DenseReluDense.wo.weight)."""
    flat_base, flat_erased = flatten(loaded.base.params), flatten(loaded.erased_params)
    trained = set(loaded.run["trainable_paths"])
    changed = {}
    for hf_key, path, transform in architecture_of(loaded.base).expand_table(loaded.base.config):
        joined = "/".join(path)
        if joined not in trained:
            continue
        before = transform.to_hf(np.asarray(flat_base[joined], np.float32))
        after = transform.to_hf(np.asarray(flat_erased[joined], np.float32))
        if not np.array_equal(before, after):
            changed[hf_key] = (before, after)
    return changed


def export_full(workdir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """A transformers folder (config.json + model.safetensors, float32) of the erased encoder."""
    check_output_location(out_dir, {"--workdir": workdir})  # before the (slow) load
    loaded = load_run(workdir)
    return save_text_encoder(loaded.base, out_dir, params=loaded.erased_params, overwrite=overwrite,
                             inputs=_inputs(workdir, loaded))


def _delta_config(loaded: Run, tensors: dict[str, dict]) -> dict:
    run = loaded.run
    return {
        "format": DELTA_FORMAT,
        "format_version": DELTA_FORMAT_VERSION,
        "method": run.get("method", "hirm"),
        "objective": run.get("objective"),
        "preservation": run.get("preservation"),
        "train": run.get("train"),
        "concepts": run.get("concepts"),
        "anchors": run.get("anchors"),
        "concept_type": run.get("concept_type"),
        "seed": run.get("seed"),
        "steps": run.get("steps"),
        "final_loss": run.get("final_loss"),
        "base": run["base"],
        "component_name": run.get("component_name", "text_encoder"),
        "encoder_config": dataclasses.asdict(loaded.base.config),
        "trained_with": {"hirm_jax_version": run.get("hirm_jax_version"), "git_hash": run.get("git_hash")},
        "hirm_jax_version": hirm_jax.__version__,
        "git_hash": provenance.git_hash(),
        "dtype": "float32",
        "fingerprint_rule": "sha256 of the tensor's float32 little-endian bytes, Hugging Face orientation; "
                            "a float16/bfloat16-stored base matches via base_sha256_as_float16/bfloat16",
        "tensors": tensors,
    }


def _write_delta(loaded: Run, out_dir: Path, overwrite: bool,
                 inputs: Optional[Mapping[str, Optional[str | os.PathLike]]] = None) -> Path:
    component = loaded.run.get("component_name") or "text_encoder"
    changed = changed_tensors(loaded)
    if not changed:
        raise RunError(f"the erased encoder equals its base in every trained tensor "
                       f"({len(loaded.run['trainable_paths'])} checked): there is no delta to export")
    weights = {f"{component}.{key}": after for key, (_, after) in changed.items()}
    entries = {f"{component}.{key}": {"shape": list(before.shape), **base_fingerprints(before),
                                      "delta_sha256": fingerprint(after)}
               for key, (before, after) in changed.items()}
    config = _delta_config(loaded, entries)
    metadata = {"format": "pt", "hirm_format": DELTA_FORMAT, "hirm_format_version": str(DELTA_FORMAT_VERSION),
                "method": str(config["method"]), "concepts": json.dumps(config["concepts"]),
                "component_name": component, "base_source": str(loaded.run["base"]["source"]),
                "hirm_jax_version": hirm_jax.__version__}
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        save_safetensors(weights, tmp / DELTA_WEIGHTS, metadata=metadata)
        config["delta_file_sha256"] = sha256_file(tmp / DELTA_WEIGHTS)
        (tmp / DELTA_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def export_delta(workdir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """hirm_delta.safetensors (changed tensors only) + hirm_config.json (see module docstring)."""
    check_output_location(out_dir, {"--workdir": workdir})  # before the (slow) load
    loaded = load_run(workdir)
    return _write_delta(loaded, Path(out_dir), overwrite, inputs=_inputs(workdir, loaded))


def export_batch_deltas(workdir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """One delta per concept of a joint=False workdir, in out_dir/<concept folder>/, plus
    out_dir/index.json (concept -> delta folder). The base is loaded once."""
    workdir, out_dir = Path(workdir), Path(out_dir)
    index_path = workdir / "index.json"
    if not index_path.is_file():
        raise _need_erase(workdir, "index.json is missing (not a joint=False run)")
    check_output_location(out_dir, {"--workdir": workdir})  # before the (slow) load
    try:
        concepts = json.loads(index_path.read_text())["concepts"]
        folders = list(concepts.values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _need_erase(workdir, f"index.json is corrupt ({type(e).__name__}: {e})") from e
    if not folders:
        raise _need_erase(workdir, "index.json lists no concepts")
    first = load_run(workdir / folders[0])
    with atomic_dir(out_dir, overwrite=overwrite, inputs=_inputs(workdir, first)) as tmp:
        for i, folder in enumerate(folders):
            loaded = first if i == 0 else load_run(workdir / folder, first.base)
            _write_delta(loaded, tmp / Path(folder).name, overwrite=False)
        (tmp / "index.json").write_text(json.dumps(
            {"concepts": {name: Path(folder).name for name, folder in concepts.items()}}, indent=2, sort_keys=True) + "\n")
    return out_dir


def export_pipeline(workdir: str | os.PathLike, pipeline_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    component: Optional[str] = None, overwrite: bool = False) -> Path:
    """A copy of a diffusers pipeline folder with the erased encoder in run.json's component slot.

    The component keeps its own config.json, key names and storage dtype; only the changed
    tensors' bytes are rewritten, after checking that the pipeline holds the base this run
    trained (else FingerprintError). Other files are hard-linked, or copied (`hirm_jax.delta`).
    `pipeline_dir` may be a hub id (`org/name[@revision]`).
    """
    check_output_location(out_dir, {"--workdir": workdir})  # before the (slow) load
    source = resolve_base(pipeline_dir, what="--pipeline")
    if not (source.path / "model_index.json").is_file():
        raise DeltaError(f"--pipeline must be a diffusers pipeline folder (with model_index.json) "
                         f"but {pipeline_dir} is not")
    check_output_location(out_dir, {"--pipeline": source.path})
    loaded = load_run(workdir)
    if component is not None:
        loaded = loaded._replace(run={**loaded.run, "component_name": component})
    with tempfile.TemporaryDirectory(prefix="hirm-delta-") as tmp:
        delta = load_delta(_write_delta(loaded, Path(tmp) / "delta", overwrite=False))
        return write_patched_copy(delta, source, out_dir, component=None, overwrite=overwrite,
                                  inputs=_inputs(workdir, loaded, **{"--pipeline": source.path}))
