"""The bad-input suite, part 4: the writing rules every command shares (hirm_jax.fileio,
hirm_jax.errors). Each test breaks a write the way a careless command line or a crash would and
checks that nothing is lost."""

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from hirm_jax import errors, fileio
from hirm_jax.cli import main


def _folder(path, text="old"):
    path.mkdir(parents=True)
    (path / "file.txt").write_text(text)
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_overwrite_through_dot_dot_replaces_the_folder(tmp_path):
    """`--out=W/../W`: the old code renamed W aside, then could not find W/.. and left the old
    folder hidden as .W.old-PID."""
    out = _folder(tmp_path / "W")
    with fileio.atomic_dir(tmp_path / "W" / ".." / "W", overwrite=True) as tmp:
        (tmp / "file.txt").write_text("new")
    assert (out / "file.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["W"]


def test_a_failed_replace_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = _folder(tmp_path / "out")
    real_replace, calls = os.replace, []

    def second_replace_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", second_replace_fails)
    with pytest.raises(errors.WriteError, match=f"could not write output {out}: the disk is full"):
        with fileio.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "file.txt").write_text("new")
    assert (out / "file.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_existing_output_is_refused_naming_overwrite(tmp_path):
    out = _folder(tmp_path / "out")
    with pytest.raises(errors.OutputError, match="already exists.*--overwrite"):
        with fileio.atomic_dir(out):
            pass
    assert (out / "file.txt").read_text() == "old"


@pytest.mark.parametrize("relation", ["equal", "contains", "inside", "symlink"])
def test_an_output_over_an_input_is_refused_before_anything_is_touched(tmp_path, relation):
    source = _folder(tmp_path / "models" / "sd")
    (tmp_path / "link").symlink_to(tmp_path / "models")
    out = {"equal": source, "contains": tmp_path / "models", "inside": source / "sub",
           "symlink": tmp_path / "link" / "sd"}[relation]
    with pytest.raises(errors.OutputError, match="may not equal, contain or lie inside"):
        with fileio.atomic_dir(out, overwrite=True, inputs={"--base": source}):
            pass
    assert (source / "file.txt").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["sd"]


def test_stale_temporaries_of_dead_processes_are_removed_and_a_moved_aside_folder_restored(tmp_path, capsys):
    pid = _dead_pid()
    stale = _folder(tmp_path / f".out.tmp-{pid}-abc", "partial")
    moved_aside = _folder(tmp_path / f".out.old-{pid}-abc", "the user's folder")
    alive = _folder(tmp_path / f".out.tmp-{os.getpid()}-xyz", "another writer, still running")
    fileio.clean_stale(tmp_path / "out")
    assert not stale.exists() and alive.exists()
    assert (tmp_path / "out" / "file.txt").read_text() == "the user's folder" and not moved_aside.exists()
    err = capsys.readouterr().err
    assert f"removed {stale}" in err and "restored" in err


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with fileio.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "a.json").write_text("{}")
        fileio.write_json(tmp_path / "b.json", {"b": 1, "a": 2})
    finally:
        os.umask(old)
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == oct(0o750)
    assert oct((tmp_path / "out" / "sub").stat().st_mode & 0o777) == oct(0o750)
    assert oct((tmp_path / "out" / "sub" / "a.json").stat().st_mode & 0o777) == oct(0o640)
    assert oct((tmp_path / "b.json").stat().st_mode & 0o777) == oct(0o640)
    assert (tmp_path / "b.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'


def test_safetensors_bytes_depend_only_on_the_contents(tmp_path):
    """safetensors' own writer orders metadata by a per-process hash: two Python processes give
    different bytes. Ours sorts it, and the file loads as usual."""
    code = ("import sys, hashlib, numpy as np; from hirm_jax.fileio import safetensors_bytes; "
            "b = safetensors_bytes({'w': np.arange(6, dtype=np.float32), 'a': np.ones(2, np.float16)}, "
            "{f'key{i}': str(i) for i in range(8)}); print(hashlib.sha256(b).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(digests) == 1
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(2, np.float16)}
    fileio.save_safetensors(tensors, tmp_path / "t.safetensors", {"z": "1", "a": "2"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())


def test_a_second_holder_of_a_folder_lock_is_refused_naming_the_first(tmp_path):
    with fileio.folder_lock(tmp_path / "w"):
        with pytest.raises(errors.LockedError, match=f"pid {os.getpid()}"):
            with fileio.folder_lock(tmp_path / "w"):
                pass
    with fileio.folder_lock(tmp_path / "w"):  # released: free again
        pass


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.setenv("HIRM_JAX_DEBUG", "0")  # (setenv, not delenv: it is restored afterwards)
    assert errors.report(errors.OutputError("out exists")) == 2
    assert errors.report(errors.WriteError("disk full")) == 3
    assert errors.report(FileNotFoundError(2, "No such file", "/x")) == 2
    assert capsys.readouterr().err.splitlines() == ["error: out exists", "error: disk full", "error: /x does not exist"]
    with pytest.raises(ZeroDivisionError):
        errors.report(ZeroDivisionError("a bug"))
    monkeypatch.setenv("HIRM_JAX_DEBUG", "1")
    with pytest.raises(errors.OutputError):
        errors.report(errors.OutputError("out exists"))


def test_debug_flag_shows_the_traceback_of_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HIRM_JAX_DEBUG", "0")  # restored after the test: --debug below sets it to 1
    argv = ["apply", f"--delta={tmp_path / 'absent'}", f"--base={tmp_path}", f"--out={tmp_path / 'out'}"]
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(errors.HirmError):
        main(["--debug", *argv])
    assert errors.debug_enabled()
