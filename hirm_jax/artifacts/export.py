"""Export an erase workdir: a full encoder folder, a patched pipeline copy, or a small delta.

    export_full("workdirs/vangogh", "out/text_encoder")             # transformers folder
    export_full(result.erased_run(), "out/text_encoder")            # a run in memory (erase.loop.TrainResult)
    export_delta("workdirs/vangogh", "out/vangogh-delta")           # hirm_delta.safetensors + hirm_config.json
    export_pipeline("workdirs/vangogh", "sd-v1-4/", "out/sd14-no-vangogh")

Reading a workdir is `hirm_jax.erase.workdir.load_run` (re-exported here). Applying a delta (numpy + safetensors; no JAX needed) lives in `hirm_jax.artifacts.delta` and is
re-exported here: `apply_delta(delta_dir, base, out_dir)`, `check_delta(delta_dir, base)`; a
torch pipeline in memory takes it with `hirm_jax.pipelines.patch.apply_delta_to_pipeline`.

The delta holds only the tensors training changed, float32, in canonical Hugging Face
orientation, keyed `<component>.text_model.encoder.layers.0.self_attn.q_proj.weight` (T5:
`<component>.encoder.block.0.layer.1.DenseReluDense.wo.weight`, from the encoder's own mapping
table, `hirm_jax.encoder.architectures`);
`hirm_config.json` records the method, objective, hyper-parameters, concepts, provenance and
each replaced BASE tensor's sha256 (see `hirm_jax.artifacts.delta` for the fingerprint rule).

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
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

import hirm_jax
from hirm_jax import provenance
from hirm_jax.artifacts.delta import (APPLIED_RECORD, DELTA_CONFIG, DELTA_FORMAT, DELTA_FORMAT_VERSION,  # noqa: F401
                                      DELTA_WEIGHTS, DeltaError, FingerprintError, apply_delta,
                                      base_fingerprints, check_delta, load_delta, resolve_base,
                                      write_patched_copy)
from hirm_jax.encoder.architectures import architecture_of
from hirm_jax.encoder.layouts import save_text_encoder
from hirm_jax.erase.masking import flatten
from hirm_jax.erase.workdir import ErasedRun, RunError, Workdir, load_run  # noqa: F401  (RunError: re-exported)
from hirm_jax.fileio import atomic_dir, check_output_location, fingerprint, save_safetensors, sha256_file

BASE_INPUT = "run.json's base"  # how an output-vs-input refusal names the recorded base

__all__ = ["ErasedRun", "Run", "RunError", "load_run", "changed_tensors", "export_full", "export_delta",
           "export_batch_deltas", "export_pipeline", "apply_delta", "check_delta",
           "load_delta", "DeltaError", "FingerprintError", "APPLIED_RECORD"]

Run = ErasedRun  # the 0.1 name

# A workdir, or finished runs in memory (`TrainResult.erased_run()`, `ComponentsResult.erased_runs()`).
Source = Union[str, os.PathLike, ErasedRun, Sequence[ErasedRun]]


def _runs(source: Source) -> list[ErasedRun]:
    """The erased encoders of a source: one, or one per component of a several-encoder erase."""
    if isinstance(source, ErasedRun):
        return [source]
    if isinstance(source, (list, tuple)):
        return list(source)
    components = Workdir(source).component_workdirs()
    return [load_run(wd.path) for wd in components.values()] if components else [load_run(source)]


def _workdir_of(source: Source) -> Optional[str | os.PathLike]:
    if isinstance(source, ErasedRun):
        return source.folder
    if isinstance(source, (list, tuple)):
        return Path(source[0].folder).parent.parent if source and source[0].folder else None
    return source


def _inputs(workdir: Optional[str | os.PathLike], runs: Sequence[ErasedRun], **more: Optional[str | os.PathLike]) -> dict:
    """The folders an export's output may not equal, contain or lie inside."""
    bases = {f"{BASE_INPUT} ({r.record.component_name})": r.base_path for r in runs[1:]}
    return {"--workdir": workdir, BASE_INPUT: runs[0].base_path, **bases, **more}


def changed_tensors(loaded: ErasedRun) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{canonical HF key: (base, erased)} (float32, HF orientation) for trained tensors that changed.

    The keys come from the base encoder's own mapping table (CLIP: `hirm_jax.encoder.clip_weights`, T5:
    `hirm_jax.encoder.t5_weights`, e.g. encoder.block.0.layer.1.DenseReluDense.wo.weight)."""
    flat_base, flat_erased = flatten(loaded.base.params), flatten(loaded.erased_params)
    trained = set(loaded.record.trainable_paths)
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


def export_full(workdir: Source, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """A transformers folder (config.json + model.safetensors, float32) of the erased encoder;
    for a several-encoder erase, one such folder per component (out_dir/<component>/)."""
    check_output_location(out_dir, {"--workdir": _workdir_of(workdir)})  # before the (slow) load
    runs = _runs(workdir)
    if len(runs) == 1:
        return save_text_encoder(runs[0].base, out_dir, params=runs[0].erased_params, overwrite=overwrite,
                                 inputs=_inputs(_workdir_of(workdir), runs))
    with atomic_dir(out_dir, overwrite=overwrite, inputs=_inputs(_workdir_of(workdir), runs)) as tmp:
        for run in runs:
            save_text_encoder(run.base, tmp / run.record.component_name, params=run.erased_params)
    return Path(out_dir)


def _delta_config(loaded: ErasedRun, tensors: dict[str, dict]) -> dict:
    record = loaded.record
    return {
        "format": DELTA_FORMAT,
        "format_version": DELTA_FORMAT_VERSION,
        **{field: getattr(record, field) for field in ("method", "objective", "preservation", "train", "concepts",
                                                        "anchors", "concept_type", "seed", "steps", "final_loss",
                                                        "component_name")},
        "base": record.base.to_json(),
        "encoder_config": dataclasses.asdict(loaded.base.config),
        "trained_with": {"hirm_jax_version": record.hirm_jax_version, "git_hash": record.git_hash},
        "hirm_jax_version": hirm_jax.__version__,
        "git_hash": provenance.git_hash(),
        "dtype": "float32",
        "fingerprint_rule": "sha256 of the tensor's float32 little-endian bytes, Hugging Face orientation; "
                            "a float16/bfloat16-stored base matches via base_sha256_as_float16/bfloat16",
        "tensors": tensors,
    }


def _component_delta(loaded: ErasedRun) -> tuple[dict, dict]:
    """(weights, fingerprint entries) of one erased encoder, keyed `<component>.<HF key>`."""
    component = loaded.record.component_name or "text_encoder"
    changed = changed_tensors(loaded)
    if not changed:
        raise RunError(f"the erased encoder {component} equals its base in every trained tensor "
                       f"({len(loaded.record.trainable_paths)} checked): there is no delta to export")
    weights = {f"{component}.{key}": after for key, (_, after) in changed.items()}
    entries = {f"{component}.{key}": {"shape": list(before.shape), **base_fingerprints(before),
                                      "delta_sha256": fingerprint(after)}
               for key, (before, after) in changed.items()}
    return weights, entries


def _write_delta(runs: Sequence[ErasedRun], out_dir: Path, overwrite: bool,
                 inputs: Optional[Mapping[str, Optional[str | os.PathLike]]] = None) -> Path:
    """One delta for one erased encoder, or keyed by component for several (Flux: CLIP-L and T5):
    the top level describes the first component, `components` each of them."""
    weights, entries = {}, {}
    for run in runs:
        w, e = _component_delta(run)
        weights.update(w)
        entries.update(e)
    config = _delta_config(runs[0], entries)
    if len(runs) > 1:
        config["components"] = {r.record.component_name: {k: v for k, v in _delta_config(r, {}).items()
                                                          if k not in ("format", "format_version", "tensors")}
                                for r in runs}
    names = ",".join(r.record.component_name for r in runs)
    metadata = {"format": "pt", "hirm_format": DELTA_FORMAT, "hirm_format_version": str(DELTA_FORMAT_VERSION),
                "method": str(config["method"]), "concepts": json.dumps(config["concepts"]),
                "component_name": names, "base_source": str(runs[0].record.base.source),
                "hirm_jax_version": hirm_jax.__version__}
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        save_safetensors(weights, tmp / DELTA_WEIGHTS, metadata=metadata)
        config["delta_file_sha256"] = sha256_file(tmp / DELTA_WEIGHTS)
        (tmp / DELTA_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def export_delta(workdir: Source, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """hirm_delta.safetensors (changed tensors only) + hirm_config.json (see module docstring)."""
    check_output_location(out_dir, {"--workdir": _workdir_of(workdir)})  # before the (slow) load
    runs = _runs(workdir)
    return _write_delta(runs, Path(out_dir), overwrite, inputs=_inputs(_workdir_of(workdir), runs))


def export_batch_deltas(workdir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """One delta per concept of a joint=False workdir, in out_dir/<concept folder>/, plus
    out_dir/index.json (concept -> delta folder). The base is loaded once."""
    workdir, out_dir = Path(workdir), Path(out_dir)
    concepts = Workdir(workdir).read_index().concepts
    check_output_location(out_dir, {"--workdir": workdir})  # before the (slow) load
    folders = list(concepts.values())
    first = load_run(workdir / folders[0])
    with atomic_dir(out_dir, overwrite=overwrite, inputs=_inputs(workdir, [first])) as tmp:
        for i, folder in enumerate(folders):
            loaded = first if i == 0 else load_run(workdir / folder, first.base)
            _write_delta([loaded], tmp / Path(folder).name, overwrite=False)
        (tmp / "index.json").write_text(json.dumps(
            {"concepts": {name: Path(folder).name for name, folder in concepts.items()}}, indent=2, sort_keys=True) + "\n")
    return out_dir


def export_pipeline(workdir: Source, pipeline_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    component: Optional[str] = None, overwrite: bool = False) -> Path:
    """A copy of a diffusers pipeline folder with the erased encoder in run.json's component slot.

    The component keeps its own config.json, key names and storage dtype; only the changed
    tensors' bytes are rewritten, after checking that the pipeline holds the base this run
    trained (else FingerprintError). Other files are hard-linked, or copied (`hirm_jax.artifacts.delta`).
    `pipeline_dir` may be a hub id (`org/name[@revision]`).
    """
    check_output_location(out_dir, {"--workdir": _workdir_of(workdir)})  # before the (slow) load
    source = resolve_base(pipeline_dir, what="--pipeline")
    if not (source.path / "model_index.json").is_file():
        raise DeltaError(f"--pipeline must be a diffusers pipeline folder (with model_index.json) "
                         f"but {pipeline_dir} is not")
    check_output_location(out_dir, {"--pipeline": source.path})
    runs = _runs(workdir)
    if component is not None:
        if len(runs) > 1:
            raise RunError(f"--component={component} chooses the slot of one erased encoder, but {workdir} erased "
                           f"{[r.record.component_name for r in runs]}; leave --component out")
        runs = [runs[0]._replace(record=dataclasses.replace(runs[0].record, component_name=component))]
    with tempfile.TemporaryDirectory(prefix="hirm-delta-") as tmp:
        delta = load_delta(_write_delta(runs, Path(tmp) / "delta", overwrite=False))
        return write_patched_copy(delta, source, out_dir, component=None, overwrite=overwrite,
                                  inputs=_inputs(_workdir_of(workdir), runs, **{"--pipeline": source.path}))
