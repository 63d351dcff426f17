"""One CLIP-L-sized HiRM-S erasure (random weights) on this machine: wall time split into load,
compile and train; the train step against a faithful PyTorch implementation of the same step;
peak memory; and a second run that finds the step in the persistent compilation cache.

    python bench/bench_erase.py [--threads 1] [--epochs 30] [--torch-steps 5]

Each measurement runs in its own process pinned to the same number of cores (taskset), so
thread counts match and peak RSS is per measurement. Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NINE_KEYWORDS = ["naked", "nude", "bare", "exposed", "Stripped", "topless", "male genitalia", "penis", "buttocks"]


def build_base(root: Path) -> Path:
    """A random CLIP ViT-L/14 text encoder folder with a real CLIP tokenizer."""
    from hirm_jax.encoder.clip import TextEncoderConfig
    from hirm_jax.encoder.testing import random_encoder_folder
    return random_encoder_folder(root / "clip_l", TextEncoderConfig.clip_l(), seed=0)


def jax_erase(base: str, workdir: str, keywords: list[str], epochs: int) -> dict:
    import resource

    from hirm_jax.cli import enable_compilation_cache
    from hirm_jax.config_lib import base_config
    from hirm_jax.run import train_and_evaluate
    enable_compilation_cache()
    c = base_config()
    c.encoder.path, c.encoder.component = base, ""
    c.concepts = tuple(keywords)
    c.super_categories = {k: "person" for k in keywords}
    c.objective.name = "hirm_s"
    c.train.epochs = epochs
    c.train.log_every = max(epochs, 1)
    c.train.checkpoint_every = 10 ** 6  # one checkpoint, at the end
    c.report.enabled = False
    summary = train_and_evaluate(c, workdir)
    t = summary["timings_s"]
    return dict(load_s=t["load"], compile_s=t["compile"], train_s=t["train"], steps=summary["steps"],
                step_ms=1000 * t["train"] / summary["steps"], peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def torch_steps(base: str, keywords: list[str], steps: int) -> dict:
    """The same step in PyTorch: block 0 trainable, Adam, MSE of the last block's fc2 output
    (positions 1..76) to the frozen super-category prompt's, as the reference implementation."""
    import resource

    import torch
    from transformers import CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(base)
    model = CLIPTextModel.from_pretrained(base).eval()
    layers = getattr(model, "text_model", model).encoder.layers
    captured = {}
    layers[-1].mlp.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    ids = tok(keywords, padding="max_length", max_length=77, return_tensors="pt").input_ids
    anchor_ids = tok(["person"] * len(keywords), padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        model(anchor_ids)
        target = captured["h"].clone()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(layers[0].parameters())
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=5e-5)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(ids)
        loss = (captured["h"][:, 1:] - target[:, 1:]).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return dict(step_ms=1000 * statistics.median(times[1:]),
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def run_child(args: list[str], cores: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(len(cores.split(","))), HIRM_JAX_CACHE_DIR=os.environ["BENCH_CACHE"])
    out = subprocess.run(["taskset", "-c", cores, sys.executable, __file__, *args], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--torch-steps", type=int, default=5)
    parser.add_argument("--child", nargs="*")
    args = parser.parse_args()
    if args.child:
        kind, base, *rest = args.child
        keywords = json.loads(rest[-1])
        result = jax_erase(base, rest[0], keywords, args.epochs) if kind == "jax" else torch_steps(base, keywords, args.torch_steps)
        print(json.dumps(result))
        return

    cores = ",".join(str(i) for i in range(args.threads))
    root = Path(tempfile.mkdtemp(prefix="bench_erase_"))
    os.environ["BENCH_CACHE"] = str(root / "xla_cache")
    base = str(build_base(root))
    rows = []
    for name, keywords in (("1 keyword", ["Van Gogh"]), ("9 keywords", NINE_KEYWORDS)):
        first = run_child(["--epochs", str(args.epochs), "--child", "jax", base, str(root / f"w1_{len(keywords)}"), json.dumps(keywords)], cores)
        second = run_child(["--epochs", str(args.epochs), "--child", "jax", base, str(root / f"w2_{len(keywords)}"), json.dumps(keywords)], cores)
        ref = run_child(["--torch-steps", str(args.torch_steps), "--child", "torch", base, "-", json.dumps(keywords)], cores)
        rows.append((name, first, second, ref))
    print(f"CLIP-L text encoder, HiRM-S, {args.epochs} epochs, {args.threads} core(s) (taskset), median step times")
    print("| prompts | load s | compile s (1st run) | compile s (2nd, cached) | train s | JAX step ms | PyTorch step ms | JAX/PyTorch | peak RSS JAX GiB | peak RSS torch GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, first, second, ref in rows:
        print(f"| {name} | {first['load_s']:.1f} | {first['compile_s']:.1f} | {second['compile_s']:.1f} | {first['train_s']:.1f} | "
              f"{first['step_ms']:.0f} | {ref['step_ms']:.0f} | {first['step_ms'] / ref['step_ms']:.2f} | "
              f"{first['peak_rss_gib']:.2f} | {ref['peak_rss_gib']:.2f} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
