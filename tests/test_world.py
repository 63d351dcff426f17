"""The demo world: deterministic data, the shipped world loads, generates and judges, and a
broken world folder says how to rebuild it."""

import shutil

import numpy as np
import pytest

from hirm_jax import world as w
from hirm_jax.world import data

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def shipped():
    return w.load_world()


def test_world_data_is_deterministic():
    a, b = data.sample(12, seed=3), data.sample(12, seed=3)
    assert a.images.shape == (12, 32, 32, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.objects, b.objects)
    np.testing.assert_array_equal(a.styles, b.styles)
    assert not np.array_equal(a.images, data.sample(12, seed=4).images)
    assert not np.array_equal(a.images, data.sample(12, seed=3, split="eval").images)
    # A picture does not depend on the batch it was drawn in.
    np.testing.assert_array_equal(data.sample(4, seed=3, start=8).images, a.images[8:])
    np.testing.assert_array_equal(w.render_cell("star", "striped", [5, 6]), w.render_cell("star", "striped", [5, 6]))


def test_names_and_captions():
    assert w.OBJECT_ANCHOR in w.ALL_OBJECTS and w.OBJECT_ANCHOR not in w.OBJECTS
    assert w.STYLE_ANCHOR in w.ALL_STYLES and w.STYLE_ANCHOR not in w.STYLES
    assert len(w.OBJECTS) >= 6 and len(w.STYLES) >= 6
    assert not set(w.TRAIN_TEMPLATES) & set(w.HELDOUT_TEMPLATES)
    assert w.super_category("circle") == "blob" and w.super_category("striped") == "plain"
    assert w.caption("circle", "outline", "a {style} {object}") == "an outline circle"
    assert w.caption("circle", "striped", "a {style} {object}") == "a striped circle"
    with pytest.raises(ValueError, match="object must be one of"):
        data.render("dragon", "plain", np.random.default_rng(0))


@pytest.mark.slow
def test_shipped_text_encoder_is_a_clip_text_model(shipped):
    from transformers import CLIPTextModel

    from hirm_jax.encoder.layouts import load_text_encoder

    assert shipped.tokenizer("a striped circle").input_ids == [49406, 320, 22192, 7117, 49407]
    te = CLIPTextModel.from_pretrained(str(shipped.text_encoder_path))
    assert te.dtype == torch.float32
    ids = shipped.tokenizer(["a striped circle", "a photo of a plain blob"], padding="max_length",
                            max_length=77).input_ids
    with torch.no_grad():
        out = te(torch.tensor(ids))
    encoder = load_text_encoder(shipped.text_encoder_path)
    ours = encoder.apply(encoder.params, np.asarray(ids, np.int32))
    np.testing.assert_allclose(np.asarray(ours["last_hidden_state"]), out.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours["pooled_output"]), out.pooler_output.numpy(), atol=1e-4)


def test_judge_is_accurate_on_fresh_world_pictures(shipped):
    accuracy = shipped.judge.accuracy(data.sample(400, seed=987, split="eval"))
    assert accuracy["object_accuracy"] >= 0.99, accuracy
    assert accuracy["style_accuracy"] >= 0.99, accuracy


@pytest.mark.slow
def test_shipped_world_generates_what_is_asked(shipped):
    cells = [(o, s) for o, s in zip(w.ALL_OBJECTS, w.ALL_STYLES)]
    prompts = [w.caption(o, s, w.HELDOUT_TEMPLATES[0]) for o, s in cells]
    seeds = list(range(100, 100 + len(prompts)))
    images = w.generate(shipped, prompts=prompts, seeds=seeds)
    assert images.shape == (len(prompts), 32, 32, 3) and images.dtype == np.uint8
    again = w.generate(shipped, shipped.text_encoder_path, prompts[:2], seeds[:2])
    # A picture does not depend on its batch, up to one grey level: XLA's CPU kernels (AVX-512,
    # AMX) may sum in another order for another batch size, so bit-equality is not promised.
    difference = np.abs(images[:2].astype(np.int16) - again.astype(np.int16))
    assert difference.max() <= 1, f"images differ by {difference.max()}/255 across batch sizes"
    pred = shipped.judge.classify(images)
    objects_right = np.mean([p == o for p, (o, _) in zip(pred["object"], cells)])
    styles_right = np.mean([p == s for p, (_, s) in zip(pred["style"], cells)])
    assert objects_right >= 5 / 7 and styles_right >= 5 / 7, (pred["object"], pred["style"])
    with pytest.raises(ValueError, match="one seed per prompt"):
        w.generate(shipped, prompts=prompts, seeds=seeds[:1])


@pytest.fixture
def world_copy(tmp_path):
    folder = tmp_path / "world"
    shutil.copytree(w.SHIPPED, folder)
    return folder


def test_missing_world_file_says_how_to_rebuild(world_copy):
    (world_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(w.WorldError, match=r"missing unet/diffusion_pytorch_model.safetensors.*hirm-jax world train --out"):
        w.load_world(world_copy)
    with pytest.raises(w.WorldError, match="does not exist.*hirm-jax world train --out"):
        w.load_world(world_copy / "nowhere")


def test_corrupt_world_file_says_how_to_rebuild(world_copy):
    weights = world_copy / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(w.WorldError, match=r"text_encoder/model.safetensors do not match the sha256.*hirm-jax world train --out"):
        w.load_world(world_copy)
    judge = world_copy / "judge" / "judge.safetensors"
    judge.write_bytes(b"not a safetensors file")
    with pytest.raises(w.WorldError, match="cannot load the world.*hirm-jax world train --out"):
        w.load_world(world_copy, verify=False)
    (world_copy / "world.json").write_text("{not json")
    with pytest.raises(w.WorldError, match="not valid JSON.*hirm-jax world train --out"):
        w.load_world(world_copy)
