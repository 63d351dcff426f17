"""Export and apply: full folders, deltas with fingerprints, patched pipelines, in-memory apply."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from tests.fixtures_pipelines import (TINY_CONFIG_PROJ, fabricate_workdir, save_encoder_folder, save_sd_pipeline,
                                tiny_encoder, tiny_sd_pipeline, tiny_tokenizer)
from hirm_jax.artifacts import export
from hirm_jax.pipelines.patch import apply_delta_to_pipeline
from hirm_jax.artifacts.delta import fingerprint, round_to
from hirm_jax.errors import OutputError
from hirm_jax.erase.masking import flatten
from hirm_jax.encoder.clip_weights import canonical_hf_state, expand_table

ROOT = Path(__file__).resolve().parent.parent


def _hf_key(path: str, config) -> str:
    return next(k for k, p, _ in expand_table(config) if "/".join(p) == path)


def _state(folder: Path) -> dict[str, np.ndarray]:
    return canonical_hf_state(load_file(str(folder / "model.safetensors")))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One base encoder stored four ways, a saved SD pipeline in fp32 and fp16, two workdirs."""
    tmp = tmp_path_factory.mktemp("export")
    base = tiny_encoder(seed=0)
    w = types.SimpleNamespace(tmp=tmp, base=base)
    w.enc32 = save_encoder_folder(base, tmp / "enc32")  # text_model.* names, float32
    w.enc16 = save_encoder_folder(base, tmp / "enc16", dtype="float16", layout="flat")
    w.pipe32 = save_sd_pipeline(tmp / "pipe32", w.enc32)
    # The same pipeline with an fp16, flat-named text encoder (as diffusers' fp16 variants) and a
    # stale pickle that must not survive into a patched copy.
    w.pipe16 = tmp / "pipe16"
    shutil.copytree(w.pipe32, w.pipe16, copy_function=os.link)
    shutil.rmtree(w.pipe16 / "text_encoder")
    save_encoder_folder(base, w.pipe16 / "text_encoder", dtype="float16", layout="flat")
    (w.pipe16 / "text_encoder" / "pytorch_model.bin").write_bytes(b"stale")
    w.work32, w.trained = fabricate_workdir(tmp / "work32", base, source=w.enc32)
    w.work16, _ = fabricate_workdir(tmp / "work16", base, source=w.enc16)
    w.delta32 = export.export_delta(w.work32, tmp / "delta32")
    w.delta16 = export.export_delta(w.work16, tmp / "delta16")
    w.full32 = export.export_full(w.work32, tmp / "full32")
    return w


def test_delta_holds_only_changed_tensors_with_fingerprints(world):
    config = world.base.config
    changed = {p for p, v in world.trained.items() if not np.array_equal(v, flatten(world.base.params)[p])}
    assert len(changed) == len(world.trained) - 1  # layer_norm1.bias was left unchanged
    with safe_open(str(world.delta32 / "hirm_delta.safetensors"), "np") as f:
        keys, metadata = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys == {f"text_encoder.{_hf_key(p, config)}" for p in changed}
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    q = tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == np.float32
    np.testing.assert_array_equal(q, world.trained["encoder/layers/0/self_attn/q_proj/kernel"].T)  # torch [out, in]
    assert metadata["hirm_format"] == "hirm_delta" and json.loads(metadata["concepts"]) == ["Van Gogh"]

    text = (world.delta32 / "hirm_config.json").read_text()
    config_json = json.loads(text)
    assert text == json.dumps(config_json, indent=2, sort_keys=True) + "\n"
    assert config_json["concepts"] == ["Van Gogh"] and config_json["anchors"] == {"Van Gogh": "painting"}
    assert config_json["base"]["source"] == str(world.enc32) and config_json["seed"] == 0
    assert config_json["objective"]["name"] == "hirm_s" and config_json["hirm_jax_version"]
    base_state = _state(world.enc32)
    for key, entry in config_json["tensors"].items():
        assert entry["base_sha256"] == fingerprint(base_state[key.removeprefix("text_encoder.")])
    # An fp16-stored base loaded to fp32 has the same fingerprints as the fp32 one.
    assert json.loads((world.delta16 / "hirm_config.json").read_text())["tensors"] == config_json["tensors"]


@pytest.mark.parametrize("delta, base, dtype", [
    ("delta32", "enc32", np.float32), ("delta32", "pipe32", np.float32),
    ("delta16", "enc16", np.float16), ("delta16", "pipe16", np.float16),
])
def test_apply_delta_equals_export_full(world, delta, base, dtype):
    base_dir = getattr(world, base)
    out = export.apply_delta(getattr(world, delta), base_dir, world.tmp / f"applied-{delta}-{base}")
    is_pipeline = base.startswith("pipe")
    encoder_dir = out / "text_encoder" if is_pipeline else out
    raw = load_file(str(encoder_dir / "model.safetensors"))
    original = load_file(str((base_dir / "text_encoder" if is_pipeline else base_dir) / "model.safetensors"))
    assert sorted(raw) == sorted(original)  # key names kept as the base spelled them
    assert {v.dtype for v in raw.values()} == {np.dtype(dtype)}  # storage dtype kept
    expected = _state(world.full32)
    for key, value in canonical_hf_state(raw).items():
        np.testing.assert_array_equal(value, expected[key].astype(dtype), err_msg=key)
    assert (encoder_dir / "config.json").read_text() == (
        (base_dir / "text_encoder" if is_pipeline else base_dir) / "config.json").read_text()
    record = json.loads((out / "hirm_applied.json").read_text())
    assert len(record["patched"]) == len(json.loads((getattr(world, delta) / "hirm_config.json").read_text())["tensors"])
    if is_pipeline:  # untouched components are hard links, stale pickles are left out
        unet = "unet/diffusion_pytorch_model.safetensors"
        assert os.path.samefile(out / unet, base_dir / unet)
        assert not os.path.samefile(out / "text_encoder/model.safetensors", base_dir / "text_encoder/model.safetensors")
        assert not (out / "text_encoder" / "pytorch_model.bin").exists()
        assert record["left_out"] == (["text_encoder/pytorch_model.bin"] if base == "pipe16" else [])


def test_apply_to_a_different_base_names_tensor_and_hashes(world):
    other = save_encoder_folder(tiny_encoder(seed=7), world.tmp / "other")
    out = world.tmp / "never-written"
    with pytest.raises(export.FingerprintError) as err:
        export.apply_delta(world.delta32, other, out)
    message = str(err.value)
    key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert key in message and "Nothing was written" in message
    assert fingerprint(_state(other)[key.removeprefix("text_encoder.")]) in message
    assert json.loads((world.delta32 / "hirm_config.json").read_text())["tensors"][key]["base_sha256"] in message
    assert not out.exists() and not list(world.tmp.glob(".never-written*"))


def test_tampered_delta_is_refused(world):
    tampered = world.tmp / "tampered"
    shutil.copytree(world.delta32, tampered)
    with open(tampered / "hirm_delta.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(export.DeltaError, match="sha256"):
        export.apply_delta(tampered, world.enc32, world.tmp / "from-tampered")


@pytest.mark.slow
def test_export_full_loads_in_transformers_and_matches_flax(world):
    import torch
    from transformers import CLIPTextModel

    model, info = CLIPTextModel.from_pretrained(str(world.full32), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded = export.load_run(world.work32)
    ids = np.array([[world.base.config.bos_token_id, 5, 77, 300, world.base.config.eos_token_id] + [world.base.config.eos_token_id] * 3])
    flax_out = np.asarray(loaded.base.apply(loaded.erased_params, ids)["last_hidden_state"])
    with torch.no_grad():
        torch_out = model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(torch_out, flax_out, atol=1e-5)


def test_in_memory_apply_equals_exported_pipeline(world):
    from diffusers import StableDiffusionPipeline

    exported = export.export_pipeline(world.work32, world.pipe32, world.tmp / "exported-pipe")
    reloaded = StableDiffusionPipeline.from_pretrained(str(exported), safety_checker=None, requires_safety_checker=False)
    pipe = apply_delta_to_pipeline(tiny_sd_pipeline(world.enc32), world.delta32)
    got, want = pipe.text_encoder.state_dict(), reloaded.text_encoder.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].equal(want[key]), key


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_in_memory_apply_to_half_precision_module(tmp_path, precision):
    """A delta from an fp32 base fits the same encoder loaded in fp16/bf16 (rounded fingerprints)."""
    import torch
    from transformers import CLIPTextModel

    base = tiny_encoder(seed=3, fp16_exact=False)
    folder = save_encoder_folder(base, tmp_path / "enc")
    workdir, trained = fabricate_workdir(tmp_path / "work", base, source=folder)
    delta = export.export_delta(workdir, tmp_path / "delta")
    dtype = getattr(torch, precision)
    module = CLIPTextModel.from_pretrained(str(folder), torch_dtype=dtype)
    apply_delta_to_pipeline(module, delta)
    q = module.state_dict()["encoder.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == dtype
    want = torch.from_numpy(trained["encoder/layers/0/self_attn/q_proj/kernel"].T.copy()).to(dtype)
    assert q.equal(want)
    # numpy's rounding (used on disk) is torch's rounding.
    np.testing.assert_array_equal(round_to(trained["encoder/layers/0/mlp/fc1/kernel"], precision),
                                  torch.from_numpy(trained["encoder/layers/0/mlp/fc1/kernel"]).to(dtype).float().numpy())

    other = CLIPTextModel.from_pretrained(str(save_encoder_folder(tiny_encoder(seed=4), tmp_path / "other")))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(export.FingerprintError, match="No weight was changed"):
        apply_delta_to_pipeline(other, delta)
    assert all(before[k].equal(v) for k, v in other.state_dict().items())


def test_text_encoder_2_with_projection(tmp_path):
    """SDXL's second encoder: text_model.* names plus text_projection, component text_encoder_2."""
    from transformers import CLIPTextModelWithProjection

    base = tiny_encoder(seed=5, config=TINY_CONFIG_PROJ)
    pipe_dir = tmp_path / "sdxl"
    save_encoder_folder(base, pipe_dir / "text_encoder_2")
    (pipe_dir / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    workdir, trained = fabricate_workdir(tmp_path / "work", base, source=pipe_dir, component="text_encoder_2",
                                         component_name="text_encoder_2")
    delta = export.export_delta(workdir, tmp_path / "delta")
    keys = set(load_file(str(delta / "hirm_delta.safetensors")))
    assert keys and all(k.startswith("text_encoder_2.text_model.encoder.layers.0.") for k in keys)
    out = export.apply_delta(delta, pipe_dir, tmp_path / "patched")
    assert set(_state(out / "text_encoder_2")) == set(_state(pipe_dir / "text_encoder_2"))

    module = CLIPTextModelWithProjection.from_pretrained(str(out / "text_encoder_2"))
    pipe = types.SimpleNamespace(text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(pipe_dir / "text_encoder_2")))
    apply_delta_to_pipeline(pipe, delta)
    for key, value in module.state_dict().items():
        assert pipe.text_encoder_2.state_dict()[key].equal(value), key
    with pytest.raises(export.DeltaError, match="no text encoder named"):
        apply_delta_to_pipeline(types.SimpleNamespace(text_encoder=module), delta)


def test_load_run_explains_a_missing_or_broken_workdir(world, tmp_path):
    with pytest.raises(export.RunError, match="run `hirm-jax erase` first"):
        export.load_run(tmp_path / "nowhere")
    per_concept = tmp_path / "per_concept"
    (per_concept / "checkpoints").mkdir(parents=True)
    with pytest.raises(export.RunError, match="unfinished run .* to resume"):
        export.load_run(per_concept)
    (per_concept / "index.json").write_text(json.dumps({"concepts": {"Van Gogh": "concepts/van_gogh-1234"}}))
    with pytest.raises(export.RunError, match="joint=False.*concepts/van_gogh-1234"):
        export.load_run(per_concept)
    broken = tmp_path / "broken"
    shutil.copytree(world.work32, broken)
    (broken / "run.json").write_text("{not json")
    with pytest.raises(export.RunError, match="corrupt.*run `hirm-jax erase` first"):
        export.load_run(broken)
    shutil.copy(world.work32 / "run.json", broken / "run.json")
    (broken / "erased_trainable.safetensors").unlink()
    with pytest.raises(export.RunError, match="erased_trainable.safetensors is missing"):
        export.export_delta(broken, tmp_path / "delta")
    assert not (tmp_path / "delta").exists()


def test_apply_delta_needs_neither_jax_nor_torch(world):
    code = ("import sys; sys.modules['jax'] = sys.modules['torch'] = sys.modules['flax'] = None\n"
            "from hirm_jax.artifacts.delta import apply_delta\n"
            f"apply_delta({str(world.delta32)!r}, {str(world.enc32)!r}, {str(world.tmp / 'nojax')!r})\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(load_file(str(world.tmp / "nojax" / "model.safetensors"))[
        "text_model.encoder.layers.0.mlp.fc2.weight"], _state(world.full32)["text_model.encoder.layers.0.mlp.fc2.weight"])


def test_sharded_symlinked_and_variant_checkpoints_are_all_patched(world, tmp_path):
    """A Hugging Face cache snapshot: files are symlinks; text_encoder is sharded and has an fp16 variant."""
    from safetensors.numpy import save_file

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    for path in world.pipe32.rglob("*"):
        if path.is_file() and "text_encoder" not in path.parts:
            target = snap / path.relative_to(world.pipe32)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, blobs / path.name)
            target.symlink_to(blobs / path.name)
    encoder_dir = snap / "text_encoder"
    encoder_dir.mkdir()
    shutil.copy(world.enc32 / "config.json", encoder_dir / "config.json")
    state = _state(world.enc32)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(blobs / shard))
        (encoder_dir / shard).symlink_to(blobs / shard)
    (encoder_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    save_file({k.removeprefix("text_model."): v.astype(np.float16) for k, v in state.items()},
              str(encoder_dir / "model.fp16.safetensors"))

    out = export.apply_delta(world.delta32, snap, tmp_path / "out")
    record = json.loads((out / "hirm_applied.json").read_text())
    num_tensors = len(json.loads((world.delta32 / "hirm_config.json").read_text())["tensors"])
    assert len(record["patched"]) == 2 * num_tensors
    expected = _state(world.full32)
    merged = {}
    for shard in shards:
        merged.update(load_file(str(out / "text_encoder" / shard)))
        assert not (out / "text_encoder" / shard).is_symlink()
    for key, value in merged.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    variant = canonical_hf_state(load_file(str(out / "text_encoder" / "model.fp16.safetensors")))
    for key, value in variant.items():
        np.testing.assert_array_equal(value, expected[key].astype(np.float16), err_msg=key)
    assert os.path.samefile(out / "unet/diffusion_pytorch_model.safetensors", blobs / "diffusion_pytorch_model.safetensors")
    for shard, keys in shards.items():  # the base's blobs are untouched
        untouched = load_file(str(blobs / shard))
        assert all(np.array_equal(untouched[k], state[k]) for k in keys)
    with pytest.raises(OutputError, match="lies inside the input --base"):
        export.apply_delta(world.delta32, snap, snap / "inside")


@pytest.mark.slow
def test_a_real_erase_workdir_exports_and_applies(world, tmp_path):
    """The trainer's workdir (configs/tiny.py) meets this module's contract end to end."""
    from hirm_jax.config_lib import base_config
    from hirm_jax.run import train_and_evaluate

    folder = tmp_path / "enc"
    shutil.copytree(world.enc32, folder)
    tiny_tokenizer(out_dir=folder)
    config = base_config()
    config.encoder.path, config.encoder.component = str(folder), ""
    config.concepts, config.super_categories = ("Van Gogh",), {"Van Gogh": "painting"}
    config.train.learning_rate, config.train.epochs, config.report.enabled = 1e-2, 2, False
    assert train_and_evaluate(config, tmp_path / "work")["status"] == "done"

    delta = export.export_delta(tmp_path / "work", tmp_path / "delta")
    keys = set(load_file(str(delta / "hirm_delta.safetensors")))
    assert keys and all(k.startswith("text_encoder.text_model.encoder.layers.0.") for k in keys)
    full = export.export_full(tmp_path / "work", tmp_path / "full")
    applied = export.apply_delta(delta, world.pipe16, tmp_path / "pipe")
    got = canonical_hf_state(load_file(str(applied / "text_encoder" / "model.safetensors")))
    for key, value in _state(full).items():
        np.testing.assert_array_equal(got[key], value.astype(np.float16), err_msg=key)
