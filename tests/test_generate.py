"""`hirm-jax generate`: deltas in memory == exported pipeline folders (SD 1.x, SDXL, Flux), zero delta ==
original, seeds independent of batching and process count, manifest and resume, clear errors.

Tiny pipelines built from configs (tests/fixtures_pipelines.py), 32x32, 2 steps.
"""

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.fixtures_pipelines import (TINY_CONFIG_PROJ, fabricate_workdir, save_encoder_folder, save_sd_pipeline,
                                tiny_encoder, tiny_flux_pipeline, tiny_sdxl_pipeline)
from hirm_jax.artifacts import export
from hirm_jax.pipelines import generate as gen
from hirm_jax.artifacts.delta import DELTA_CONFIG, DELTA_WEIGHTS, DeltaError, FingerprintError, fingerprint

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a cat", "a dog by the sea"]
SETTINGS = gen.Settings(steps=2, guidance=5.0, height=32, width=32, dtype="float32", scheduler=None,
                        images_per_prompt=1, seed=0)


def zero_delta(workdir: Path, delta_dir: Path, out_dir: Path) -> Path:
    """The delta's format with every tensor equal to the base it replaces (a no-op erasure)."""
    before = {f"{c}.{k}": b for c in [json.loads((delta_dir / DELTA_CONFIG).read_text())["component_name"]]
              for k, (b, _) in export.changed_tensors(export.load_run(workdir)).items()}
    config = json.loads((delta_dir / DELTA_CONFIG).read_text())
    out_dir.mkdir(parents=True)
    save_file(before, str(out_dir / DELTA_WEIGHTS), metadata={"format": "pt"})
    for key, value in before.items():
        config["tensors"][key]["delta_sha256"] = fingerprint(value)
    config["delta_file_sha256"] = hashlib.sha256((out_dir / DELTA_WEIGHTS).read_bytes()).hexdigest()
    (out_dir / DELTA_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def _family(tmp: Path, name: str) -> types.SimpleNamespace:
    """A saved pipeline, its deltas (one per CLIP encoder), the exported pipeline and zero deltas."""
    base = tiny_encoder(seed=0)
    enc = save_encoder_folder(base, tmp / "enc")
    pipe_dir = tmp / "pipeline"
    encoders = [("text_encoder", base)]
    if name == "sd":
        save_sd_pipeline(pipe_dir, enc)
    elif name == "sdxl":
        base_2 = tiny_encoder(seed=3, config=TINY_CONFIG_PROJ)
        tiny_sdxl_pipeline(enc, save_encoder_folder(base_2, tmp / "enc2")).save_pretrained(str(pipe_dir))
        encoders.append(("text_encoder_2", base_2))
    else:
        tiny_flux_pipeline(enc).save_pretrained(str(pipe_dir))
    deltas, zeros, current = [], [], pipe_dir
    for i, (component, encoder) in enumerate(encoders):
        workdir, _ = fabricate_workdir(tmp / f"work_{component}", encoder, source=pipe_dir, component=component,
                                       component_name=component, seed=10 + i)
        deltas.append(export.export_delta(workdir, tmp / f"delta_{component}"))
        zeros.append(zero_delta(workdir, deltas[-1], tmp / f"zero_{component}"))
        current = export.apply_delta(deltas[-1], current, tmp / f"exported_{i}")
    return types.SimpleNamespace(pipeline=pipe_dir, deltas=deltas, zeros=zeros, exported=current)


def _images(pipe_dir, deltas=()) -> np.ndarray:
    pipe = gen.load_pipeline(pipe_dir, deltas, dtype="float32", device="cpu")
    jobs = gen.plan_jobs([gen.PromptRow(str(i), p) for i, p in enumerate(PROMPTS)], SETTINGS)
    return np.stack([np.asarray(image) for _, image in gen.run_jobs(pipe, jobs, SETTINGS, batch_size=2)])


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
@pytest.mark.slow
def test_delta_in_memory_equals_exported_pipeline_and_zero_delta_equals_original(family, tmp_path):
    world = _family(tmp_path, family)
    original = _images(world.pipeline)
    erased = _images(world.pipeline, world.deltas)
    assert erased.shape == (2, 32, 32, 3)
    assert not np.array_equal(erased, original), "the delta must change the images"
    np.testing.assert_array_equal(erased, _images(world.exported))
    np.testing.assert_array_equal(_images(world.pipeline, world.zeros), original)
    if family == "flux":  # Flux's text_encoder_2 is T5: a CLIP text_encoder_2 delta (SDXL's) does not go there
        base_2 = tiny_encoder(seed=3, config=TINY_CONFIG_PROJ)
        workdir, _ = fabricate_workdir(tmp_path / "work_sdxl_2", base_2, component_name="text_encoder_2",
                                       source=save_encoder_folder(base_2, tmp_path / "enc_sdxl_2"))
        with pytest.raises(DeltaError, match="patches text_encoder_2, which in this FluxPipeline is a T5EncoderModel"):
            gen.load_pipeline(world.pipeline, [export.export_delta(workdir, tmp_path / "d2")], device="cpu")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate_sd")
    world = _family(tmp, "sd")
    prompts = tmp / "prompts.csv"
    prompts.write_text("id,prompt,seed\ncat,a photo of a cat,7\ndog,a dog by the sea,\nvg,a painting of a tree,\n")
    world.prompts = prompts
    return world


def _run_cli(args, processes=1, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    env.update(env_extra or {})
    if processes == 1:
        command = [sys.executable, "-m", "hirm_jax.cli", "generate", *args]
    else:
        # --multi_gpu selects accelerate's torchrun launcher; without a GPU each process runs on CPU with gloo.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}",
                   "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=29517",
                   "-m", "hirm_jax.generate", *args]  # the 0.1 module path (hirm_jax._compat runs the command)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_two_processes_write_the_same_images_and_manifest_as_one(sd, tmp_path):
    common = [f"--pipeline={sd.pipeline}", f"--delta={sd.deltas[0]}", f"--prompts={sd.prompts}", "--steps=2",
              "--height=32", "--width=32", "--images-per-prompt=2", "--seed=3"]
    one = _run_cli([*common, f"--out={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run_cli([*common, f"--out={tmp_path / 'two'}"], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[generate 1/2]" in two.stderr and "[generate 0/2]" in two.stderr
    assert two.stdout.split() == [str(tmp_path / "two")]  # process 0 alone reports
    manifest = (tmp_path / "one" / gen.MANIFEST).read_text()
    assert manifest == (tmp_path / "two" / gen.MANIFEST).read_text()
    records = [json.loads(line) for line in manifest.splitlines()]
    assert len(records) == 6
    assert {r["seed"] for r in records if r["id"] == "cat" and r["sample"] == 0} == {7}  # the file's seed
    assert records[1]["seed"] == gen.derive_seed(3, "cat", 1)
    assert all(r["delta_fingerprints"] == [json.loads((sd.deltas[0] / DELTA_CONFIG).read_text())["delta_file_sha256"]]
               for r in records)
    for r in records:
        assert (tmp_path / "one" / r["file"]).read_bytes() == (tmp_path / "two" / r["file"]).read_bytes(), r["file"]


def test_resume_skips_existing_images_and_refuses_other_settings(sd, tmp_path):
    rows = gen.read_prompts(sd.prompts)
    kwargs = dict(steps=2, height=32, width=32, dtype="float32")
    out = gen.generate(sd.pipeline, rows[:2], tmp_path / "out", **kwargs)
    first = {p.name: p.stat().st_mtime_ns for p in (out / gen.IMAGES).iterdir()}
    gen.generate(sd.pipeline, rows, out, **kwargs)  # one more prompt: only its image is made
    after = {p.name: p.stat().st_mtime_ns for p in (out / gen.IMAGES).iterdir()}
    assert len(after) == 3 and all(after[name] == first[name] for name in first)
    assert len(gen.read_manifest(out)) == 3
    with pytest.raises(gen.GenerationError, match="other settings .*settings"):
        gen.generate(sd.pipeline, rows, out, **{**kwargs, "steps": 3})


@pytest.mark.slow
def test_bad_inputs_give_clear_errors(sd, tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("id,text_prompt\n1,a cat\n")
    with pytest.raises(gen.GenerationError, match=r"must have a prompt column .* columns are \['id', 'text_prompt'\]"):
        gen.read_prompts(bad_csv)
    with pytest.raises(gen.GenerationError, match="must have a seed column 'sd_seed'"):
        gen.read_prompts(sd.prompts, seed_column="sd_seed")
    # A delta made for another base: every mismatching tensor is named, nothing changes.
    other = tiny_encoder(seed=42)
    workdir, _ = fabricate_workdir(tmp_path / "other", other, source=save_encoder_folder(other, tmp_path / "other_enc"))
    foreign = export.export_delta(workdir, tmp_path / "foreign_delta")
    with pytest.raises(FingerprintError, match="(?s)does not fit this pipeline.*text_encoder.text_model.encoder.layers.0"):
        gen.load_pipeline(sd.pipeline, [foreign], dtype="float32", device="cpu")
    with pytest.raises(DeltaError, match="both patch text_encoder"):
        gen.load_pipeline(sd.pipeline, [sd.deltas[0], sd.zeros[0]], dtype="float32", device="cpu")
    with pytest.raises(gen.GenerationError, match="height must be divisible by 16 but is 30"):
        gen.generate(sd.pipeline, gen.read_prompts(sd.prompts), tmp_path / "o", height=30)
    result = _run_cli([f"--pipeline={sd.pipeline}", f"--delta={foreign}", f"--prompts={sd.prompts}",
                       f"--out={tmp_path / 'cli'}", "--steps=1", "--height=32", "--width=32"])
    assert result.returncode == 2 and "error: the delta does not fit" in result.stderr


def test_denoiser_weights_are_loaded_and_checked(sd, tmp_path):
    import torch
    pipe = gen.load_pipeline(sd.pipeline, dtype="float32", device="cpu")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # what UCE edits
    edited = pipe.unet.state_dict()[name] * 0.5
    from safetensors.torch import save_file as save_torch
    save_torch({f"unet.{name}": edited.contiguous()}, str(tmp_path / "uce.safetensors"))
    loaded = gen.load_pipeline(sd.pipeline, dtype="float32", device="cpu", denoiser=str(tmp_path / "uce.safetensors"))
    assert torch.equal(loaded.unet.state_dict()[name], edited)
    save_torch({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(tmp_path / "ldm.safetensors"))
    with pytest.raises(gen.GenerationError, match="not parameters of the pipeline's unet"):
        gen.load_pipeline(sd.pipeline, dtype="float32", device="cpu", denoiser=str(tmp_path / "ldm.safetensors"))


def test_seeds_do_not_depend_on_batch_size(sd):
    rows = gen.read_prompts(sd.prompts)[:2]
    settings = SETTINGS.__class__(**{**SETTINGS.__dict__, "images_per_prompt": 2})
    jobs = gen.plan_jobs(rows, settings)
    assert [j.seed for j in jobs][:2] == [7, gen.derive_seed(0, "cat", 1)]
    pipe = gen.load_pipeline(sd.pipeline, sd.deltas, dtype="float32", device="cpu")
    one = [np.asarray(im, np.float32) for _, im in gen.run_jobs(pipe, jobs, settings, batch_size=1)]
    many = [np.asarray(im, np.float32) for _, im in gen.run_jobs(pipe, jobs, settings, batch_size=4)]
    # Same noise per image; batched convolutions may differ in the last bit on some CPUs.
    assert max(np.abs(a - b).max() for a, b in zip(one, many)) <= 1.0


def test_attack_files_generate_from_their_token_ids(sd, tmp_path):
    # attacks.jsonl rows carry the prompt's text AND ids; the ids are what the attack found (a
    # decoded prompt can re-tokenize differently), so generation must take them.
    pipe = gen.load_pipeline(sd.pipeline, sd.deltas, dtype="float32", device="cpu")
    ids = lambda text: pipe.tokenizer(text, padding="max_length", max_length=77)["input_ids"]
    rows = [dict(text="a photo of a cat", ids=ids("a photo of a cat"), seed=3),   # ids == its text
            dict(text="a photo of a cat", ids=ids("a dog by the sea"), seed=3)]   # ids != its text
    (tmp_path / "attacks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_ids = gen.read_prompts(tmp_path / "attacks.jsonl")
    texts = [gen.PromptRow("t0", "a photo of a cat", (3,)), gen.PromptRow("t1", "a dog by the sea", (3,))]
    image = lambda rows: [np.asarray(im, np.float32) for _, im in gen.run_jobs(pipe, gen.plan_jobs(rows, SETTINGS),
                                                                                SETTINGS, batch_size=2)]
    by_ids, by_text = image(from_ids), image(texts)
    assert np.abs(by_ids[0] - by_text[0]).max() <= 1.0 and np.abs(by_ids[1] - by_text[1]).max() <= 1.0
    assert np.abs(by_ids[1] - by_text[0]).max() > 10  # the ids, not the text, made the second image
    bad = [gen.PromptRow("x", "a cat", (3,), meta={"ids": [1, 2, 3]})]
    with pytest.raises(gen.GenerationError, match="row 'x': ids must be 77 token ids"):
        image(bad)


@pytest.mark.slow
def test_the_jax_backend_draws_what_diffusers_draws_from_the_same_latents(sd, tmp_path, capsys):
    """`--backend jax` (Flax CLIP with the delta applied in memory, Flax UNet and VAE, DDIM in one
    lax.scan) against the torch pipeline, both given the same --latents: the same images within
    2/255; without --latents the JAX noise is its own stream; what it does not serve is refused."""
    from PIL import Image
    rows = gen.read_prompts(sd.prompts)
    latents = np.random.default_rng(0).standard_normal((len(rows), 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    common = [f"--pipeline={sd.pipeline}", f"--delta={sd.deltas[0]}", f"--prompts={sd.prompts}", "--steps=3",
              "--height=16", "--width=16", f"--latents={tmp_path / 'latents.npy'}"]
    from hirm_jax import cli
    # SD 1.x ships PNDM with skip_prk_steps: a copy of the pipeline with that scheduler, used as the
    # folder's own (no --scheduler) by both backends
    import shutil
    plms = shutil.copytree(sd.pipeline, tmp_path / "pipeline_pndm")
    config = json.loads((plms / "scheduler" / "scheduler_config.json").read_text())
    config.update(_class_name="PNDMScheduler", skip_prk_steps=True)
    (plms / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((plms / "model_index.json").read_text())
    (plms / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    for scheduler in ("ddim", "euler", None):
        args = [*common, f"--scheduler={scheduler}"] if scheduler else [f"--pipeline={plms}", *common[1:]]
        scheduler = scheduler or "pndm"
        assert cli.main(["generate", *args, "--backend=torch", f"--out={tmp_path / ('torch_' + scheduler)}"]) == 0
        assert cli.main(["generate", *args, "--backend=jax", "--batch-size=2",
                         f"--out={tmp_path / ('jax_' + scheduler)}"]) == 0
        records = gen.read_manifest(tmp_path / f"jax_{scheduler}")
        assert [r["backend"] for r in records] == ["jax"] * len(rows)
        for record in records:
            a = np.asarray(Image.open(tmp_path / f"torch_{scheduler}" / record["file"])).astype(int)
            b = np.asarray(Image.open(tmp_path / f"jax_{scheduler}" / record["file"])).astype(int)
            assert a.shape == b.shape == (16, 16, 3) and np.abs(a - b).max() <= 2, (scheduler, record["id"])
    capsys.readouterr()
    assert cli.main(["generate", *common[:-1], "--scheduler=euler", "--backend=jax",
                     f"--out={tmp_path / 'own_noise'}"]) == 0
    own = np.asarray(Image.open(tmp_path / "own_noise" / records[0]["file"])).astype(int)
    assert not np.array_equal(own, np.asarray(Image.open(tmp_path / "jax_euler" / records[0]["file"])).astype(int))

    capsys.readouterr()
    assert cli.main(["generate", *common, "--scheduler=lms", "--backend=jax", f"--out={tmp_path / 'lms'}"]) != 0
    assert "--backend jax implements the schedulers ['ddim', 'euler', 'pndm'] so far" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", latents[:1])
    assert cli.main(["generate", *common[:-1], f"--latents={tmp_path / 'short.npy'}", "--scheduler=ddim",
                     "--backend=jax", f"--out={tmp_path / 'short'}"]) != 0
    assert f"must be a float array [images={len(rows)}, C, h, w]" in capsys.readouterr().err
    assert not (tmp_path / "short").exists() and not (tmp_path / "lms").exists()
