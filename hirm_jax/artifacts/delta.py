"""Apply a HiRM delta to PyTorch weights: numpy + safetensors only, no JAX, no torch on disk.

A delta folder (written by `hirm_jax.artifacts.export.export_delta`) holds

    hirm_delta.safetensors   the changed tensors only, float32, canonical Hugging Face
                             orientation, keys prefixed by pipeline component:
                             text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight
                             (a T5 encoder, Flux text_encoder_2 / SD3 text_encoder_3, by its own
                             names: text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.weight)
    hirm_config.json         method, hyper-parameters, concepts, provenance, and for every
                             tensor the sha256 of the BASE tensor it replaces

A fingerprint is the sha256 of the tensor's float32 little-endian bytes. A base stored in
float16/bfloat16 matches when it equals the training base rounded to that precision, so a
delta made from SD 1.4's float32 encoder applies to its fp16 variant and to a pipeline
loaded with `torch_dtype=torch.float16`. Anything else raises `FingerprintError` naming the
tensor and both hashes, before anything is written or loaded. A pipeline already loaded in
torch is patched in memory by `hirm_jax.pipelines.patch.apply_delta_to_pipeline`.

    apply_delta("erased-delta/", "stable-diffusion-v1-4/", "sd14-erased/")   # patched copy
    python -m hirm_jax.artifacts.delta --delta erased-delta/ --base sd-v1-4/ --out sd14-erased/   # no JAX needed

On disk, only the changed bytes of the component's safetensors files are rewritten (dtype,
layout, header and every other tensor stay byte-identical); other files are hard-linked
when that leaves the base as it is (same owner, already the mode the umask gives outputs),
else copied. Folders that are symlinks (a component linked from elsewhere) are followed and
copied as real folders, so the output is complete on its own. Other weight formats of a
patched component (pytorch_model.bin, flax_model.msgpack, ...) are left out of the copy:
they would silently load the un-erased encoder.

Bad input is a `DeltaError` (or `InputMissingError`) naming the file: a missing --delta or
--base (`--base` may also be a hub id `org/name[@revision]`, see `hirm_jax.hub`), a
truncated or corrupt safetensors file (validated by the safetensors library before its
header is read), an output folder that equals, contains or lies inside the delta or the base
(`hirm_jax.fileio.atomic_dir`). Applying the same delta to the same base twice gives the
same bytes; hirm_applied.json records the base's provenance (`hub.Source.provenance`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

import numpy as np

from hirm_jax import hub
from hirm_jax.errors import HirmError, InputMissingError, report
from hirm_jax.encoder.hf_names import name_in_checkpoint
from hirm_jax.fileio import atomic_dir, fingerprint, sha256_file

DELTA_WEIGHTS = "hirm_delta.safetensors"
DELTA_CONFIG = "hirm_config.json"
APPLIED_RECORD = "hirm_applied.json"
DELTA_FORMAT = "hirm_delta"
DELTA_FORMAT_VERSION = 1
# Weight files of a patched component that would still hold the original encoder.
STALE_WEIGHT_SUFFIXES = (".bin", ".msgpack", ".h5", ".ckpt", ".pt", ".pth", ".onnx")


class DeltaError(HirmError, ValueError):
    """A delta or a base folder is not usable; the message says which file and why."""


class FingerprintError(DeltaError):
    """The base does not hold the tensors the delta was made for."""


# ---------------------------------------------------------------- fingerprints and dtypes

def _round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round-to-nearest-even as torch does."""
    bits = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype("<u2")


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << np.uint32(16)).view("<f4")


def round_to(x: np.ndarray, precision: str) -> np.ndarray:
    """x rounded to float16/bfloat16 storage and back to float32 (float32: unchanged)."""
    x = np.asarray(x, dtype=np.float32)
    if precision == "float16":
        return x.astype("<f2").astype("<f4")
    if precision == "bfloat16":
        return _bfloat16_to_float32(_round_to_bfloat16(x))
    if precision == "float32":
        return x
    raise DeltaError(f"precision must be float32, float16 or bfloat16 but is {precision!r}")


def base_fingerprints(x: np.ndarray) -> dict[str, str]:
    """The fingerprints a delta records for one base tensor: exact, and as fp16/bf16 storage."""
    return {"base_sha256": fingerprint(x),
            "base_sha256_as_float16": fingerprint(round_to(x, "float16")),
            "base_sha256_as_bfloat16": fingerprint(round_to(x, "bfloat16"))}


def check_fingerprint(name: str, where: str, found: np.ndarray, precision: str, entry: dict) -> Optional[str]:
    """None when `found` (decoded to float32) is the base the delta expects, else the error line."""
    digest = fingerprint(found)
    accepted = {entry["base_sha256"]}
    if precision in ("float16", "bfloat16"):
        accepted.add(entry[f"base_sha256_as_{precision}"])
    if digest in accepted:
        return None
    return (f"{name} in {where} has sha256 {digest} ({precision}) but the delta was made for "
            f"sha256 {entry['base_sha256']}")


# ---------------------------------------------------------------- raw safetensors access

def validate_safetensors(path: Path) -> None:
    """DeltaError naming `path` unless the safetensors library opens it: its header size,
    header JSON and tensor offsets must cover the file exactly (a truncated file, or a header
    claiming 2^62 bytes, is refused here instead of failing later as a reshape or
    MemoryError). bfloat16 tensors open fine: only the header is checked."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as e:  # SafetensorError, OSError: the library raises several types
        raise DeltaError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from e


_ST_DTYPES = {"F32": ("<f4", "float32"), "F16": ("<f2", "float16"), "BF16": ("<u2", "bfloat16"),
              "F64": ("<f8", "float64")}


@dataclasses.dataclass
class _SafetensorsFile:
    """The header of a safetensors file; tensors are read on demand (bf16 without torch)."""

    path: Path
    header: dict
    data_start: int

    @classmethod
    def open(cls, path: Path) -> "_SafetensorsFile":
        """Read the header of a file the safetensors library accepts (`validate_safetensors`);
        the header length is bounded by the file size, so nothing is read past the end."""
        validate_safetensors(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > size - 8:
                    raise ValueError(f"the header claims {length} bytes but the file has {size}")
                header = json.loads(f.read(length))
        except (OSError, struct.error, ValueError) as e:
            raise DeltaError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from e
        header.pop("__metadata__", None)
        return cls(path, header, 8 + length)

    def names(self) -> set[str]:
        return set(self.header)

    def precision(self, name: str) -> str:
        dtype = self.header[name]["dtype"]
        if dtype not in _ST_DTYPES:
            raise DeltaError(f"{name} in {self.path} is stored as {dtype}; a delta applies to "
                             f"floating-point tensors ({sorted(_ST_DTYPES)})")
        return _ST_DTYPES[dtype][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read_float32(self, name: str) -> np.ndarray:
        begin, end = self.header[name]["data_offsets"]
        numpy_dtype, precision = _ST_DTYPES[self.header[name]["dtype"]]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            raw = np.frombuffer(f.read(end - begin), dtype=numpy_dtype).reshape(self.shape(name))
        return _bfloat16_to_float32(raw) if precision == "bfloat16" else raw.astype(np.float32)

    def encode(self, name: str, value: np.ndarray) -> tuple[int, bytes]:
        """(absolute file offset, bytes) that store `value` in this tensor's slot and dtype."""
        numpy_dtype, precision = _ST_DTYPES[self.header[name]["dtype"]]
        value = np.asarray(value, dtype=np.float32)
        raw = _round_to_bfloat16(value) if precision == "bfloat16" else value.astype(numpy_dtype)
        begin, end = self.header[name]["data_offsets"]
        data = np.ascontiguousarray(raw).tobytes()
        assert len(data) == end - begin, (name, len(data), end - begin)
        return self.data_start + begin, data


# ---------------------------------------------------------------- the delta itself

@dataclasses.dataclass
class Delta:
    config: dict
    tensors: dict[str, np.ndarray]  # prefixed canonical key -> float32

    def components(self) -> dict[str, dict[str, np.ndarray]]:
        """{component: {canonical key without the component prefix: tensor}}."""
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for key, value in self.tensors.items():
            component, _, canonical = key.partition(".")
            grouped.setdefault(component, {})[canonical] = value
        return grouped

    def entry(self, component: str, canonical: str) -> dict:
        return self.config["tensors"][f"{component}.{canonical}"]


def load_delta(delta_dir: str | os.PathLike) -> Delta:
    """Read and validate a delta folder (file hash, format version, one fingerprint per tensor)."""
    from safetensors.numpy import load_file

    delta_dir = Path(delta_dir)
    if not delta_dir.exists():
        raise InputMissingError(f"delta folder {delta_dir} does not exist (make one with "
                                "`hirm-jax export --format=delta`)")
    config_path, weights_path = delta_dir / DELTA_CONFIG, delta_dir / DELTA_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise DeltaError(f"{delta_dir} is not a HiRM delta: {path.name} is missing "
                             "(make one with `hirm-jax export --format=delta`)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise DeltaError(f"{config_path} is not valid JSON: {e}") from e
    if config.get("format") != DELTA_FORMAT or config.get("format_version") != DELTA_FORMAT_VERSION:
        raise DeltaError(f"{config_path} must have format {DELTA_FORMAT!r} version {DELTA_FORMAT_VERSION} but has "
                         f"{config.get('format')!r} version {config.get('format_version')!r}")
    digest = sha256_file(weights_path)
    if digest != config.get("delta_file_sha256"):
        raise DeltaError(f"{weights_path} has sha256 {digest} but {DELTA_CONFIG} records "
                         f"{config.get('delta_file_sha256')}: the file was changed or truncated")
    validate_safetensors(weights_path)
    tensors = load_file(str(weights_path))
    if set(tensors) != set(config.get("tensors", {})):
        raise DeltaError(f"{weights_path} and {DELTA_CONFIG} list different tensors: "
                         f"{sorted(set(tensors) ^ set(config.get('tensors', {})))}")
    for key in tensors:
        if "." not in key:
            raise DeltaError(f"delta key {key!r} must be prefixed by a pipeline component (text_encoder.…)")
    return Delta(config, tensors)


def local_key(canonical: str, available: Iterable[str]) -> Optional[str]:
    """The name a checkpoint uses for a canonical `text_model.*` key (`encoder.hf_names`)."""
    return name_in_checkpoint(canonical, available if isinstance(available, (set, dict)) else set(available))


# ---------------------------------------------------------------- on-disk application

@dataclasses.dataclass
class _Patch:
    component: str
    file: Path  # base file (may be a shard)
    name: str  # the tensor name in that file
    canonical: str
    precision: str
    offset: int
    data: bytes
    matched: str  # "exact" or "as float16" / "as bfloat16"


def _checkpoints(folder: Path) -> list[dict[str, Path]]:
    """Each safetensors checkpoint of a model folder as {tensor name: file}.

    Only transformers' names count (model.safetensors, model-0000i-of-0000n.safetensors).
    A sharded checkpoint is read through its index; variants (model.fp16.safetensors) are
    separate checkpoints and each is patched.
    """
    checkpoints, indexed = [], set()
    for index in sorted(folder.glob("model*.safetensors.index*.json")):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise DeltaError(f"{index} is not a safetensors index (no weight_map): {e}") from e
        files = {name: folder / shard for name, shard in weight_map.items()}
        checkpoints.append(files)
        indexed.update(p.name for p in files.values())
    for path in sorted(folder.glob("model*.safetensors")):
        if path.name not in indexed:
            checkpoints.append({name: path for name in _SafetensorsFile.open(path).names()})
    if not checkpoints:
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise DeltaError(f"{folder} holds no safetensors weights (found {present}); "
                         "save the encoder with safe_serialization=True first")
    return checkpoints


def _plan_component(delta: Delta, component: str, folder: Path) -> list[_Patch]:
    patches, errors = [], []
    headers: dict[Path, _SafetensorsFile] = {}
    for files in _checkpoints(folder):
        for canonical, value in sorted(delta.components()[component].items()):
            name = local_key(canonical, files)
            if name is None:
                errors.append(f"{component}.{canonical}: {folder} has no tensor {canonical}"
                              + (f" (nor {canonical.removeprefix('text_model.')})" if canonical.startswith("text_model.") else ""))
                continue
            path = files[name]
            st = headers.setdefault(path, _SafetensorsFile.open(path))
            if name not in st.header:
                errors.append(f"{component}.{canonical}: index says {path.name} holds {name}, but it does not")
                continue
            if st.shape(name) != value.shape:
                errors.append(f"{component}.{canonical} in {path} must have shape {value.shape} but has {st.shape(name)}")
                continue
            precision = st.precision(name)
            entry = delta.entry(component, canonical)
            found = st.read_float32(name)
            error = check_fingerprint(f"{component}.{canonical}", str(path), found, precision, entry)
            if error:
                errors.append(error)
                continue
            offset, data = st.encode(name, value)
            matched = "exact" if fingerprint(found) == entry["base_sha256"] else f"as {precision}"
            patches.append(_Patch(component, path, name, canonical, precision, offset, data, matched))
    if errors:
        raise FingerprintError(
            f"the delta does not fit {folder} ({len(errors)} problem(s)); it was made for base "
            f"{delta.config.get('base', {}).get('source')!r}. Nothing was written.\n  " + "\n  ".join(errors))
    return patches


def _resolve_targets(delta: Delta, base: Path, component: Optional[str]) -> tuple[bool, dict[str, Path]]:
    """(is_pipeline, {component: folder}) for a pipeline folder or a single encoder folder."""
    grouped = delta.components()
    if component is not None and component not in grouped:
        raise DeltaError(f"component must be one of the delta's {sorted(grouped)} but is {component!r}")
    chosen = [component] if component else sorted(grouped)
    if (base / "model_index.json").is_file():
        folders = {c: base / c for c in chosen}
        for c, folder in folders.items():
            if not folder.is_dir():
                raise DeltaError(f"pipeline {base} has no {c}/ folder, which the delta patches")
        return True, folders
    if (base / "config.json").is_file():
        if len(chosen) != 1:
            raise DeltaError(f"{base} is a single text encoder but the delta patches {chosen}; "
                             "apply it to a pipeline folder, or choose one with component=")
        return False, {chosen[0]: base}
    raise DeltaError(f"base must be a diffusers pipeline folder (with model_index.json) or a "
                     f"transformers encoder folder (with config.json), but {base} is neither")


def resolve_base(base: str | os.PathLike | hub.Source, what: str = "--base") -> hub.Source:
    """The base as a `hub.Source`: a local folder (InputMissingError "... does not exist" when
    missing) or a whole hub snapshot `org/name[@revision]` (from the cache when offline)."""
    return base if isinstance(base, hub.Source) else hub.resolve(base, whole_pipeline=True, what=what)


def check_delta(delta_dir: str | os.PathLike, base: str | os.PathLike, component: Optional[str] = None) -> dict:
    """Verify every fingerprint against `base` (folder or hub id) without writing; returns what
    would be patched."""
    delta = load_delta(delta_dir)
    source = resolve_base(base)
    is_pipeline, folders = _resolve_targets(delta, source.path, component)
    patches = [p for c, folder in folders.items() for p in _plan_component(delta, c, folder)]
    return _summary(delta, source, is_pipeline, patches, excluded=[])


def _summary(delta: Delta, source: hub.Source, is_pipeline: bool, patches: list[_Patch],
             excluded: list[str]) -> dict:
    return {
        "delta": {k: delta.config.get(k) for k in ("method", "concepts", "anchors", "objective", "base",
                                                   "hirm_jax_version", "git_hash", "delta_file_sha256")},
        "base": source.provenance(),
        "base_kind": "diffusers_pipeline" if is_pipeline else "transformers_encoder",
        "patched": sorted(
            ({"tensor": f"{p.component}.{p.canonical}",
              "file": os.path.relpath(p.file, source.path), "name": p.name,
              "stored_as": p.precision, "fingerprint_match": p.matched} for p in patches),
            key=lambda d: (d["file"], d["tensor"])),
        "left_out": sorted(excluded),
    }


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src`'s real file (Hugging Face cache snapshots are symlinks into blobs/), or
    copy it where the file system will not link. A linked file IS the base's file: it keeps the
    base's mode (`fileio.atomic_dir` leaves files with other links alone), and a 3 GB UNet costs
    no disk."""
    real = os.path.realpath(src)
    try:
        os.link(real, dst)
    except OSError:
        shutil.copy2(real, dst)


def _walk(base: Path, rel: Path = Path("."), ancestors: tuple[str, ...] = ()) -> Iterator[tuple[Path, list[str]]]:
    """(folder relative to `base`, its file names) for `base` and every folder below it,
    following symlinked folders (a pipeline whose unet/ links elsewhere is copied whole).

    A broken symlink, or a folder linked to one of its own parents, is a DeltaError naming it."""
    folder = base / rel
    real = os.path.realpath(folder)
    if real in ancestors:
        raise DeltaError(f"{folder} is a symlink to its own parent folder {real}: the base cannot be copied")
    entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_symlink() and not os.path.exists(entry.path):
            raise DeltaError(f"{entry.path} in the base is a broken symlink (to {os.readlink(entry.path)}); "
                             "the base is incomplete")
    yield rel, [entry.name for entry in entries if not entry.is_dir()]
    for entry in entries:
        if entry.is_dir():  # follows symlinks
            yield from _walk(base, rel / entry.name, ancestors + (real,))


def apply_delta(delta_dir: str | os.PathLike, base: str | os.PathLike, out_dir: str | os.PathLike,
                component: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write a copy of `base` (diffusers pipeline or transformers encoder folder, or a hub id
    `org/name[@revision]`) with the delta applied.

    Every fingerprint is checked before anything is written; the output is renamed into
    place only when complete, and may not equal, contain or lie inside the delta or the base.
    Returns `out_dir`, which also holds `hirm_applied.json`.
    """
    delta = load_delta(delta_dir)
    source = resolve_base(base)
    return write_patched_copy(delta, source, out_dir, component, overwrite,
                              inputs={"--delta": delta_dir, "--base": source.path})


def write_patched_copy(delta: Delta, source: hub.Source, out_dir: str | os.PathLike, component: Optional[str],
                       overwrite: bool, inputs: Mapping[str, Optional[str | os.PathLike]]) -> Path:
    """The body of `apply_delta`; `inputs` ({flag: path}) are the folders the output may not
    equal, contain or lie inside (the base among them)."""
    base, out_dir = source.path, Path(out_dir)
    is_pipeline, folders = _resolve_targets(delta, base, component)
    patches = [p for c, folder in folders.items() for p in _plan_component(delta, c, folder)]
    by_file: dict[Path, list[_Patch]] = {}
    for p in patches:
        by_file.setdefault(p.file, []).append(p)
    patched_dirs = {folder.resolve() for folder in folders.values()}
    excluded, previous = [], None
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        for rel_root, files in _walk(base):
            root = base / rel_root
            (tmp / rel_root).mkdir(parents=True, exist_ok=True)
            for name in files:
                src, dst = root / name, tmp / rel_root / name
                if src in by_file:
                    shutil.copyfile(os.path.realpath(src), dst)
                    with open(dst, "r+b") as f:
                        for p in by_file[src]:
                            f.seek(p.offset)
                            f.write(p.data)
                elif root.resolve() in patched_dirs and name.endswith(STALE_WEIGHT_SUFFIXES):
                    excluded.append(str(rel_root / name))
                elif rel_root == Path(".") and name == APPLIED_RECORD:
                    previous = _read_previous_record(src)
                else:
                    _link_or_copy(src, dst)
        record = _summary(delta, source, is_pipeline, patches, excluded)
        if previous is not None:
            record["previous"] = previous
        (tmp / APPLIED_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out_dir


def _read_previous_record(path: Path) -> dict:
    """The hirm_applied.json of a base that is itself a patched copy (kept as "previous")."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DeltaError(f"{path} is not valid JSON: {e}") from e


if __name__ == "__main__":  # usable without installing hirm_jax's JAX side
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Apply a HiRM delta to a diffusers pipeline or transformers encoder folder.")
    parser.add_argument("--delta", required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--component", default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    try:
        print(apply_delta(args.delta, args.base, args.out, component=args.component, overwrite=args.overwrite))
    except Exception as e:  # noqa: BLE001  (user errors get one line; bugs keep their traceback)
        sys.exit(report(e))
