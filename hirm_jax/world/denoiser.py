"""The world's denoiser: a small diffusers UNet2DConditionModel over 2x2 space-to-depth patches.

A 32x32x3 picture is seen as 16x16x12 (pixel_unshuffle), which is 4x cheaper on a CPU than
pixels and still lets the UNet draw 1-pixel detail. It is conditioned like SD 1.x: cross-
attention over the text encoder's full 77-token `last_hidden_state` (prompts padded with
<|endoftext|>), classifier-free guidance from 10% empty-prompt training. DDPM training with
v-prediction (epsilon-prediction failed in the prototype), DDIM sampling with few steps.

    unet = build_unet()                                   # random weights; the world ships trained ones
    cond = embed_prompts(tokenizer, "world/text_encoder", ["a striped heart", ""])
    images = sample_images(unet, sample_scheduler(), cond[:1], cond[1], seeds=[0], steps=15, guidance=3.0)
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from hirm_jax import log
from hirm_jax.encoder.tokenizer import prompt_ids

_log = log.get(__name__)

PATCH = 2
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=3 * PATCH * PATCH,
    out_channels=3 * PATCH * PATCH,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 96),
    layers_per_block=1,
    cross_attention_dim=128,
    attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
    norm_num_groups=8,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                        prediction_type="v_prediction", clip_sample=False)


def load_text_encoder_torch(text_encoder):
    """A transformers CLIPTextModel from a folder, or the module itself (put in eval mode) if given."""
    if isinstance(text_encoder, torch.nn.Module):
        return text_encoder.eval()
    from transformers import CLIPTextModel
    return CLIPTextModel.from_pretrained(str(text_encoder)).eval()


@torch.no_grad()
def embed_prompts(tokenizer, text_encoder, prompts, batch_size: int = 256) -> torch.Tensor:
    """SD 1.x conditioning: [N, 77, D] last_hidden_state, prompts padded with <|endoftext|> to 77.

    A prompt is a string, or its token ids (77 of them, BOS ... EOS and padding: what
    `hirm-jax attack` writes, since a decoded attack prompt can re-tokenize differently).
    A prompt longer than 77 tokens raises PromptTooLongError (SD would silently truncate it).
    """
    text_encoder = load_text_encoder_torch(text_encoder)
    ids = torch.from_numpy(prompt_ids(tokenizer, prompts)).long()
    return torch.cat([text_encoder(ids[i:i + batch_size]).last_hidden_state.float()
                      for i in range(0, len(ids), batch_size)])


def build_unet(**overrides) -> UNet2DConditionModel:
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG, timestep_spacing="trailing", set_alpha_to_one=False)


def to_patches(images_uint8: np.ndarray) -> torch.Tensor:
    """[N, 32, 32, 3] uint8 -> [N, 12, 16, 16] float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return F.pixel_unshuffle(x, PATCH)


def from_patches(x: torch.Tensor) -> np.ndarray:
    """[N, 12, 16, 16] in [-1, 1] -> [N, 32, 32, 3] uint8."""
    x = F.pixel_shuffle(x.float(), PATCH)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def sample_images(unet, scheduler: DDIMScheduler, cond: torch.Tensor, uncond: torch.Tensor,
                  seeds, steps: int = 20, guidance: float = 3.0, batch_size: int = 128) -> np.ndarray:
    """DDIM with classifier-free guidance. cond: [N, 77, D]; uncond: [77, D]; seeds: N ints.

    Each picture's starting noise comes from its own seed, so a picture does not depend on
    the batch it was generated in.
    """
    seeds = [int(s) for s in seeds]
    if len(seeds) != cond.shape[0]:
        raise ValueError(f"need one seed per prompt embedding but got {len(seeds)} seeds for {cond.shape[0]}")
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = slice(start, start + batch_size)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds[chunk]])
        c = cond[chunk]
        both = torch.cat([uncond[None].expand_as(c), c])
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            pred = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
            x = scheduler.step(pred, t, x).prev_sample
        out.append(from_patches(x))
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class DenoiserRecipe:
    """The denoiser's training recipe (the shipped world's defaults)."""
    seed: int = 0
    steps: int = 4000
    batch: int = 64
    lr: float = 1e-3
    pool_size: int = 12000
    ema_decay: float = 0.998
    empty_prob: float = 0.1
    checkpoint_every: int = 250
    log_every: int = 25
    unet_overrides: Optional[dict] = None
    warmup: int = 200  # constant learning rate after it, so any EMA checkpoint along the way is usable


def train_denoiser(embed, recipe: Optional[DenoiserRecipe] = None, checkpoint=None, pool=None, **fields):
    """Train the UNet; returns (EMA UNet, metrics).

    embed(list of str) -> [N, 77, D] torch tensor: the frozen text encoder's last_hidden_state.
    checkpoint: optional path; written every `recipe.checkpoint_every` steps (atomically) and, if
    it exists at the start, resumed from. pool: optional data.sample(N >= pool_size, seed,
    "train") to take the pictures from. fields: DenoiserRecipe fields by name (`steps=300`).
    """
    import copy

    recipe = dataclasses.replace(recipe or DenoiserRecipe(), **fields)
    t0 = time.time()
    torch.manual_seed(recipe.seed)
    batches = _Batches(embed, recipe, pool)
    _log.info(f"[denoiser] data and {len(batches.texts)} caption embeddings ready in {time.time() - t0:.0f}s")
    unet = build_unet(**(recipe.unet_overrides or {}))
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.01)
    start = _restore(checkpoint, unet, ema, opt, batches.gen)
    _log.info(f"[denoiser] {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
    t_loop, losses = time.time(), []
    unet.train()
    for step in range(start + 1, recipe.steps + 1):
        losses.append(_train_step(unet, ema, opt, batches, recipe, step))
        if step % recipe.log_every == 0 or step == recipe.steps:
            rate = (time.time() - t_loop) / (step - start)
            _log.info(f"[denoiser] step {step}/{recipe.steps} loss {np.mean(losses[-recipe.log_every:]):.4f} "
                      f"{rate:.2f}s/step elapsed {time.time() - t0:.0f}s eta {rate * (recipe.steps - step):.0f}s")
        if checkpoint is not None and (step % recipe.checkpoint_every == 0 or step == recipe.steps):
            tmp = f"{checkpoint}.tmp"
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "gen": batches.gen.get_state(), "step": step}, tmp)
            os.replace(tmp, checkpoint)
    return ema.eval(), {"train_seconds": time.time() - t0, "steps": recipe.steps, "resumed_at_step": start,
                        "final_loss": float(np.mean(losses[-100:])) if losses else None}


class _Batches:
    """The training pictures, every caption's embedding, and the seeded draw of a batch."""

    def __init__(self, embed, recipe: DenoiserRecipe, pool):
        from hirm_jax.world import data
        self.pool_size = recipe.pool_size
        pool = data.sample(recipe.pool_size, seed=recipe.seed, split="train") if pool is None else pool[:recipe.pool_size]
        self.x_all = to_patches(pool.images)
        self.texts, starts, counts = [], [], []
        for obj in data.ALL_OBJECTS:  # every cell's captions (all names, all templates) in one run
            for style in data.ALL_STYLES:
                cell = data.cell_captions(obj, style)
                starts.append(len(self.texts))
                counts.append(len(cell))
                self.texts += cell
        self.cond_all = embed(self.texts + [""])
        cell_of = torch.from_numpy(pool.objects * len(data.ALL_STYLES) + pool.styles)
        self.first_caption = torch.tensor(starts)[cell_of]
        self.n_captions = torch.tensor(counts)[cell_of]
        self.sched = train_scheduler()
        self.gen = torch.Generator().manual_seed(recipe.seed)

    def draw(self, batch: int, empty_prob: float):
        """(noisy pictures, timesteps, velocity targets, caption embeddings) of one batch."""
        gen = self.gen
        idx = torch.randint(self.pool_size, (batch,), generator=gen)
        pick = (torch.rand(batch, generator=gen) * self.n_captions[idx]).long()
        caption_idx = self.first_caption[idx] + pick
        caption_idx = torch.where(torch.rand(batch, generator=gen) < empty_prob, len(self.texts), caption_idx)
        x0 = self.x_all[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(self.sched.config.num_train_timesteps, (batch,), generator=gen)
        return self.sched.add_noise(x0, noise, t), t, self.sched.get_velocity(x0, noise, t), self.cond_all[caption_idx]


def _restore(checkpoint, unet, ema, opt, gen) -> int:
    """Resume from the checkpoint when there is one; the step it was saved at (0: none)."""
    if checkpoint is None or not os.path.exists(checkpoint):
        return 0
    state = torch.load(checkpoint, weights_only=True)  # tensors, numbers and the RNG state only
    unet.load_state_dict(state["unet"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    gen.set_state(state["gen"])
    _log.info(f"[denoiser] resumed from {checkpoint} at step {state['step']}")
    return state["step"]


def _train_step(unet, ema, opt, batches: _Batches, recipe: DenoiserRecipe, step: int) -> float:
    xt, t, target, cond = batches.draw(recipe.batch, recipe.empty_prob)
    loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, target)
    for g in opt.param_groups:
        g["lr"] = recipe.lr * min(1.0, step / recipe.warmup)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    decay = min(recipe.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), unet.parameters()):
            pe.lerp_(p, 1 - decay)
    return loss.item()
