"""Images without PyTorch: the Flax UNet2DConditionModel and DDIM against diffusers, weights read
from diffusers folders both ways, and the world's pictures through the JAX path."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.numpy import load_file

from hirm_jax.encoder.files import WeightsError
from hirm_jax.pipelines import schedulers
from hirm_jax.pipelines.diffusers_weights import load_unet, save_unet
from hirm_jax.pipelines.unet import UNetConfigError

SD1 = dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24,
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
           attention_head_dim=4, norm_num_groups=8)
FAMILIES = {
    "sd1": SD1,
    "sd2": dict(SD1, block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=(2, 4, 4),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(SD1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=(2, 4),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 12),
}


def random_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # diffusers zero-initialises some output layers: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(family: str):
    torch.manual_seed(1)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 7, 24)
    added = {"text_embeds": torch.randn(2, 12), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    return x, t, context, added if family == "sdxl" else None


def jnp_tree(x):
    return None if x is None else jax.tree_util.tree_map(lambda v: jnp.asarray(v.numpy()), x)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_flax_unet_equals_diffusers_in_float32_and_bf16_stays_close(family, tmp_path):
    model = random_unet(FAMILIES[family])
    model.save_pretrained(str(tmp_path / "unet"))
    x, t, context, added = inputs(family)
    with torch.no_grad():
        expected = model(x, t, context, added_cond_kwargs=added).sample.numpy()
    unet = load_unet(tmp_path / "unet")
    got = np.asarray(unet.apply(*(jnp.asarray(v.numpy()) for v in (x, t, context)), jnp_tree(added)))
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale
    bf16 = load_unet(tmp_path / "unet", dtype="bfloat16")
    low = np.asarray(bf16.apply(*(jnp.asarray(v.numpy()) for v in (x, t, context)), jnp_tree(added)))
    assert 0 < np.abs(low - expected).max() <= 0.05 * scale


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
def test_half_storage_and_sharded_folders_load_and_save_back_bit_for_bit(storage, tmp_path):
    model = random_unet(FAMILIES["sd1"]).to(storage)
    model.save_pretrained(str(tmp_path / "single"))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[storage]
    single, sharded = load_unet(tmp_path / "single"), load_unet(tmp_path / "sharded")
    for a, b in zip(jax.tree_util.tree_leaves(single.params), jax.tree_util.tree_leaves(sharded.params)):
        assert a.dtype == jnp.float32 and np.array_equal(np.asarray(a), np.asarray(b))
    save_unet(single, tmp_path / "back", dtype=name)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "single" / "diffusion_pytorch_model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert a.get_tensor(key).dtype == storage
            assert torch.equal(a.get_tensor(key).view(torch.int16), b.get_tensor(key).view(torch.int16)), key
    reloaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "back"))  # diffusers reads what we write
    assert list(reloaded.config.block_out_channels) == list(model.config.block_out_channels)


def test_a_folder_that_does_not_match_its_config_is_an_error_naming_the_keys(tmp_path):
    random_unet(FAMILIES["sd1"]).save_pretrained(str(tmp_path / "unet"))
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    from safetensors.numpy import save_file
    broken = dict(state)
    del broken["conv_in.weight"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    save_file(broken, str(weights))
    with pytest.raises(WeightsError, match=r"missing \['conv_in.weight'\], unexpected \['extra.weight'\]"):
        load_unet(tmp_path / "unet")
    save_file({**state, "conv_in.weight": state["conv_in.weight"][:, :2]}, str(weights))
    with pytest.raises(WeightsError, match=r"conv_in.weight has shape \(16, 2, 3, 3\), the config asks for "
                                           r"\(16, 4, 3, 3\)"):
        load_unet(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(UNetConfigError, match="class_embed_type='timestep' is not supported"):
        load_unet(tmp_path / "unet")
    weights.rename(tmp_path / "unet" / "diffusion_pytorch_model.bin")
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="is a pickle"):  # never unpickled
        load_unet(tmp_path / "unet")


@pytest.mark.parametrize("overrides", [
    {},  # the world's: v-prediction, squaredcos_cap_v2, trailing
    {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": True},
    {"timestep_spacing": "linspace", "prediction_type": "epsilon", "beta_schedule": "scaled_linear",
     "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": True},
    {"prediction_type": "sample", "beta_schedule": "linear", "timestep_spacing": "leading"}])
@pytest.mark.parametrize("steps", [10, 7])
def test_ddim_equals_diffusers_step_for_step(overrides, steps):
    from hirm_jax import world as w
    config = {**json.loads((w.SHIPPED / "scheduler" / "scheduler_config.json").read_text()), **overrides}
    reference = DDIMScheduler.from_config(config)
    reference.set_timesteps(steps)
    ours = schedulers.ddim_from_config(config, steps)
    assert list(reference.timesteps.numpy()) == list(ours.timesteps)
    torch.manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for i, t in enumerate(reference.timesteps):
        expected = reference.step(output, t, sample).prev_sample.numpy()
        got = np.asarray(ours.step(i, jnp.asarray(output.numpy()), jnp.asarray(sample.numpy())))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    {},  # the world's schedule: sigma 2e4 at the first step
    {"timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon", "beta_schedule": "scaled_linear",
     "beta_start": 0.00085, "beta_end": 0.012},  # SD 1.x's
    {"timestep_spacing": None, "prediction_type": "epsilon"}])  # Euler's own default spacing (linspace)
@pytest.mark.parametrize("steps", [10, 7])
def test_euler_equals_diffusers_step_for_step(overrides, steps):
    from diffusers import EulerDiscreteScheduler

    from hirm_jax import world as w
    config = {**json.loads((w.SHIPPED / "scheduler" / "scheduler_config.json").read_text()), **overrides}
    config = {k: v for k, v in config.items() if v is not None}
    reference = EulerDiscreteScheduler.from_config(config)
    reference.set_timesteps(steps)
    ours = schedulers.from_name("euler", config, steps)
    np.testing.assert_array_equal(reference.timesteps.numpy(), ours.timesteps)
    np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=1e-6)
    assert ours.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)
    torch.manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8) * reference.init_noise_sigma, torch.randn(2, 4, 8, 8)
    ulp = 1e-6 * float(sample.abs().max())  # the first step of a large sigma is float32 cancellation
    for i, t in enumerate(reference.timesteps):
        np.testing.assert_allclose(np.asarray(ours.scale(i, jnp.asarray(sample.numpy()))),
                                   reference.scale_model_input(sample, t).numpy(), rtol=1e-5, atol=1e-6)
        expected = reference.step(output, t, sample).prev_sample.numpy()
        got = np.asarray(ours.step(i, jnp.asarray(output.numpy()), jnp.asarray(sample.numpy())))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=max(1e-5, ulp))


@pytest.mark.parametrize("overrides", [
    {},  # SD 1.x's: leading, steps_offset 1, scaled_linear
    {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "set_alpha_to_one": True},
    {"timestep_spacing": "linspace", "beta_schedule": "linear"}])
@pytest.mark.parametrize("steps", [10, 3])
def test_pndm_equals_diffusers_step_for_step_with_its_history(overrides, steps):
    from diffusers import PNDMScheduler
    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": True,
              "steps_offset": 1, "set_alpha_to_one": False, **overrides}
    reference = PNDMScheduler.from_config(config)
    reference.set_timesteps(steps)
    ours = schedulers.from_name("pndm", config, steps)
    np.testing.assert_array_equal(reference.timesteps.numpy(), ours.timesteps)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8)
    state, x = ours.init(jnp.asarray(sample.numpy())), jnp.asarray(sample.numpy())
    for i, t in enumerate(reference.timesteps):  # a different model output at every step, as a model gives
        output = torch.randn(2, 4, 8, 8)
        sample = reference.step(output, t, sample).prev_sample
        x, state = ours.step_with(i, jnp.asarray(output.numpy()), x, state)
        np.testing.assert_allclose(np.asarray(x), sample.numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_scheduler_settings_are_errors_naming_them():
    with pytest.raises(schedulers.SchedulerError, match="timestep_spacing must be one of"):
        schedulers.ddim_from_config({"timestep_spacing": "karras"}, 10)
    with pytest.raises(schedulers.SchedulerError, match="thresholding=True is not implemented"):
        schedulers.ddim_from_config({"thresholding": True}, 10)
    with pytest.raises(schedulers.SchedulerError, match=r"steps must be in \[1, 1000\]"):
        schedulers.ddim_from_config({}, 0)
    with pytest.raises(schedulers.SchedulerError, match="use_karras_sigmas=True is not implemented for euler"):
        schedulers.from_name("euler", {"use_karras_sigmas": True}, 10)
    with pytest.raises(schedulers.SchedulerError, match="scheduler must be one of \\['ddim', 'euler', 'pndm'\\] in JAX"):
        schedulers.from_name("lms", {}, 10)
    with pytest.raises(schedulers.SchedulerError, match="skip_prk_steps=False"):
        schedulers.from_name("pndm", {}, 10)


@pytest.mark.slow
def test_the_worlds_pictures_through_jax_equal_the_torch_ones_given_the_same_noise():
    """The world's UNet and sampler in JAX, fed the noise the torch path draws for each seed:
    the same pictures within 1/255 (CPU kernels differ in the last bits), split over the 8
    fake devices or on one."""
    from hirm_jax import world as w
    from hirm_jax.world.sample_jax import generate_jax
    world = w.load_world()
    unet = UNet2DConditionModel.from_pretrained(str(world.path / "unet")).eval()
    x, t, context = torch.randn(2, 12, 16, 16), torch.tensor([999, 3]), torch.randn(2, 77, 128)
    with torch.no_grad():
        expected = unet(x, t, context).sample.numpy()
    got = np.asarray(load_unet(world.path / "unet").apply(*(jnp.asarray(v.numpy()) for v in (x, t, context))))
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()

    prompts, seeds = ["a striped heart", "a dotted star", "an outline circle", ""] * 2, list(range(8))
    latents = np.stack([torch.randn((12, 16, 16), generator=torch.Generator().manual_seed(s)).numpy() for s in seeds])
    reference = w.generate(world, None, prompts, seeds)
    ours = generate_jax(world, None, prompts, seeds, latents=latents)
    assert ours.shape == reference.shape == (8, 32, 32, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
    one_device = generate_jax(world, None, prompts, seeds, latents=latents, batch_size=1)
    assert np.abs(one_device.astype(int) - ours.astype(int)).max() <= 1
    drawn = w.generate(world, None, prompts[:2], seeds[:2], backend="jax")  # noise from jax.random
    assert drawn.shape == (2, 32, 32, 3) and not np.array_equal(drawn, reference[:2])


@pytest.mark.parametrize("config", [
    dict(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, layers_per_block=1,
         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),  # SD
    dict(block_out_channels=(4,), latent_channels=1, norm_num_groups=1, layers_per_block=1, use_quant_conv=False,
         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))])  # Flux: shift, no quant convs
def test_the_flax_vae_decodes_as_diffusers_with_its_scaling_and_shift(config, tmp_path):
    from diffusers import AutoencoderKL

    from hirm_jax.pipelines.diffusers_weights import load_vae
    from hirm_jax.pipelines.vae import to_uint8
    torch.manual_seed(0)
    model = AutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(tmp_path / "vae"))
    latents = torch.randn(2, config["latent_channels"], 8, 8)
    with torch.no_grad():  # what a diffusers pipeline does with its final latents
        expected = model.decode(latents / model.config.scaling_factor + (model.config.shift_factor or 0)).sample
    got = np.asarray(load_vae(tmp_path / "vae").decode(jnp.asarray(latents.numpy())))
    assert np.abs(got - expected.numpy()).max() <= 1e-4 * np.abs(expected.numpy()).max()
    from diffusers.image_processor import VaeImageProcessor
    pil = VaeImageProcessor().postprocess(expected, output_type="np")
    assert np.abs(to_uint8(got).astype(int) - np.round(pil * 255).astype(int)).max() <= 1
