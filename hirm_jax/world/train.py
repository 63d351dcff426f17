"""`hirm-jax world train --out DIR`: build the whole demo world from scratch, seeded.

    from hirm_jax.world.train import train_world
    train_world("out/world", seed=0)       # then: load_world("out/world")

Stages (each one's output is kept in `{out}.partial/`, so an interrupted run resumes where
it stopped; the finished folder appears atomically at `out`):

    tokenizer      real CLIP BPE tokenizer (hirm_jax.encoder.tokenizer), built offline from open_clip's file
    text_encoder   small CLIPTextModel trained contrastively (JAX), saved float16
    judge          CNN naming object and style (PyTorch)
    unet           diffusers UNet2DConditionModel, v-prediction, EMA (PyTorch)
    world.json     config, metrics (judge accuracy, generated-image accuracy per cell),
                   library versions and the sha256 of every file
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from hirm_jax import log
from hirm_jax.world import data

_log = log.get(__name__)

# Sampling defaults stored in world.json (generate() uses them unless told otherwise).
SAMPLE_STEPS = 10
GUIDANCE = 3.0
DENOISER_POOL = 12000
TEXT_ENCODER_CHECKPOINT = "text_encoder_checkpoint.msgpack"
DENOISER_CHECKPOINT = "denoiser_checkpoint.pt"




def train_world(out_dir, seed: int = 0, text_encoder_steps: int = 800, judge_steps: int = 800,
                denoiser_steps: int = 3000, denoiser_batch: int = 64, eval_seeds: int = 12,
                overwrite: bool = False) -> Path:
    """Train tokenizer, text encoder, judge and denoiser; write the world folder; return its path.

    The defaults are the recipe of the shipped world (hirm_jax/world/shipped). Progress goes to
    stderr. An interrupted run resumes from `{out_dir}.partial/` (finished stages are kept, the
    text encoder and the denoiser from their last checkpoints). eval_seeds: pictures per (object, style) cell in the
    final held-out evaluation recorded in world.json.
    """
    import torch

    # One thread: the shipped world was trained so, and float reductions then match bit for bit.
    torch.set_num_threads(1)
    from transformers import CLIPTokenizer

    from hirm_jax.encoder.tokenizer import build_clip_tokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {out_dir} already exists; choose another or pass overwrite=True")
    work = out_dir.with_name(out_dir.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    metrics_path = work / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    save_metrics = lambda: metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    t0 = time.time()

    if not (work / "tokenizer" / "tokenizer_config.json").exists():
        build_clip_tokenizer(work / "tokenizer")
        # tokenizer.json (3.5 MB) repeats vocab.json + merges.txt; transformers rebuilds it on load.
        (work / "tokenizer" / "tokenizer.json").unlink()
        (work / "tokenizer").chmod(0o755)
    tokenizer = CLIPTokenizer.from_pretrained(str(work / "tokenizer"))
    pool = data.sample(DENOISER_POOL, seed=seed, split="train")  # every stage draws from its head
    _log.info(f"[world] {len(pool)} training pictures drawn in {time.time() - t0:.0f}s")

    _train_stages(work, tokenizer, pool, metrics, save_metrics,
                  dict(seed=seed, text_encoder_steps=text_encoder_steps, judge_steps=judge_steps,
                       denoiser_steps=denoiser_steps, denoiser_batch=denoiser_batch))

    _log.info("[world] stage 4/4: evaluation on held-out templates and seeds")
    write_world_json(work, metrics, seed=seed)  # evaluation loads the folder as a world
    metrics["generated"] = evaluate_generation(work, seeds_per_prompt=eval_seeds)
    metrics["total_seconds_this_run"] = time.time() - t0
    save_metrics()
    write_world_json(work, metrics, seed=seed)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for leftover in (DENOISER_CHECKPOINT, TEXT_ENCODER_CHECKPOINT, "metrics.json"):
        (work / leftover).unlink(missing_ok=True)
    os.replace(work, out_dir)
    _log.info(f"[world] world written to {out_dir} in {time.time() - t0:.0f}s")
    return out_dir


def _train_stages(work: Path, tokenizer, pool, metrics: dict, save_metrics, recipe: dict) -> None:
    """Stages 1-3 (text encoder, judge, denoiser), each skipped when a resumed build has it."""
    from hirm_jax.world import denoiser as den
    from hirm_jax.world.judge import train_judge
    from hirm_jax.world.textencoder import save_half, train_text_encoder
    seed = recipe["seed"]
    if not (work / "text_encoder" / "config.json").exists():
        _log.info("[world] stage 1/4: text encoder")
        encoder, metrics["text_encoder"] = train_text_encoder(
            tokenizer, seed=seed, steps=recipe["text_encoder_steps"], pool=pool,
            checkpoint=work / TEXT_ENCODER_CHECKPOINT)
        save_half(encoder, work / "text_encoder", overwrite=True)
        save_metrics()

    if not (work / "judge" / "judge.safetensors").exists():
        _log.info("[world] stage 2/4: judge")
        judge, metrics["judge"] = train_judge(seed=seed, steps=recipe["judge_steps"], pool=pool)
        (work / "judge").mkdir(exist_ok=True)
        judge.save(work / "judge")
        save_metrics()

    if not (work / "unet" / "config.json").exists():
        _log.info("[world] stage 3/4: denoiser")
        embed = lambda texts: den.embed_prompts(tokenizer, work / "text_encoder", texts)
        unet, metrics["denoiser"] = den.train_denoiser(
            embed, seed=seed, steps=recipe["denoiser_steps"], batch=recipe["denoiser_batch"],
            checkpoint=work / DENOISER_CHECKPOINT, pool_size=DENOISER_POOL, pool=pool)
        save_unet_half(unet, work / "unet")
        den.sample_scheduler().save_pretrained(str(work / "scheduler"))
        save_metrics()


def save_unet_half(unet, folder: Path) -> None:
    """diffusers folder (config.json + diffusion_pytorch_model.safetensors) in float16."""
    import copy

    copy.deepcopy(unet).half().save_pretrained(str(folder))


def evaluate_generation(folder: Path, seeds_per_prompt: int = 12, first_seed: int = 10_000) -> dict:
    """Judge pictures generated from held-out templates with held-out seeds, per (object, style)
    cell and per name: picture k of a cell uses held-out template k % 4 and name k % 3 of its
    object and of its style (0: the class's own, the last: the held-out synonym)."""
    from hirm_jax.world import generate, load_world

    world = load_world(folder, verify=False)
    prompts, cells, name_index, seeds = [], [], [], []
    for o, obj in enumerate(data.ALL_OBJECTS):
        for s, style in enumerate(data.ALL_STYLES):
            for k in range(seeds_per_prompt):
                template = data.HELDOUT_TEMPLATES[k % len(data.HELDOUT_TEMPLATES)]
                prompts.append(data.caption(data.name_of(obj, k), data.name_of(style, k), template))
                cells.append((o, s))
                name_index.append(k % data.N_NAMES)
                seeds.append(first_seed + len(seeds))
    t0 = time.time()
    images = generate(world, prompts=prompts, seeds=seeds)
    seconds = time.time() - t0
    pred = world.judge.classify(images)
    cells, name_index = np.array(cells), np.array(name_index)
    obj_ok = pred["object_index"] == cells[:, 0]
    sty_ok = pred["style_index"] == cells[:, 1]
    table = {f"{data.ALL_OBJECTS[o]}/{data.ALL_STYLES[s]}":
             [float(obj_ok[(cells[:, 0] == o) & (cells[:, 1] == s)].mean()),
              float(sty_ok[(cells[:, 0] == o) & (cells[:, 1] == s)].mean())]
             for o in range(len(data.ALL_OBJECTS)) for s in range(len(data.ALL_STYLES))}
    # The anchors have one name: per-name figures count the concepts' pictures only.
    concept = (cells[:, 0] < len(data.OBJECTS)) & (cells[:, 1] < len(data.STYLES))
    per_name = {data.name_key(k):
                {"object_accuracy": float(obj_ok[concept & (name_index == k)].mean()),
                 "style_accuracy": float(sty_ok[concept & (name_index == k)].mean())} for k in range(data.N_NAMES)}
    result = {"object_accuracy": float(obj_ok.mean()), "style_accuracy": float(sty_ok.mean()),
              "per_name": per_name, "images": len(prompts), "generation_seconds": seconds,
              "per_cell_object_style_accuracy": table}
    _log.info(f"[world] generated {len(prompts)} images in {seconds:.0f}s: object accuracy {result['object_accuracy']:.3f}, "
              f"style accuracy {result['style_accuracy']:.3f}; per name {per_name}")
    return result


def write_world_json(folder: Path, metrics: dict, seed: int) -> None:
    import diffusers
    import jax
    import torch
    import transformers

    from hirm_jax.world import WORLD_FILES, WORLD_FORMAT, sha256

    config = {
        "format": WORLD_FORMAT,
        "seed": seed,
        "objects": list(data.OBJECTS), "styles": list(data.STYLES), "names": data.NAMES,
        "object_anchor": data.OBJECT_ANCHOR, "style_anchor": data.STYLE_ANCHOR,
        "train_templates": list(data.TRAIN_TEMPLATES), "heldout_templates": list(data.HELDOUT_TEMPLATES),
        "sample_steps": SAMPLE_STEPS, "guidance": GUIDANCE,
        "metrics": metrics,
        "versions": {"diffusers": diffusers.__version__, "jax": jax.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "sha256": {name: sha256(folder / name) for name in WORLD_FILES},
    }
    (folder / "world.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
