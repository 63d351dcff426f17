"""The exported encoder drops into a real diffusers pipeline; the tokenizer pads as SD does.

A tiny StableDiffusionPipeline is built from configs (tiny UNet and VAE, a tiny CLIPTextModel
over the real 49408-token CLIP vocabulary, the tokenizer built from open_clip's BPE file) and
saved. Replacing its text_encoder folder with hirm_jax's export must give the same image.
"""

import shutil

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from hirm_jax.encoder.layouts import load_text_encoder, save_text_encoder
from hirm_jax.encoder.tokenizer import PromptTooLongError, build_clip_tokenizer, encode_prompts

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("pad_token,pad_id", [("<|endoftext|>", 49407), ("!", 0)], ids=["sd", "sdxl_tokenizer_2"])
def test_tokenizer_pads_like_stable_diffusion(pad_token, pad_id, tmp_path):
    tokenizer = build_clip_tokenizer(tmp_path / "tokenizer", pad_token=pad_token)
    batch = encode_prompts(tokenizer, ["a photo of a cat"])
    assert batch["input_ids"].shape == (1, 77) and batch["input_ids"].dtype == np.int32
    assert batch["input_ids"][0].tolist() == CAT + [pad_id] * 70
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0] * 70
    # The saved folder keeps model_max_length=77, so diffusers (which pads to it) gets 77 tokens.
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert reloaded.model_max_length == 77
    assert reloaded("a photo of a cat", padding="max_length").input_ids == CAT + [pad_id] * 70


def test_over_long_prompt_is_refused_with_its_token_count():
    tokenizer = build_clip_tokenizer()
    fits = "cat " * 75  # 75 words + BOS + EOS = 77 tokens
    assert encode_prompts(tokenizer, [fits])["input_ids"].shape == (1, 77)
    with pytest.raises(PromptTooLongError, match=r"must fit in 77 tokens .* but has 78: 'dog cat"):
        encode_prompts(tokenizer, ["a photo of a cat", "dog " + fits])


def tiny_pipeline(folder):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, attention_head_dim=2)
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    # SD 1.x's released config: legacy eos_token_id 2 (pool at argmax of ids).
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)


def generate(folder) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.slow
def test_exported_text_encoder_replaces_the_pipeline_component(tmp_path):
    folder = tmp_path / "pipeline"
    tiny_pipeline(folder)
    original = generate(folder)

    encoder = load_text_encoder(folder, component="text_encoder")
    exported = save_text_encoder(encoder, tmp_path / "exported_text_encoder")
    shutil.rmtree(folder / "text_encoder")
    shutil.copytree(exported, folder / "text_encoder")

    replaced = generate(folder)
    assert original.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(replaced, original)
