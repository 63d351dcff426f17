"""Tiny models, pipelines and erase workdirs built from configs (no downloads), for any test.

    tokenizer = tiny_tokenizer()                         # a real CLIPTokenizer, 517-entry vocab
    base = tiny_encoder(seed=0)                          # TextEncoder, 2 layers, width 32
    folder = save_encoder_folder(base, tmp / "enc", dtype="float16", layout="flat")
    pipe_dir = save_sd_pipeline(tmp / "sd", folder)      # StableDiffusionPipeline folder
    workdir = fabricate_workdir(tmp / "wd", base, source=folder)

Everything is deterministic in its seed. torch/diffusers are imported inside the helpers
that need them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors.numpy import save_file

from hirm_jax.erase.masking import flatten, unflatten
from hirm_jax.encoder.clip import TextEncoder, TextEncoderConfig
from hirm_jax.encoder.tokenizer import bytes_to_unicode
from hirm_jax.encoder.clip_weights import flax_to_hf

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A few merges so ordinary words are not all single characters.
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "f</w>"), ("i", "n"), ("e", "r</w>"),
           ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("s", "t")]


def _tiny_vocab() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in _MERGES] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


TINY_VOCAB_SIZE = len(_tiny_vocab())  # 2 * 256 + merges + 2
TINY_BOS_ID, TINY_EOS_ID = TINY_VOCAB_SIZE - 2, TINY_VOCAB_SIZE - 1

TINY_CONFIG = TextEncoderConfig(
    vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, bos_token_id=TINY_BOS_ID,
    eos_token_id=TINY_EOS_ID, pad_token_id=TINY_EOS_ID)
TINY_CONFIG_PROJ = TINY_CONFIG.replace(projection_dim=16, hidden_act="gelu")


def tiny_tokenizer(out_dir: Optional[Path] = None, pad_token: str = EOS):
    """A transformers CLIPTokenizer over a tiny BPE vocabulary (ids fit TINY_CONFIG)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=_tiny_vocab(), merges=list(_MERGES), unk_token=EOS, bos_token=BOS,
                        eos_token=EOS, pad_token=pad_token, model_max_length=77)
    if out_dir is not None:
        # transformers 5 writes only tokenizer.json; released SD folders also carry these two.
        tok.save_pretrained(str(out_dir))
        (Path(out_dir) / "vocab.json").write_text(json.dumps(_tiny_vocab(), ensure_ascii=False))
        (Path(out_dir) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
    return tok


def tiny_encoder(seed: int = 0, config: TextEncoderConfig = TINY_CONFIG, fp16_exact: bool = True) -> TextEncoder:
    """Random weights from numpy (no Flax init to compile); with fp16_exact every weight is
    float16-representable (so a float16 copy is the same encoder bit for bit, as SD's fp16
    variants are of their fp32 bases)."""
    rng = np.random.default_rng(seed)
    params = {}
    for path, shape in sorted(flatten(TextEncoder(config, None).param_shapes()).items()):
        value = rng.standard_normal(shape.shape).astype(np.float32)
        if path.endswith("/scale"):
            value = 1.0 + 0.1 * value
        elif path.endswith("/kernel"):
            value = value / np.sqrt(shape.shape[0])
        else:  # biases, embeddings
            value = 0.02 * value if path.endswith("/bias") else 0.5 * value
        params[path] = value.astype(np.float16).astype(np.float32) if fp16_exact else value
    return TextEncoder(config, unflatten(params))


def perturb_block(params, block: int = 0, scale: float = 0.05, seed: int = 1,
                  keep: tuple[str, ...] = ("layer_norm1/bias",)) -> dict[str, np.ndarray]:
    """{flax path: new value} for every leaf of `block`; leaves ending in `keep` stay equal."""
    rng = np.random.default_rng(seed)
    prefix = f"encoder/layers/{block}/"
    out = {}
    for path, value in sorted(flatten(params).items()):
        if path.startswith(prefix):
            value = np.asarray(value, np.float32)
            out[path] = value if path.endswith(keep) else (value + scale * rng.standard_normal(value.shape)).astype(np.float32)
    return out


def save_encoder_folder(encoder: TextEncoder, out_dir: Path, dtype: str = "float32", layout: str = "text_model",
                        params=None) -> Path:
    """A transformers folder as other tools write it: `text_model.*` or flat names, fp32 or fp16."""
    state = flax_to_hf(encoder.params if params is None else params, encoder.config)
    if layout == "flat":
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: np.ascontiguousarray(v, dtype=np.dtype(dtype)) for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf = encoder.config.to_hf_dict()
    hf["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    return out_dir


def fabricate_workdir(workdir: Path, base: TextEncoder, source: Path, component: Optional[str] = None,
                      component_name: str = "text_encoder", seed: int = 1) -> tuple[Path, dict]:
    """A finished erase workdir as the trainer writes it (run.json, erased_trainable.safetensors,
    config.json), with block 0 perturbed except its layer_norm1.bias. Returns (workdir, trained)."""
    trained = perturb_block(base.params, seed=seed)
    workdir.mkdir(parents=True, exist_ok=True)
    save_file(trained, str(workdir / "erased_trainable.safetensors"), metadata={"format": "flax"})
    run = dict(
        base=dict(source=str(source), component=component), component_name=component_name,
        encoder_config=dataclasses.asdict(base.config), concepts=["Van Gogh"], anchors={"Van Gogh": "painting"},
        concept_type="style", prompts=[dict(prompt="Van Gogh", anchor_prompt="painting", concept="Van Gogh")],
        objective=dict(name="hirm_s", scale=1.0, hooks=["last_mlp_out"], token_positions="all_but_bos"),
        train=dict(learning_rate=5e-5, epochs=30, batch_size=0), method="hirm", seed=0, steps=30,
        final_loss=0.125, trainable_paths=sorted(trained), hirm_jax_version="0.1.0", git_hash=None)
    (workdir / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True))
    (workdir / "config.json").write_text(json.dumps({"objective": run["objective"]}, indent=2))
    return workdir, trained


def tiny_sd_components(text_encoder, tokenizer) -> dict:
    """StableDiffusionPipeline components around a given torch text encoder (hidden size 32)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
                safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def tiny_sd_pipeline(encoder_folder: Path, torch_dtype=None):
    """An in-memory StableDiffusionPipeline whose text encoder is loaded from `encoder_folder`."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(str(encoder_folder), torch_dtype=torch_dtype)
    pipe = StableDiffusionPipeline(**tiny_sd_components(text_encoder, tiny_tokenizer()))
    return pipe if torch_dtype is None else pipe.to(torch_dtype)


def save_sd_pipeline(out_dir: Path, encoder_folder: Path, torch_dtype=None) -> Path:
    """A saved StableDiffusionPipeline folder (diffusers writes text_encoder with flat names)."""
    tiny_sd_pipeline(encoder_folder, torch_dtype).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


# ---------------------------------------------------------------- SDXL and Flux (tests/test_generate.py)

def tiny_t5_tokenizer():
    """A T5 tokenizer built offline: a tiny Unigram model trained on a few sentences (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    corpus = ["a photo of a cat", "a painting of a dog in the style of van gogh", "an image of a tree by the sea",
              "the quick brown fox jumps over the lazy dog", "a castle on a hill at night"]
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"],
                                                            unk_token="<unk>"))
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    return T5Tokenizer(vocab=[(piece, score) for piece, score in vocab], extra_ids=100)


def tiny_sdxl_pipeline(encoder_1: Path, encoder_2: Path):
    """An in-memory StableDiffusionXLPipeline: text_encoder = CLIPTextModel from `encoder_1` (hidden 32),
    text_encoder_2 = CLIPTextModelWithProjection from `encoder_2` (hidden 32, projection 16)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text_encoder = CLIPTextModel.from_pretrained(str(encoder_1))
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(str(encoder_2))
    torch.manual_seed(0)
    time_embed_dim = 8  # SDXL's added condition: 6 time ids * 8 + pooled projection
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        attention_head_dim=8, norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(pad_token="!"), unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True)


def tiny_flux_pipeline(encoder_folder: Path):
    """An in-memory FluxPipeline: CLIP-L slot = CLIPTextModel from `encoder_folder` (hidden 32; Flux uses its
    pooled output), a tiny T5 encoder and tokenizer, a tiny FluxTransformer2DModel and VAE."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(str(encoder_folder))
    tokenizer_2 = tiny_t5_tokenizer()
    t5 = tiny_t5(tokenizer_2)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=text_encoder.config.hidden_size, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=tiny_tokenizer(), text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)


def tiny_t5(tokenizer, d_model: int = 32, seed: int = 0):
    """A one-block random T5EncoderModel over `tokenizer`'s vocabulary."""
    import torch
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=4, relative_attention_num_buckets=8)).eval()


def tiny_sd3_pipeline(encoder_1: Path, encoder_2: Path):
    """An in-memory StableDiffusion3Pipeline: two CLIPTextModelWithProjection (hidden 32, projection
    16) from the folders, a tiny T5 (d_model 64: SD3 pads the two CLIPs' 64 features to T5's width),
    a tiny SD3Transformer2DModel and VAE."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    text_encoder = CLIPTextModelWithProjection.from_pretrained(str(encoder_1))
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(str(encoder_2))
    tokenizer_3 = tiny_t5_tokenizer()
    t5 = tiny_t5(tokenizer_3, d_model=64)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, out_channels=4, pos_embed_max_size=16,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
                                    text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(pad_token="!"),
                                    text_encoder_3=t5, tokenizer_3=tokenizer_3)
