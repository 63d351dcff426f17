"""Every on-disk layout, both directions, bit for bit; bad inputs fail clearly and write nothing.

Sources are built here from tiny random transformers models: transformers folders (flat and
text_model.* names, sharded), a diffusers pipeline folder, single-file SD 1.x (also as a
pickled .ckpt), SD 2.x and SDXL checkpoints (OpenCLIP tensors by the test's own inverse), and
a Flax checkpoint. Each is loaded, exported to a transformers folder, loaded by transformers,
and loaded back.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from hirm_jax.encoder.layouts import load_text_encoder, save_flax_checkpoint, save_text_encoder
from hirm_jax.encoder.clip_weights import WeightsError, canonical_hf_state, hf_to_flax
from tests.test_weights import assert_same_state, to_openclip

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=64)


def tiny_model(projection: bool, hidden_act: str, layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(**TINY, num_hidden_layers=layers, hidden_act=hidden_act)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def torch_state(model) -> dict[str, np.ndarray]:
    """Canonical text_model.* names, learned tensors only."""
    state = canonical_hf_state({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    state.pop("text_model.embeddings.position_ids", None)
    return state


@pytest.fixture(scope="module")
def models():
    # clip_l: OpenAI CLIP-L-like (quick_gelu, no projection); bigg: OpenCLIP-like (gelu, projection).
    return dict(clip_l=tiny_model(False, "quick_gelu", seed=0), bigg=tiny_model(True, "gelu", seed=1))


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


UNET_KEY = {"model.diffusion_model.out.2.weight": np.zeros((4, 8, 3, 3), np.float32)}


# Each writer returns (source, component, load kwargs, expected canonical state, hidden_act).
def src_transformers_flat(tmp, m):
    m["clip_l"].save_pretrained(tmp / "src")  # transformers 5 CLIPTextModel: flat encoder.* names
    return tmp / "src", None, {}, torch_state(m["clip_l"]), "quick_gelu"


def src_transformers_projection(tmp, m):
    m["bigg"].save_pretrained(tmp / "src")  # text_model.* + text_projection.weight
    return tmp / "src", None, {}, torch_state(m["bigg"]), "gelu"


def src_sharded(tmp, m):
    m["bigg"].save_pretrained(tmp / "src", max_shard_size="300KB")
    assert (tmp / "src" / "model.safetensors.index.json").is_file()
    return tmp / "src", None, {}, torch_state(m["bigg"]), "gelu"


def _pipeline(tmp, m) -> Path:
    folder = tmp / "pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    m["clip_l"].save_pretrained(folder / "text_encoder")   # flat names, as diffusers saves it
    m["bigg"].save_pretrained(folder / "text_encoder_2")   # text_model.* names
    return folder


def src_pipeline_text_encoder(tmp, m):
    return _pipeline(tmp, m), "text_encoder", {}, torch_state(m["clip_l"]), "quick_gelu"


def src_pipeline_text_encoder_2(tmp, m):
    return _pipeline(tmp, m), "text_encoder_2", {}, torch_state(m["bigg"]), "gelu"


def _sd1_tensors(m) -> dict:
    state = torch_state(m["clip_l"])
    state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]  # old checkpoints keep it
    return {**_prefixed("cond_stage_model.transformer.", state), **UNET_KEY}


def src_sd1(tmp, m):
    save_file(_sd1_tensors(m), str(tmp / "sd1.safetensors"))
    return tmp / "sd1.safetensors", None, {}, torch_state(m["clip_l"]), "quick_gelu"


def src_sd1_ckpt(tmp, m):
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in _sd1_tensors(m).items()}, "global_step": 7},
               tmp / "sd1.ckpt")
    return tmp / "sd1.ckpt", None, {"allow_pickle": True}, torch_state(m["clip_l"]), "quick_gelu"


def src_sd2(tmp, m):
    # SD 2.x stores all blocks and a projection; its pipeline uses the penultimate block and no projection.
    openclip = {**to_openclip(torch_state(m["bigg"])), "logit_scale": np.array(4.6, np.float32)}
    save_file({**_prefixed("cond_stage_model.model.", openclip), **UNET_KEY}, str(tmp / "sd2.safetensors"))
    want = {k: v for k, v in torch_state(m["bigg"]).items() if ".layers.2." not in k and k != "text_projection.weight"}
    return tmp / "sd2.safetensors", None, {}, want, "gelu"


def _sdxl(tmp, m) -> Path:
    tensors = {**_prefixed("conditioner.embedders.0.transformer.", torch_state(m["clip_l"])),
               **_prefixed("conditioner.embedders.1.model.", {**to_openclip(torch_state(m["bigg"])),
                                                               "logit_scale": np.array(4.6, np.float32)}),
               **UNET_KEY}
    save_file(tensors, str(tmp / "sdxl.safetensors"))
    return tmp / "sdxl.safetensors"


def src_sdxl_text_encoder(tmp, m):
    return _sdxl(tmp, m), "text_encoder", {}, torch_state(m["clip_l"]), "quick_gelu"


def src_sdxl_text_encoder_2(tmp, m):
    return _sdxl(tmp, m), "text_encoder_2", {}, torch_state(m["bigg"]), "gelu"


def src_sdxl_refiner(tmp, m):
    # The refiner has only the OpenCLIP bigG encoder, as embedder 0; diffusers calls it text_encoder_2.
    openclip = {**to_openclip(torch_state(m["bigg"])), "logit_scale": np.array(4.6, np.float32)}
    save_file({**_prefixed("conditioner.embedders.0.model.", openclip), **UNET_KEY}, str(tmp / "refiner.safetensors"))
    return tmp / "refiner.safetensors", None, {}, torch_state(m["bigg"]), "gelu"


def src_flax(tmp, m):
    encoder = load_text_encoder(src_transformers_projection(tmp, m)[0])
    save_flax_checkpoint(encoder, tmp / "flax")
    return tmp / "flax", None, {}, torch_state(m["bigg"]), "gelu"


SOURCES = {f.__name__.removeprefix("src_"): f for f in (
    src_transformers_flat, src_transformers_projection, src_sharded, src_pipeline_text_encoder,
    src_pipeline_text_encoder_2, src_sd1, src_sd1_ckpt, src_sd2, src_sdxl_text_encoder,
    src_sdxl_text_encoder_2, src_sdxl_refiner, src_flax)}


def assert_same_params(got, want):
    got, want = jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, g), (_, w) in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(np.asarray(g), np.asarray(w)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_round_trip_is_bit_exact(source, models, tmp_path):
    src, component, kwargs, want_state, hidden_act = SOURCES[source](tmp_path, models)
    encoder = load_text_encoder(src, component, **kwargs)
    config = encoder.config
    assert config.hidden_act == hidden_act
    assert config.num_hidden_layers == sum(k.endswith(".layer_norm1.bias") for k in want_state)
    assert bool(config.projection_dim) == ("text_projection.weight" in want_state)
    # PyTorch -> Flax
    assert_same_params(encoder.params, hf_to_flax(want_state, config))
    # Flax -> PyTorch: transformers loads the export with nothing missing or unexpected.
    exported = save_text_encoder(encoder, tmp_path / "export")
    cls = CLIPTextModelWithProjection if config.projection_dim else CLIPTextModel
    model, info = cls.from_pretrained(exported, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert_same_state(torch_state(model), want_state)
    # ... and back to Flax, through both Flax-side formats.
    assert_same_params(load_text_encoder(exported).params, encoder.params)
    again = load_text_encoder(save_flax_checkpoint(encoder, tmp_path / "flax_again"))
    assert again.config == config
    assert_same_params(again.params, encoder.params)


@pytest.mark.slow
def test_sd2_uses_the_penultimate_block_and_says_so(models, tmp_path, capsys):
    src = src_sd2(tmp_path, models)[0]
    encoder = load_text_encoder(src)
    said = capsys.readouterr().err
    assert "keeping 2 of 3 OpenCLIP blocks" in said
    assert "has no config.json: inferred 2 layers, width 128, 2 heads" in said
    ids = np.array([[0, 5, 6, 7, 999] + [999] * 72])
    bigg = models["bigg"]
    with torch.no_grad():
        hidden = bigg(torch.tensor(ids), output_hidden_states=True).hidden_states
        want = bigg.text_model.final_layer_norm(hidden[-2]).numpy()  # what SD 2.x conditions on
    got = encoder.apply(encoder.params, ids)["last_hidden_state"]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad inputs, through the command-line converter: exit code 2, a clear message, nothing written.

def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rewrite_weights(folder: Path, edit):
    from safetensors.numpy import load_file
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def bad_truncated(tmp, m):
    path = src_sd1(tmp, m)[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, None, "truncated or corrupt"


def bad_corrupt_header(tmp, m):
    (tmp / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return tmp / "x.safetensors", None, "truncated or corrupt"


def bad_wrong_shape(tmp, m):
    folder = _rewrite_weights(src_transformers_projection(tmp, m)[0], lambda s: s.update(
        {"text_model.encoder.layers.1.mlp.fc1.weight": np.zeros((256, 64), np.float32)}))
    return folder, None, r"text_model.encoder.layers.1.mlp.fc1.weight must have shape (256, 128)"


def bad_missing_key(tmp, m):
    folder = _rewrite_weights(src_transformers_projection(tmp, m)[0],
                              lambda s: s.pop("text_model.encoder.layers.0.self_attn.v_proj.bias"))
    return folder, None, "missing [text_model.encoder.layers.0.self_attn.v_proj.bias]"


def bad_unexpected_key(tmp, m):
    folder = _rewrite_weights(src_transformers_projection(tmp, m)[0],
                              lambda s: s.update({"text_model.extra.weight": np.zeros(3, np.float32)}))
    return folder, None, "unexpected [text_model.extra.weight]"


def bad_unknown_folder(tmp, m):
    (tmp / "weird").mkdir()
    (tmp / "weird" / "weights.npz").write_bytes(b"")
    return tmp / "weird", None, "not a supported layout"


def bad_unknown_single_file(tmp, m):
    save_file({"vae.encoder.weight": np.zeros(2, np.float32)}, str(tmp / "vae.safetensors"))
    return tmp / "vae.safetensors", None, "unknown single-file layout"


def bad_ckpt_without_allow_pickle(tmp, m):
    path = src_sd1_ckpt(tmp, m)[0]
    return path, None, "is a pickle (.ckpt)"


def bad_sdxl_without_component(tmp, m):
    return _sdxl(tmp, m), None, "component must be one of ['text_encoder', 'text_encoder_2'] but is None"


def bad_pipeline_unknown_component(tmp, m):
    return _pipeline(tmp, m), "text_encoder_3", "has no component 'text_encoder_3'"


def bad_missing_source(tmp, m):
    return tmp / "nowhere", None, "does not exist"


BAD = {f.__name__.removeprefix("bad_"): f for f in (
    bad_truncated, bad_corrupt_header, bad_wrong_shape, bad_missing_key, bad_unexpected_key, bad_unknown_folder,
    bad_unknown_single_file, bad_ckpt_without_allow_pickle, bad_sdxl_without_component,
    bad_pipeline_unknown_component, bad_missing_source)}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_and_writes_nothing(case, models, tmp_path, capsys):
    to_flax = _load_script("to_flax")
    src, component, message = BAD[case](tmp_path, models)
    out = tmp_path / "out"
    args = ["--src", str(src), "--out", str(out)] + (["--component", component] if component else [])
    assert to_flax.main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    with pytest.raises(WeightsError):
        load_text_encoder(src, component)


def test_bad_flax_checkpoint_to_torch_exits_2(models, tmp_path, capsys):
    flax_dir = src_flax(tmp_path, models)[0]
    params = flax_dir / "flax_params.msgpack"
    params.write_bytes(params.read_bytes()[:1000])
    assert _load_script("to_torch").main(["--src", str(flax_dir), "--out", str(tmp_path / "out")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_command_line_round_trip(models, tmp_path):
    """The scripts run as scripts: single file -> Flax (subprocess) -> transformers folder."""
    src = src_sdxl_text_encoder_2(tmp_path, models)[0]
    flax_dir, torch_dir = tmp_path / "te2_flax", tmp_path / "te2_torch"
    run = subprocess.run([sys.executable, str(REPO / "convert" / "to_flax.py"), "--src", str(src),
                          "--component", "text_encoder_2", "--out", str(flax_dir)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(flax_dir)
    assert "inferred 3 layers" in run.stderr
    assert _load_script("to_torch").main(["--src", str(flax_dir), "--out", str(torch_dir)]) == 0
    model, info = CLIPTextModelWithProjection.from_pretrained(torch_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_state(torch_state(model), torch_state(models["bigg"]))


# --------------------------------------------------------------------------------------------
# transformers 4.x, in its own interpreter (CI sets HIRM_TF4_PYTHON to a venv with transformers 4.57).

TF4_CHECK = r"""
import json, sys
import numpy as np, torch, transformers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
assert transformers.__version__.startswith("4."), transformers.__version__
root = sys.argv[1]
case = np.load(f"{root}/expected.npz")
for name, cls in (("te", CLIPTextModel), ("te2", CLIPTextModelWithProjection)):
    model, info = cls.from_pretrained(f"{root}/{name}", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, (name, bad)
    with torch.no_grad():
        out = model(torch.tensor(case["ids"]).long())
    np.testing.assert_allclose(out.last_hidden_state.numpy(), case[f"{name}_last"], atol=1e-4)
    if name == "te2":
        np.testing.assert_allclose(out.text_embeds.numpy(), case["te2_embeds"], atol=1e-4)
tok = CLIPTokenizer.from_pretrained(f"{root}/tokenizer")
ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
assert ids[:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407], ids[:8]
print("ok", transformers.__version__)
"""


@pytest.mark.slow
def test_exports_load_in_transformers_4(models, tmp_path):
    python = os.environ.get("HIRM_TF4_PYTHON")
    if not python:
        pytest.skip("HIRM_TF4_PYTHON is unset: set it to a python with transformers==4.57.* and torch "
                    "to check that exported folders load under transformers 4.x")
    from hirm_jax.encoder.tokenizer import build_clip_tokenizer
    ids = np.array([[0, 5, 6, 7, 999] + [999] * 72, [0, 9, 999] + [0] * 74])
    expected = dict(ids=ids)
    for name, source in (("te", "clip_l"), ("te2", "bigg")):
        folder = tmp_path / f"src_{name}"
        models[source].save_pretrained(folder)
        encoder = load_text_encoder(folder)
        save_text_encoder(encoder, tmp_path / name)
        out = encoder.apply(encoder.params, ids)
        expected[f"{name}_last"] = np.asarray(out["last_hidden_state"])
        if out["text_embeds"] is not None:
            expected[f"{name}_embeds"] = np.asarray(out["text_embeds"])
    np.savez(tmp_path / "expected.npz", **expected)
    build_clip_tokenizer(tmp_path / "tokenizer")
    run = subprocess.run([python, "-c", TF4_CHECK, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok 4."), run.stdout
