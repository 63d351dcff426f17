"""Outputs that lose nothing: atomic files and folders, the output-vs-input rule, workdir locks.

Rules every command that writes follows (README, "Outputs"):
- an output is built in a hidden sibling and renamed into place, so a crash never leaves a
  half-written artifact; with overwrite, the old folder is back in place on any failure;
- an output folder may not equal, contain or lie inside any of the command's inputs
  (`check_output_location`, symlinks and `..` resolved first);
- outputs follow the umask (folders 0755, files 0644 under umask 022), as `save_pretrained`;
- hidden temporary siblings left by a killed process are removed by the next run that writes
  the same output, which says so on stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional

from hirm_jax import log
from hirm_jax.errors import (HirmError, InputMissingError, LockedError, OutputError, describe_write_failure,
                             exit_code_for)

_log = log.get(__name__)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(root: Path) -> None:
    """Give a temporary folder (mkdtemp: 0700) or file (mkstemp: 0600) and everything in it
    the modes an ordinary write would have had. A file with other hard links (an untouched
    file `apply` linked from the base) is shared with its input and keeps its mode."""
    mask = _umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    if root.is_file():
        root.chmod(file_mode)
        return
    root.chmod(dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = Path(folder, name)
            if not path.is_symlink():
                path.chmod(dir_mode)
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink() and path.stat().st_nlink == 1:
                path.chmod(file_mode | (path.stat().st_mode & 0o111 & ~mask))


def resolved(path: str | os.PathLike) -> Path:
    """The absolute path with symlinks and `..` resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(os.fspath(path)))


Inputs = "Mapping[str, Optional[str | os.PathLike]] | Iterable[tuple[str, Optional[str | os.PathLike]]]"


def _pairs(inputs) -> list[tuple[str, Optional[str | os.PathLike]]]:
    """(flag, path) pairs from {flag: path} or from pairs (where a flag such as --delta may repeat)."""
    return list(inputs.items()) if isinstance(inputs, Mapping) else list(inputs)


def require_inputs(inputs: Inputs) -> None:
    """Every named input path exists; else InputMissingError "FLAG PATH does not exist"."""
    for flag, path in _pairs(inputs):
        if path is not None and path != "" and not os.path.exists(path):
            raise InputMissingError(f"{flag} {os.fspath(path)} does not exist")


def check_output_location(out: str | os.PathLike, inputs: Inputs, out_flag: str = "--out") -> None:
    """Refuse an output folder that equals, contains or lies inside one of the inputs.

    inputs: {flag: path} or (flag, path) pairs; None values are skipped. Overwriting such an
    output would delete the input (or the input would be read while it is replaced)."""
    target = resolved(out)
    for flag, path in _pairs(inputs):
        if path is None or path == "":
            continue
        source = resolved(path)
        if target == source:
            relation = "is"
        elif source.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(source):
            relation = "lies inside"
        else:
            continue
        raise OutputError(f"{out_flag}={os.fspath(out)} {relation} the input {flag}={os.fspath(path)} "
                          f"(resolved: {target} vs {source}); an output may not equal, contain or lie inside "
                          "an input: choose another output folder")


_TMP_PATTERN = r"\.{name}\.(tmp|old)-(\d+)-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove hidden siblings of `out` left by dead processes; put back an old folder that a
    killed overwrite had moved aside (its replacement had not landed)."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(_TMP_PATTERN.format(name=re.escape(out.name)))
    for sibling in sorted(out.parent.iterdir()):
        match = pattern.match(sibling.name)
        if not match or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out.exists() and not out.is_symlink():
            os.replace(sibling, out)
            _log.info(f"restored {out} from {sibling.name}, moved aside by process {match.group(2)} that died "
                  "before its replacement landed")
            continue
        shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)
        _log.info(f"removed {sibling}, a partial output left by process {match.group(2)} that died")


def _normalised(path: str | os.PathLike) -> Path:
    """`path` with its parent resolved, so `W/../W` or a relative path survive renames of W."""
    path = Path(os.path.abspath(os.fspath(path)))
    return resolved(path.parent) / path.name


def _refuse_existing(shown: str | os.PathLike) -> None:
    raise OutputError(f"output folder {os.fspath(shown)} already exists; choose another, remove it, or pass "
                      "--overwrite to replace it (the old folder is kept until the new one is complete)")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, inputs: Optional[Inputs] = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out_dir`.

    Refuses (OutputError, nothing touched) an existing `out_dir` without `overwrite`, and an
    `out_dir` that equals, contains or lies inside one of `inputs`. On any exception the
    temporary folder is removed and `out_dir` is left exactly as it was."""
    shown = out_dir
    check_output_location(out_dir, inputs or {})
    out_dir = _normalised(out_dir)
    if (out_dir.exists() or out_dir.is_symlink()) and not overwrite:
        _refuse_existing(shown)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    except OSError as e:
        raise _as_write_error(e, shown) from e
    try:
        yield tmp
        _follow_umask(tmp)
        _replace_keeping_old(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and exit_code_for(e) is not None:
            raise _as_write_error(e, shown) from e
        raise


def _replace_keeping_old(tmp: Path, out_dir: Path) -> None:
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}")
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _as_write_error(error: OSError, path) -> OSError:
    if isinstance(error, HirmError) or isinstance(error, (FileNotFoundError, FileExistsError)):
        return error
    return describe_write_failure(error, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w"):
    """Yield a temporary file object; on success it replaces `path` (mode from the umask)."""
    shown, path = path, _normalised(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    except OSError as e:
        raise _as_write_error(e, shown) from e
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        _follow_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and exit_code_for(e) is not None:
            raise _as_write_error(e, shown) from e
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Sorted, indented JSON, written atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


LOCK_FILE = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "workdir") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if needed) while the block runs; a second
    process gets LockedError naming the holder's pid. The lock dies with its process."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")
    except OSError as e:
        raise (describe_write_failure(e, folder, what) if exit_code_for(e) == 3 else e) from e
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise LockedError(f"{what} {os.fspath(folder)} is in use by another process (pid {holder}); "
                              "wait for it to finish, or use another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def safetensors_bytes(tensors: Mapping[str, "np.ndarray"], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The bytes of a safetensors file, depending only on its contents.

    `safetensors.numpy.save_file` writes `__metadata__` in the order of a per-process hash map,
    so two runs give different bytes. Here the header is JSON with sorted keys and the tensors
    are laid out in name order (the format's byte layout, padding the header with spaces to
    a multiple of 8); `safe_open`/`load_file` read it like any other file."""
    import numpy as np

    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, blobs = 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        dtype = _SAFETENSORS_DTYPES.get(array.dtype.name)
        if dtype is None:
            raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return b"".join([len(encoded).to_bytes(8, "little"), encoded, *blobs])


def save_safetensors(tensors: Mapping[str, "np.ndarray"], path: str | os.PathLike,
                     metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write `safetensors_bytes` to `path` (not atomic by itself: use it inside `atomic_dir`)."""
    Path(path).write_bytes(safetensors_bytes(tensors, metadata))


def fingerprint(x: "np.ndarray") -> str:
    """sha256 of a tensor's canonical float32 little-endian bytes (how deltas and run.json
    fingerprint base tensors)."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(x, dtype="<f4").tobytes()).hexdigest()
