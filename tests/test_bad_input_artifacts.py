"""The bad-input suite for artifacts (issue 10): export, apply and convert on hostile inputs.

Each test feeds one bad input through the command line where the issue names a command and
checks the contract: exit 2 (3 when the machine refuses a write), exactly one `error:` line
naming the value and the rule, and nothing written or touched. Everything is built here from
tiny fabricated models (tests/fixtures_pipelines.py); the hub tests use an offline Hugging
Face cache folder built in tmp.
"""

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from hirm_jax.artifacts import delta as delta_module
from hirm_jax import fileio
from hirm_jax.artifacts import export
from hirm_jax.encoder import layouts
from hirm_jax.cli import main
from hirm_jax.artifacts.delta import fingerprint
from hirm_jax.fileio import safetensors_bytes, sha256_file
from hirm_jax.encoder.layouts import load_text_encoder
from hirm_jax.erase.masking import flatten
from hirm_jax.encoder.clip import TextEncoderConfig
from hirm_jax.encoder.clip_weights import WeightsError, canonical_hf_state, flax_to_hf
from tests.fixtures_pipelines import (TINY_VOCAB_SIZE, fabricate_workdir, save_encoder_folder, save_sd_pipeline,
                                      tiny_encoder, tiny_tokenizer)

REPO = Path(__file__).resolve().parents[1]
HUB_REPO = "tiny-org/tiny-sd"


# ---------------------------------------------------------------- helpers

def _picture(root: Path) -> dict:
    """Every entry under `root` (symlinks not followed) with its kind, mode and content hash or
    link target: two pictures are equal when nothing was touched."""
    picture = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                picture[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                picture[rel] = ("dir", stat.S_IMODE(path.stat().st_mode))
            else:
                picture[rel] = ("file", stat.S_IMODE(path.stat().st_mode), sha256_file(path))
    return picture


def _files(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`, following symlinked folders."""
    return {str(Path(folder, name).relative_to(root)): sha256_file(Path(folder, name))
            for folder, _, names in os.walk(root, followlinks=True) for name in names}


def _one_error(capsys, *names) -> str:
    """The single `error:` line on stderr; it must name every one of `names`."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], lines[0]
    assert "Traceback" not in err, err
    return lines[0]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"convert_{name}", REPO / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _tree_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _add_fingerprints(workdir: Path, base) -> None:
    """What erase records: base.trainable_sha256 = {flax path: fingerprint of the base tensor}."""
    run = json.loads((workdir / "run.json").read_text())
    flat = flatten(base.params)
    run["base"]["trainable_sha256"] = {p: fingerprint(np.asarray(flat[p], np.float32)) for p in run["trainable_paths"]}
    (workdir / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True))


def _assert_same_delta_tensors(got: Path, want: Path) -> None:
    got, want = (load_file(str(d / "hirm_delta.safetensors")) for d in (got, want))
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def _area(world, tmp_path: Path) -> types.SimpleNamespace:
    """A private copy of the world: a base encoder folder, its workdir (fingerprinted), the delta."""
    area = types.SimpleNamespace(root=tmp_path / "area")
    area.enc = save_encoder_folder(world.base, area.root / "models" / "enc")
    area.work, _ = fabricate_workdir(area.root / "work", world.base, source=area.enc)
    _add_fingerprints(area.work, world.base)
    area.delta = _tree_copy(world.delta, area.root / "delta")
    return area


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base encoder, a saved SD pipeline around it, a finished workdir and its delta."""
    tmp = tmp_path_factory.mktemp("bad_input")
    base = tiny_encoder(seed=0)
    w = types.SimpleNamespace(tmp=tmp, base=base)
    w.enc = save_encoder_folder(base, tmp / "enc")
    w.pipe = save_sd_pipeline(tmp / "pipe", w.enc)
    w.work, w.trained = fabricate_workdir(tmp / "work", base, source=w.enc)
    _add_fingerprints(w.work, base)
    w.delta = export.export_delta(w.work, tmp / "delta")
    w.full = export.export_full(w.work, tmp / "full")
    return w


# ---------------------------------------------------------------- 1. an output never touches an input

def _relation_out(relation: str, target: Path, tmp_path: Path) -> Path:
    """An --out that equals, contains or lies inside `target`, directly or through a symlink / `..`."""
    if relation == "equal":
        return target
    if relation == "contains":
        return target.parent
    if relation == "inside":
        return target / "sub" / "out"
    if relation == "symlink":
        link = tmp_path / "link-to-input"
        link.symlink_to(target, target_is_directory=True)
        return link
    assert relation == "dotdot"
    return target / "nowhere" / ".."


RELATIONS = ["equal", "contains", "inside", "symlink", "dotdot"]


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("fmt", ["full", "delta", "pipeline"])
@pytest.mark.slow
def test_export_refuses_an_output_over_its_workdir(world, tmp_path, capsys, fmt, relation):
    area = _area(world, tmp_path)
    pipe = _tree_copy(world.pipe, area.root / "pipe")
    out = _relation_out(relation, area.work, tmp_path)
    before = _picture(area.root)
    argv = ["export", f"--workdir={area.work}", f"--out={out}", f"--format={fmt}", "--overwrite"]
    assert main(argv + ([f"--pipeline={pipe}"] if fmt == "pipeline" else [])) == 2
    _one_error(capsys, "--workdir", "may not equal, contain or lie inside")
    assert _picture(area.root) == before


@pytest.mark.parametrize("relation", ["equal", "contains", "inside"])
def test_export_refuses_an_output_over_the_recorded_base_or_the_pipeline(world, tmp_path, capsys, relation):
    area = _area(world, tmp_path)
    pipe = _tree_copy(world.pipe, area.root / "pipes" / "pipe")
    before = _picture(area.root)
    out = _relation_out(relation, area.enc, tmp_path)
    assert main(["export", f"--workdir={area.work}", f"--out={out}", "--format=full", "--overwrite"]) == 2
    _one_error(capsys, "run.json's base", area.enc)
    out = _relation_out(relation, pipe, tmp_path)
    assert main(["export", f"--workdir={area.work}", f"--out={out}", "--format=pipeline", f"--pipeline={pipe}",
                 "--overwrite"]) == 2
    _one_error(capsys, "--pipeline", pipe)
    assert _picture(area.root) == before


@pytest.mark.parametrize("relation", ["equal", "inside"])
def test_batch_export_refuses_an_output_over_its_workdir_or_base(world, tmp_path, capsys, relation):
    """A joint=False workdir (index.json + one workdir per concept) exports one delta per concept."""
    area = _area(world, tmp_path)
    batch = area.root / "batch"
    shutil.move(area.work, batch / "concepts" / "van_gogh")
    (batch / "index.json").write_text(json.dumps({"concepts": {"Van Gogh": "concepts/van_gogh"}}))
    before = _picture(area.root)
    for target, flag in ((batch, "--workdir"), (area.enc, "run.json's base")):
        out = _relation_out(relation, target, tmp_path)
        assert main(["export", f"--workdir={batch}", f"--out={out}", "--overwrite"]) == 2
        _one_error(capsys, flag, target)
    assert _picture(area.root) == before
    assert main(["export", f"--workdir={batch}", f"--out={tmp_path / 'deltas'}"]) == 0
    _assert_same_delta_tensors(tmp_path / "deltas" / "van_gogh", world.delta)


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("flag", ["--base", "--delta"])
def test_apply_refuses_an_output_over_its_base_or_delta(world, tmp_path, capsys, flag, relation):
    area = _area(world, tmp_path)
    base = _tree_copy(world.pipe, area.root / "models" / "sd")
    target = base if flag == "--base" else area.delta
    out = _relation_out(relation, target, tmp_path)
    before = _picture(area.root)
    assert main(["apply", f"--delta={area.delta}", f"--base={base}", f"--out={out}", "--overwrite"]) == 2
    _one_error(capsys, flag, "may not equal, contain or lie inside")
    assert _picture(area.root) == before


def test_apply_into_the_folder_holding_the_base_leaves_it_intact(world, tmp_path, capsys):
    """The issue's example: apply --base=models/sd --out=models --overwrite."""
    models = tmp_path / "models"
    base = _tree_copy(world.pipe, models / "sd")
    (models / "other-model.txt").write_text("keep me")
    before = _picture(tmp_path)
    assert main(["apply", f"--delta={world.delta}", f"--base={base}", f"--out={models}", "--overwrite"]) == 2
    _one_error(capsys, f"--out={models}", "contains the input --base")
    assert _picture(tmp_path) == before


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("script", ["to_torch", "to_flax"])
def test_convert_refuses_an_output_over_its_source(world, tmp_path, capsys, script, relation):
    src = save_encoder_folder(world.base, tmp_path / "area" / "src")
    out = _relation_out(relation, src, tmp_path)
    before = _picture(tmp_path / "area")
    assert _script(script).main(["--src", str(src), "--out", str(out), "--overwrite"]) == 2
    _one_error(capsys, "--src", "may not equal, contain or lie inside")
    assert _picture(tmp_path / "area") == before


# ---------------------------------------------------------------- 2. symlinked component folders

@pytest.fixture
def linked_pipeline(world, tmp_path) -> Path:
    """The world's pipeline with unet/ and text_encoder/ as symlinks to folders elsewhere."""
    shared = tmp_path / "shared"
    shared.mkdir()
    pipe = _tree_copy(world.pipe, tmp_path / "linked")
    for component in ("unet", "text_encoder"):
        shutil.move(pipe / component, shared / component)
        (pipe / component).symlink_to(shared / component, target_is_directory=True)
    return pipe


def _assert_complete_patched_pipeline(out: Path, base: Path, world) -> None:
    from diffusers import StableDiffusionPipeline

    got, want = _files(out), _files(base)
    assert sorted(got) == sorted([*want, "hirm_applied.json"])
    for folder, dirs, names in os.walk(out):
        for name in dirs + names:
            assert not Path(folder, name).is_symlink(), Path(folder, name)
    for rel, digest in want.items():
        if not rel.startswith("text_encoder/model"):
            assert got[rel] == digest, rel
    expected = canonical_hf_state(load_file(str(world.full / "model.safetensors")))
    patched = canonical_hf_state(load_file(str(out / "text_encoder" / "model.safetensors")))
    for key, value in expected.items():
        np.testing.assert_array_equal(patched[key], value, err_msg=key)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    assert pipe.unet is not None and pipe.text_encoder is not None


def test_apply_follows_symlinked_component_folders(world, linked_pipeline, tmp_path, capsys):
    out = tmp_path / "applied"
    assert main(["apply", f"--delta={world.delta}", f"--base={linked_pipeline}", f"--out={out}"]) == 0, \
        capsys.readouterr().err
    _assert_complete_patched_pipeline(out, linked_pipeline, world)


def test_export_pipeline_follows_symlinked_component_folders(world, linked_pipeline, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", f"--workdir={world.work}", f"--out={out}", "--format=pipeline",
                 f"--pipeline={linked_pipeline}"]) == 0, capsys.readouterr().err
    _assert_complete_patched_pipeline(out, linked_pipeline, world)


def test_a_broken_symlink_in_the_base_is_named(world, tmp_path, capsys):
    base = _tree_copy(world.pipe, tmp_path / "pipe")
    (base / "vae" / "gone.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    out = tmp_path / "out"
    assert main(["apply", f"--delta={world.delta}", f"--base={base}", f"--out={out}"]) == 2
    _one_error(capsys, base / "vae" / "gone.safetensors", "broken symlink")
    assert not out.exists()


# ---------------------------------------------------------------- 3. the base is fingerprinted at erase time

def test_export_refuses_a_base_changed_since_erase(world, tmp_path, capsys):
    area = _area(world, tmp_path)
    assert main(["export", f"--workdir={area.work}", f"--out={tmp_path / 'ok'}"]) == 0
    assert "warning" not in capsys.readouterr().err
    other = tiny_encoder(seed=7)  # the same architecture, other weights
    save_encoder_folder(other, area.enc)
    for fmt in ("delta", "full"):
        out = tmp_path / f"changed-{fmt}"
        assert main(["export", f"--workdir={area.work}", f"--out={out}", f"--format={fmt}"]) == 2
        _one_error(capsys, "the base changed since erase", "encoder/layers/0/", area.enc, "sha256")
        assert not out.exists()


def test_export_without_recorded_fingerprints_warns_once_and_proceeds(world, tmp_path, capsys):
    base = save_encoder_folder(world.base, tmp_path / "enc")
    workdir, _ = fabricate_workdir(tmp_path / "work", world.base, source=base)  # an older workdir
    assert main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'delta'}"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no base fingerprints" in warnings[0] and str(workdir) in warnings[0], err
    _assert_same_delta_tensors(tmp_path / "delta", world.delta)


# ---------------------------------------------------------------- 4. reproducible bytes

def _assert_canonical_safetensors(path: Path) -> None:
    """The file is byte for byte what fileio.safetensors_bytes writes for its contents (sorted header)."""
    with safe_open(str(path), "numpy") as f:
        metadata = f.metadata()
    assert path.read_bytes() == safetensors_bytes(load_file(str(path)), metadata), path


def _assert_sorted_json(path: Path) -> None:
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n", path


def test_exports_and_applies_are_byte_reproducible(world, tmp_path):
    for fmt, write in (("delta", export.export_delta), ("full", export.export_full)):
        first, second = write(world.work, tmp_path / f"{fmt}-1"), write(world.work, tmp_path / f"{fmt}-2")
        assert _files(first) == _files(second), fmt
        for path in first.iterdir():
            if path.suffix == ".safetensors":
                _assert_canonical_safetensors(path)
            elif path.suffix == ".json":
                _assert_sorted_json(path)
    first = export.apply_delta(world.delta, world.pipe, tmp_path / "apply-1")
    second = export.apply_delta(world.delta, world.pipe, tmp_path / "apply-2")
    assert _files(first) == _files(second)
    _assert_sorted_json(first / "hirm_applied.json")


# ---------------------------------------------------------------- 5. outputs follow the umask

@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_follow_the_umask_and_leave_the_base_modes_alone(world, tmp_path, mask, dir_mode, file_mode):
    pipe = _tree_copy(world.pipe, tmp_path / "pipe")
    enc = _tree_copy(world.enc, tmp_path / "enc")
    bases_before = _picture(pipe), _picture(enc)
    old = os.umask(mask)
    try:
        outputs = [export.export_delta(world.work, tmp_path / "delta"),
                   export.export_full(world.work, tmp_path / "full"),
                   export.apply_delta(world.delta, pipe, tmp_path / "applied-pipe"),
                   export.apply_delta(world.delta, enc, tmp_path / "applied-enc")]
        for script in ("to_flax", "to_torch"):
            assert _script(script).main(["--src", str(enc), "--out", str(tmp_path / script)]) == 0
            outputs.append(tmp_path / script)
    finally:
        os.umask(old)
    for out in outputs:
        assert stat.S_IMODE(out.stat().st_mode) == dir_mode, out
        for folder, dirs, names in os.walk(out):
            for name in dirs:
                assert stat.S_IMODE(Path(folder, name).stat().st_mode) == dir_mode, Path(folder, name)
            for name in names:
                path = Path(folder, name)
                if path.stat().st_nlink == 1:  # hard links into the base are the base's files
                    assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    linked = [Path(f, n) for out in outputs for f, _, names in os.walk(out) for n in names if Path(f, n).stat().st_nlink > 1]
    assert linked, "apply to a pipeline hard-links its untouched files"
    assert (_picture(pipe), _picture(enc)) == bases_before  # a hard link never changed a base file's mode


# ---------------------------------------------------------------- 6. truncated and corrupt safetensors

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _huge_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 2 ** 62) + path.read_bytes()[8:])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


DAMAGES = {"truncated": _truncate, "huge_header": _huge_header, "empty": _empty}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("check", [False, True], ids=["apply", "check"])
def test_apply_on_a_damaged_base_names_the_file(world, tmp_path, capsys, damage, check):
    base = _tree_copy(world.pipe, tmp_path / "pipe")
    weights = base / "text_encoder" / "model.safetensors"
    DAMAGES[damage](weights)
    out = tmp_path / "out"
    argv = ["apply", f"--delta={world.delta}", f"--base={base}"] + (["--check"] if check else [f"--out={out}"])
    assert main(argv) == 2
    _one_error(capsys, weights, "truncated or corrupt")
    assert not out.exists()


def test_apply_to_a_bfloat16_base_passes_the_validation(world, tmp_path):
    """The library check reads only the header: bfloat16 tensors (which numpy cannot load) still apply."""
    import ml_dtypes

    from hirm_jax.artifacts.delta import round_to

    enc = tmp_path / "enc-bf16"
    enc.mkdir()
    state = flax_to_hf(world.base.params, world.base.config)
    fileio.save_safetensors({k: np.asarray(v, np.float32).astype(ml_dtypes.bfloat16) for k, v in state.items()},
                            enc / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(world.enc / "config.json", enc / "config.json")
    out = export.apply_delta(world.delta, enc, tmp_path / "out")
    record = json.loads((out / "hirm_applied.json").read_text())
    assert {p["stored_as"] for p in record["patched"]} == {"bfloat16"}
    expected = canonical_hf_state(load_file(str(world.full / "model.safetensors")))
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}
    raw = out.joinpath("model.safetensors").read_bytes()
    header_length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_length])
    for key, value in expected.items():
        begin, end = header[key]["data_offsets"]
        got = np.frombuffer(raw[8 + header_length + begin:8 + header_length + end], ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got.astype(np.float32).reshape(value.shape), round_to(value, "bfloat16"),
                                      err_msg=key)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_load_text_encoder_on_damaged_safetensors_names_the_file(world, tmp_path, capsys, damage):
    enc = _tree_copy(world.enc, tmp_path / "enc")
    pipe = _tree_copy(world.pipe, tmp_path / "pipe")
    for source, component, weights in ((enc, None, enc / "model.safetensors"),
                                       (pipe, "text_encoder", pipe / "text_encoder" / "model.safetensors")):
        DAMAGES[damage](weights)
        with pytest.raises(WeightsError, match="truncated or corrupt") as error:
            load_text_encoder(source, component)
        assert str(weights) in str(error.value)
    # ... and through export, whose base it is.
    workdir, _ = fabricate_workdir(tmp_path / "work", world.base, source=enc)
    assert main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'out'}"]) == 2
    _one_error(capsys, enc / "model.safetensors", "truncated or corrupt")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 7. missing inputs and hub ids

def test_missing_delta_or_base_says_it_does_not_exist(world, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    for argv, name in ((["--delta", str(missing), "--base", str(world.pipe)], missing),
                       (["--delta", str(world.delta), "--base", str(missing)], missing)):
        for tail in (["--out", str(tmp_path / "out")], ["--check"]):
            assert main(["apply", *argv, *tail]) == 2
            _one_error(capsys, name, "does not exist")
    assert not (tmp_path / "out").exists()


def _hub_cache(root: Path, repo: str, folder: Path) -> str:
    """An offline Hugging Face cache holding `folder` as `repo`'s main snapshot (files are
    symlinks into blobs/, as huggingface_hub writes them); returns the commit."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "blobs").mkdir()
    snapshot = repo_dir / "snapshots" / commit
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            blob = repo_dir / "blobs" / sha256_file(path)
            shutil.copyfile(path, blob)
            target = snapshot / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.path.relpath(blob, target.parent))
    return commit


@pytest.fixture
def hub_cache(world, tmp_path, monkeypatch) -> types.SimpleNamespace:
    """HF_HUB_CACHE = tmp/hub, offline, holding the world's pipeline as tiny-org/tiny-sd."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    commit = _hub_cache(root, HUB_REPO, world.pipe)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so that no local folder is spelled like the hub id
    return types.SimpleNamespace(root=root, commit=commit)


@pytest.mark.parametrize("revision", ["", "@main", "@commit"])
def test_apply_to_a_hub_id_reads_the_cache_and_records_the_revision(world, hub_cache, tmp_path, capsys, revision):
    revision = f"@{hub_cache.commit}" if revision == "@commit" else revision
    out = tmp_path / "applied"
    assert main(["apply", f"--delta={world.delta}", f"--base={HUB_REPO}{revision}", f"--out={out}"]) == 0, \
        capsys.readouterr().err
    record = json.loads((out / "hirm_applied.json").read_text())
    assert record["base"]["source"] == HUB_REPO and record["base"]["revision"] == hub_cache.commit
    assert Path(record["base"]["snapshot"]).name == hub_cache.commit
    local = export.apply_delta(world.delta, world.pipe, tmp_path / "local")
    assert {k: v for k, v in _files(out).items() if k != "hirm_applied.json"} == \
        {k: v for k, v in _files(local).items() if k != "hirm_applied.json"}
    capsys.readouterr()
    assert main(["apply", f"--delta={world.delta}", f"--base={HUB_REPO}", "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["base"]["revision"] == hub_cache.commit


def test_apply_to_a_missing_hub_id_exits_2(world, hub_cache, tmp_path, capsys):
    for base in ("tiny-org/no-such-model", f"{HUB_REPO}@{'0' * 40}"):
        assert main(["apply", f"--delta={world.delta}", f"--base={base}", f"--out={tmp_path / 'out'}"]) == 2
        _one_error(capsys, f"--base {base}", "could not be resolved")
    assert not (tmp_path / "out").exists()


def test_export_resolves_a_hub_base_at_its_recorded_revision(world, hub_cache, tmp_path, capsys):
    workdir, _ = fabricate_workdir(tmp_path / "work", world.base, source=Path(HUB_REPO), component="text_encoder")
    _add_fingerprints(workdir, world.base)
    run = json.loads((workdir / "run.json").read_text())
    run["base"].update(source=HUB_REPO, revision=hub_cache.commit)
    (workdir / "run.json").write_text(json.dumps(run))
    assert main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'delta'}"]) == 0, capsys.readouterr().err
    _assert_same_delta_tensors(tmp_path / "delta", world.delta)
    run["base"]["revision"] = "f" * 40  # a snapshot the cache does not hold
    (workdir / "run.json").write_text(json.dumps(run))
    assert main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'other'}"]) == 2
    _one_error(capsys, f"{HUB_REPO}@{'f' * 40}", "run.json")


# ---------------------------------------------------------------- 8. corrupt configs and tokenizers

def test_heads_that_do_not_divide_the_width_name_the_file_and_both_numbers(world, tmp_path, capsys):
    enc = _tree_copy(world.enc, tmp_path / "enc")
    config = json.loads((enc / "config.json").read_text())
    config["num_attention_heads"] = 5
    (enc / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as error:
        load_text_encoder(enc)
    for name in (enc / "config.json", "hidden_size", "num_attention_heads", "32", "5"):
        assert str(name) in str(error.value)
    assert _script("to_flax").main(["--src", str(enc), "--out", str(tmp_path / "out")]) == 2
    _one_error(capsys, enc / "config.json", "32 with 5 heads")
    config["num_attention_heads"] = 0
    (enc / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="must be positive"):
        load_text_encoder(enc)


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.json", "tokenizer_config.json"])
def test_a_corrupt_tokenizer_file_is_named(tmp_path, name):
    from hirm_jax.encoder.tokenizer import TokenizerError, load_clip_tokenizer

    folder = tmp_path / "tokenizer"
    tiny_tokenizer(out_dir=folder)
    assert load_clip_tokenizer(folder)("a cat")["input_ids"]
    (folder / name).write_text("{not json")
    with pytest.raises(TokenizerError) as error:
        load_clip_tokenizer(folder)
    assert str(folder / name) in str(error.value) and "not valid JSON" in str(error.value)


# ---------------------------------------------------------------- 9. SDXL single files holding one encoder

SDXL_2 = TextEncoderConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=1, projection_dim=32, hidden_act="gelu", bos_token_id=0,
                           eos_token_id=2, pad_token_id=1)
SDXL_1 = SDXL_2.replace(projection_dim=None, hidden_act="quick_gelu")


def _sdxl_file(path: Path, encoders: dict) -> Path:
    from tests.test_weights import to_openclip

    tensors = {"model.diffusion_model.out.2.weight": np.zeros((4, 8, 3, 3), np.float32)}
    if "text_encoder" in encoders:
        state = flax_to_hf(encoders["text_encoder"].params, SDXL_1)
        tensors.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in state.items()})
    if "text_encoder_2" in encoders:
        state = to_openclip(flax_to_hf(encoders["text_encoder_2"].params, SDXL_2))
        tensors.update({f"conditioner.embedders.1.model.{k}": v for k, v in state.items()})
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("held, missing", [("text_encoder_2", "text_encoder"), ("text_encoder", "text_encoder_2")])
def test_an_sdxl_file_with_one_encoder_loads_it_and_names_the_absent_one(tmp_path, capsys, held, missing):
    encoder = tiny_encoder(seed=3, config=SDXL_2 if held == "text_encoder_2" else SDXL_1)
    path = _sdxl_file(tmp_path / "sdxl.safetensors", {held: encoder})
    for component in (held, None):
        loaded = load_text_encoder(path, component)
        assert loaded.config.num_hidden_layers == 2 and bool(loaded.config.projection_dim) == (held == "text_encoder_2")
        for key, value in flatten(encoder.params).items():
            np.testing.assert_array_equal(np.asarray(flatten(loaded.params)[key]), value, err_msg=key)
    with pytest.raises(WeightsError, match=f"this file has {held} but not {missing}"):
        load_text_encoder(path, missing)
    assert _script("to_flax").main(["--src", str(path), "--component", missing, "--out", str(tmp_path / "o")]) == 2
    _one_error(capsys, path, f"this file has {held} but not {missing}")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 10. temporaries of killed runs

@pytest.mark.parametrize("command", ["export", "apply"])
def test_a_killed_run_s_temporary_is_removed_by_the_next_write(world, tmp_path, capsys, command):
    out, dead = tmp_path / "out", _dead_pid()
    stale = tmp_path / f".out.tmp-{dead}-abc123"
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "half-written.safetensors").write_bytes(b"\0" * 64)
    argv = (["export", f"--workdir={world.work}", f"--out={out}"] if command == "export"
            else ["apply", f"--delta={world.delta}", f"--base={world.pipe}", f"--out={out}"])
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert not stale.exists() and out.is_dir()
    removed = [line for line in err.splitlines() if line.startswith("removed")]
    assert len(removed) == 1 and str(stale) in removed[0] and str(dead) in removed[0], err


# ---------------------------------------------------------------- 11. the machine refuses the write

def _command(kind: str, world, out: Path) -> list[str]:
    if kind == "apply":
        return ["apply", f"--delta={world.delta}", f"--base={world.pipe}", f"--out={out}"]
    return ["export", f"--workdir={world.work}", f"--out={out}", f"--format={kind}"]


@pytest.mark.parametrize("kind", ["delta", "full", "apply"])
def test_a_read_only_output_parent_exits_3_naming_out(world, tmp_path, capsys, monkeypatch, kind):
    parent = tmp_path / "ro"
    out = parent / "out"
    assert main(_command(kind, world, out)) == 0  # the old output, to be kept
    capsys.readouterr()
    before = _picture(parent)
    if os.geteuid() != 0:
        parent.chmod(0o555)
    else:  # root ignores modes: make the parent refuse as a read-only file system does
        real_mkdtemp = tempfile.mkdtemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == parent.resolve():
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
            return real_mkdtemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(fileio.tempfile, "mkdtemp", refuse)
    try:
        assert main(_command(kind, world, out) + ["--overwrite"]) == 3
    finally:
        parent.chmod(0o755)
    line = _one_error(capsys, out)
    assert ".tmp-" not in line
    assert _picture(parent) == before


@pytest.mark.parametrize("kind", ["delta", "full", "apply"])
def test_a_full_disk_exits_3_naming_out_and_keeps_the_old_output(world, tmp_path, capsys, monkeypatch, kind):
    out = tmp_path / "out"
    assert main(_command(kind, world, out)) == 0
    capsys.readouterr()
    before = _picture(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1]))

    target = {"delta": (export, "save_safetensors"), "full": (layouts, "save_safetensors"),
              "apply": (delta_module, "_link_or_copy")}[kind]
    monkeypatch.setattr(*target, full)
    assert main(_command(kind, world, out) + ["--overwrite"]) == 3
    line = _one_error(capsys, out, "the disk is full")
    assert ".tmp-" not in line
    assert _picture(tmp_path) == before
