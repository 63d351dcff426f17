"""The demo world's pictures, PyTorch (diffusers) against JAX (hirm_jax.world.sample_jax): wall
time for the demo's benchmark grid (180 pictures, 10 DDIM steps, guidance batched), median of
several runs each, the JAX compile reported apart; the same noise for both, and the largest
pixel difference between them. Prints the CPU; not a test.

    python bench/bench_world_generate.py [--pictures 180] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from machine import cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pictures", type=int, default=180)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from hirm_jax import world as w
    from hirm_jax.world.demo import benchmark_grid
    from hirm_jax.world.sample_jax import generate_jax
    world = w.load_world()
    grid = (benchmark_grid(5) * (1 + args.pictures // 180))[:args.pictures]
    prompts, seeds = [r["prompt"] for r in grid], [r["seed"] for r in grid]
    latents = np.stack([torch.randn((12, 16, 16), generator=torch.Generator().manual_seed(s)).numpy() for s in seeds])
    t0 = time.perf_counter()
    generate_jax(world, None, prompts, seeds, latents=latents)
    first = time.perf_counter() - t0
    times = {"torch": [], "jax": []}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        t0 = time.perf_counter()
        reference = w.generate(world, None, prompts, seeds)
        times["torch"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = generate_jax(world, None, prompts, seeds, latents=latents)
        times["jax"].append(time.perf_counter() - t0)
    torch_s, jax_s = statistics.median(times["torch"]), statistics.median(times["jax"])
    print(f"CPU: {cpu()}; {len(prompts)} pictures, {world.config['sample_steps']} DDIM steps, median of {args.repeats}")
    print("| backend | s (median) | s per picture | vs torch |")
    print("|---|---|---|---|")
    print(f"| torch (diffusers, 1 thread) | {torch_s:.2f} | {torch_s / len(prompts) * 1e3:.1f} ms | 1.00 |")
    print(f"| jax | {jax_s:.2f} | {jax_s / len(prompts) * 1e3:.1f} ms | {jax_s / torch_s:.2f} |")
    print(f"jax first call (compile + run): {first:.1f} s; "
          f"largest pixel difference, same noise: {np.abs(ours.astype(int) - reference.astype(int)).max()}/255")


if __name__ == "__main__":
    main()
