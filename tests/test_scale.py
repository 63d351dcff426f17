"""Scale-out on 8 fake CPU devices: sharded == single device, batch erasure == solo erasure,
resume across meshes, and concept lists checked line by line before training."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from configs import tiny
from hirm_jax.erase import masking
from hirm_jax.erase import sharding
from hirm_jax.config_lib import ConfigError
from hirm_jax.encoder.layouts import load_text_encoder
from hirm_jax.encoder.tokenizer import PromptTooLongError
from hirm_jax.erase.setup import plan_erase
from hirm_jax.run import train_and_evaluate

CONCEPTS = ("Van Gogh", "Monet", "Picasso", "Rembrandt", "Hokusai")


def config_for(encoder_dir, concepts=("Van Gogh",), joint=True, **mesh):
    c = tiny.get_config("hirm_s")
    c.encoder.path = str(encoder_dir)
    c.concepts = concepts
    c.super_categories = {name: "painting" for name in concepts}
    c.joint = joint
    c.train.epochs = 8
    c.train.checkpoint_every = 4
    c.train.log_every = 4
    for axis, size in mesh.items():
        setattr(c.mesh, axis, size)
    return c


def mesh_of(devices, concept=1, data=1, fsdp=1):
    cfg = type("M", (), dict(concept=concept, data=data, fsdp=fsdp))
    return sharding.make_mesh(cfg, devices=jax.devices()[:devices])


def trained(workdir, concept=None):
    folder = workdir
    if concept is not None:
        folder = workdir / json.loads((workdir / "index.json").read_text())["concepts"][concept]
    return load_file(str(folder / "erased_trainable.safetensors"))


# The key bias cannot change attention (softmax ignores a shift shared by a row's logits), so its
# true gradient is 0 and Adam turns float rounding noise into +-lr steps that differ with the
# reduction order of each mesh. It is left out of these comparisons (it cannot change any output).
INERT = "self_attn/k_proj/bias"


# Adam divides by sqrt(v): a coordinate whose gradient is near rounding level moves by up to
# lr per step in a direction set by that rounding, so sharded and solo runs agree to a small
# fraction of lr (1e-3 in the tiny config), not to machine epsilon.
def assert_close(a, b, tol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        if not k.endswith(INERT):
            np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=k)


def test_prompts_encode_in_chunks_of_at_most_two_compiled_shapes():
    from hirm_jax.encoder.clip import TextEncoder, TextEncoderConfig
    from hirm_jax.erase.jobs import ENCODE_CHUNK, encode_in_chunks
    encoder = TextEncoder.init(TextEncoderConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8))
    encode = jax.jit(lambda p, i, m: {"last": encoder.apply(p, i)["last_hidden_state"]})
    for n in (ENCODE_CHUNK + 6, 2 * ENCODE_CHUNK + 2):
        ids = np.random.default_rng(n).integers(0, 100, (n, 8)).astype(np.int32)
        out = encode_in_chunks(encode, encoder.params, ids, np.ones_like(ids))["last"]
        np.testing.assert_allclose(out, np.asarray(encoder.apply(encoder.params, ids)["last_hidden_state"]),
                                   rtol=1e-5, atol=1e-5)
    assert encode._cache_size() == 1  # every chunk, the padded last one too, has ENCODE_CHUNK rows
    few = np.zeros((3, 8), np.int32)
    assert encode_in_chunks(encode, encoder.params, few, few)["last"].shape == (3, 8, 32)
    assert encode._cache_size() == 2  # fewer than a chunk: their own shape, unpadded


@pytest.mark.slow
def test_data_and_fsdp_parallel_equal_single_device(encoder_dir, tmp_path):
    # 3 templates x 2 concepts = 6 prompts per step... use 2 templates x 2 concepts = 4, split over data=4
    config = config_for(encoder_dir, concepts=("Van Gogh", "Monet"))
    config.templates = ("{}", "a painting by {}")
    train_and_evaluate(config, tmp_path / "one", mesh=mesh_of(1))
    train_and_evaluate(config, tmp_path / "dp", mesh=mesh_of(8, data=4, fsdp=2))
    assert_close(trained(tmp_path / "one"), trained(tmp_path / "dp"))


@pytest.mark.slow
def test_batch_erasure_equals_solo_and_output_shardings(encoder_dir, tmp_path):
    config = config_for(encoder_dir, CONCEPTS, joint=False)
    mesh = mesh_of(8, concept=4, data=2)
    run = plan_erase(config, mesh)
    assert run.jobs.num_jobs == 5 and run.new_state()["bad_step"].shape == (8,)  # 5 jobs padded to 8
    base_frozen = {k: np.asarray(v) for k, v in run.frozen.items()}
    state = run.new_state()
    for step in range(3):
        state, _ = run.step_fn(state, *run.step_args(run.place_jobs(*run.chunks[0]), step))
    for leaf in jax.tree_util.tree_leaves(state["trainable"]):
        assert leaf.sharding.spec == P("concept") and leaf.sharding.mesh.shape["concept"] == 4
    for k, v in run.frozen.items():  # frozen parameters are bit-identical
        assert np.asarray(v).tobytes() == base_frozen[k].tobytes(), k

    train_and_evaluate(config, tmp_path / "batch", mesh=mesh)
    for name in ("Van Gogh", "Hokusai"):
        train_and_evaluate(config_for(encoder_dir, (name,)), tmp_path / name, mesh=mesh_of(1))
        assert_close(trained(tmp_path / "batch", name), trained(tmp_path / name))
    index = json.loads((tmp_path / "batch" / "index.json").read_text())
    assert sorted(index["concepts"]) == sorted(CONCEPTS)
    run_json = json.loads((tmp_path / "batch" / index["concepts"]["Monet"] / "run.json").read_text())
    assert run_json["concepts"] == ["Monet"] and run_json["anchors"] == {"Monet": "painting"}


@pytest.mark.slow
def test_batched_sharded_resume_on_another_mesh(encoder_dir, tmp_path):
    config = config_for(encoder_dir, CONCEPTS[:3], joint=False)
    train_and_evaluate(config, tmp_path / "full", mesh=mesh_of(8, concept=4, data=2))
    first = train_and_evaluate(config, tmp_path / "resumed", stop_after=4, mesh=mesh_of(8, concept=4, data=2))
    assert first["status"] == "interrupted"
    # saved with 3 jobs padded to 4; resumed on a 3-device concept axis: 3 slots, 4 % 3 != 0
    train_and_evaluate(config, tmp_path / "resumed", mesh=mesh_of(3, concept=3))
    for name in CONCEPTS[:3]:
        a, b = trained(tmp_path / "full", name), trained(tmp_path / "resumed", name)
        assert_close(a, b, tol=1e-6)


@pytest.mark.slow
def test_chunked_batch_equals_one_step_and_resumes_mid_chunk(encoder_dir, tmp_path):
    config = config_for(encoder_dir, CONCEPTS, joint=False)
    train_and_evaluate(config, tmp_path / "all", mesh=mesh_of(8, concept=4, data=2))
    config.train.concepts_per_chunk = 2  # chunks of 2, 2 and 1 (padded) concepts, one compiled step
    first = train_and_evaluate(config, tmp_path / "chunked", stop_after=8 + 6, mesh=mesh_of(2, concept=2))
    assert (first["status"], first["chunk"], first["step"], first["chunks"]) == ("interrupted", 1, 6, 3)
    done = {p.parent.name for p in (tmp_path / "chunked" / "concepts").glob("*/run.json")}
    assert len(done) == 2  # the first chunk's results are written when it ends
    # resumed on a 4-device concept axis: the saved 2-slot chunk is re-padded to 4 slots
    summary = train_and_evaluate(config, tmp_path / "chunked", mesh=mesh_of(8, concept=4, data=2))
    assert summary["status"] == "done" and summary["chunks"] == [[0, 2], [2, 4], [4, 5]]
    for name in CONCEPTS:
        assert_close(trained(tmp_path / "all", name), trained(tmp_path / "chunked", name))
    saved = sorted(int(p.name) for p in (tmp_path / "chunked" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [20, 24]  # global steps (chunk * 8 + step); older chunks' states are not kept
    config.joint = True
    with pytest.raises(ConfigError, match="concepts_per_chunk=2 applies to joint=False runs only"):
        train_and_evaluate(config, tmp_path / "joint")


@pytest.mark.slow
def test_auto_chunk_is_the_largest_that_fits_the_budget(encoder_dir, tmp_path):
    config = config_for(encoder_dir, CONCEPTS, joint=False)
    mesh = mesh_of(2, concept=2)

    def step_bytes(chunk):
        config.train.concepts_per_chunk = chunk
        run = plan_erase(config, mesh)
        return sharding.step_bytes(run.step_fn.lower(run.new_state(), *run.step_args(run.place_jobs(*run.chunks[0]), 0)).compile())
    four, six = step_bytes(4), step_bytes(6)  # 2 and 3 concepts per device
    assert six > four
    config.train.concepts_per_chunk = -1
    config.train.memory_budget_gib = (four + six) / 2 / 2**30
    summary = train_and_evaluate(config, tmp_path / "auto", mesh=mesh)
    assert summary["chunks"] == [[0, 4], [4, 5]]
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["train"]["concepts_per_chunk"] == 4
    config.train.memory_budget_gib = four / 4 / 2**30
    with pytest.raises(ConfigError, match="one concept per device needs .* GiB per device but the memory budget"):
        plan_erase(config, mesh)


@pytest.mark.slow
def test_frozen_untouched_after_full_run(encoder_dir, tmp_path):
    config = config_for(encoder_dir, CONCEPTS[:2], joint=False)
    train_and_evaluate(config, tmp_path / "run", mesh=mesh_of(8, concept=2, data=2, fsdp=2))
    # After a sharded (fsdp=2) batch run, each concept's exported encoder holds the BASE FILE's
    # bytes in every tensor but block 0's (frozen leaves are not in the trained file at all).
    from hirm_jax.artifacts.export import export_full
    base = masking.flatten(load_text_encoder(encoder_dir).params)
    base_file = load_file(str(encoder_dir / "model.safetensors"))
    index = json.loads((tmp_path / "run" / "index.json").read_text())["concepts"]
    for i, name in enumerate(CONCEPTS[:2]):
        keys = set(trained(tmp_path / "run", name))
        assert keys and all(k.startswith("encoder/layers/0/") for k in keys)
        assert keys < set(base)
        exported = load_file(str(export_full(tmp_path / "run" / index[name], tmp_path / f"full{i}")
                                 / "model.safetensors"))
        assert exported.keys() == base_file.keys()
        block0 = {k for k in base_file if ".layers.0." in k}
        for key in set(base_file) - block0:
            assert exported[key].tobytes() == base_file[key].tobytes(), key
        assert any(exported[k].tobytes() != base_file[k].tobytes() for k in block0)


@pytest.mark.parametrize("lines, error, match", [
    ("Van Gogh\tpainting\n\nMonet\tpainting\n", ConfigError, r":2: blank line"),
    ("Van Gogh\tpainting\nMonet\tpainting\nvan gogh\tpainting\n", ConfigError, r":3: 'van gogh' duplicates entry 1"),
    ("Van Gogh\tpainting\nMonet\n", ConfigError, r"\['Monet'\].*:2\) have none"),
    ("Van Gogh\tpainting\n" + "very " * 80 + "long\tpainting\n", PromptTooLongError, r":2: prompt must fit in 77 tokens"),
    ("Van Gogh\tpainting\textra\tcolumn\n", ConfigError, r":1: expected"),
])
def test_concept_list_errors_name_the_line(encoder_dir, tmp_path, lines, error, match):
    path = tmp_path / "concepts.tsv"
    path.write_text(lines)
    config = config_for(encoder_dir, joint=False)
    config.concepts = ()
    config.concepts_file = str(path)
    with pytest.raises(error, match=match):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_mesh_rules():
    cfg = lambda **k: type("M", (), {**dict(concept=1, data=1, fsdp=1), **k})
    assert sharding.mesh_shape(cfg(concept=0, data=-1), 8, num_jobs=5) == dict(concept=4, data=2, fsdp=1)
    assert sharding.mesh_shape(cfg(concept=0, data=-1), 8, num_jobs=1) == dict(concept=1, data=8, fsdp=1)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape(cfg(concept=3, data=-1), 8)
    with pytest.raises(ValueError, match="product of the axis sizes"):
        sharding.mesh_shape(cfg(concept=2, data=2), 8)


@pytest.mark.slow
def test_joint_beats_averaged_deltas_and_batch_summary(encoder_dir, tmp_path):
    from hirm_jax.cli import main
    concepts = CONCEPTS[:3]
    for joint, name in ((True, "joint"), (False, "independent")):
        config = config_for(encoder_dir, concepts, joint=joint)
        config.train.epochs = 20
        config.report.enabled = not joint
        train_and_evaluate(config, tmp_path / name)
    summary = json.loads((tmp_path / "independent" / "text_report_summary.json").read_text())
    assert sorted(summary["concepts"]) == sorted(concepts)
    assert (tmp_path / "independent" / "text_report_summary.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "independent" / "concepts").glob("*/text_report.json"))) == 3
    assert not list((tmp_path / "independent" / "concepts").glob("*/text_report.png"))  # one figure for all
    assert main(["compare", f"--joint={tmp_path / 'joint'}", f"--independent={tmp_path / 'independent'}",
                 f"--out={tmp_path / 'compare'}"]) == 0
    rows = json.loads((tmp_path / "compare" / "compare.json").read_text())["methods"]
    joint, averaged = rows["joint (one encoder)"], rows["average of single-concept deltas"]
    # Averaging dilutes each concept's update: its prompts stay nearer the original.
    assert joint["cos_to_target"] > averaged["cos_to_target"] > averaged["cos_to_target_before"] - 1e-6
    assert (tmp_path / "compare" / "compare.md").is_file()
    assert main(["export", f"--workdir={tmp_path / 'independent'}", f"--out={tmp_path / 'deltas'}"]) == 0
    index = json.loads((tmp_path / "deltas" / "index.json").read_text())["concepts"]
    assert sorted(index) == sorted(concepts)
    for name, folder in index.items():
        config = json.loads((tmp_path / "deltas" / folder / "hirm_config.json").read_text())
        assert config["concepts"] == [name]
