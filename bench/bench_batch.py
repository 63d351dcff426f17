"""Batch-erasure throughput: N concepts, each its own delta, in one vmapped step (CLIP-L shapes,
random weights, HiRM-S, 1 prompt per concept, the paper's 30 style epochs).

    python bench/bench_batch.py [--n 1 8 64] [--devices 1] [--steps 3] [--dtype float32]
    python bench/bench_batch.py --n 8 --devices 1 8      # single device vs 8 fake CPU devices
    python bench/bench_batch.py --n 256 --chunk 64       # 256 concepts, 64 at a time

Each (N, devices) runs in its own process. Times `--steps` steps (median, after the compiled
first one) and extrapolates to the full run: seconds per concept = (step time x steps + chunk
switch) x chunks / N, where `--chunk` K trains K concepts at a time (train.concepts_per_chunk;
every chunk runs the same compiled step, so its step time is measured once) and the chunk
switch (a fresh state and the next chunk's arrays on the mesh) is timed once.
Also prints compile time, XLA's memory analysis of the step and the process's peak RSS, and on
a GPU the model FLOP utilisation against `--peak-tflops`. Not a test.
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

from hirm_jax.encoder.clip import TextEncoderConfig
from hirm_jax.encoder.testing import random_encoder_folder


def step_flops(config, num_prompts: int, length: int = 77) -> float:
    """Forward + backward matmul FLOPs of one concept's step (backward ~ 2x forward)."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = num_prompts * length
    per_layer = 2 * tokens * (4 * d * d + 2 * d * f) + 2 * 2 * num_prompts * length * length * d
    return 3 * layers * per_layer


def child(base: str, n: int, steps: int, epochs: int, dtype: str, chunk: int) -> dict:
    import resource

    import jax

    from hirm_jax.config_lib import base_config
    from hirm_jax.erase.setup import plan_erase
    names = [f"concept number {i}" for i in range(n)]
    c = base_config()
    c.encoder.path, c.encoder.component, c.encoder.dtype = base, "", dtype
    c.concepts = tuple(names)
    c.super_categories = {name: "thing" for name in names}
    c.joint = False
    c.train.epochs = epochs
    c.train.concepts_per_chunk = chunk if 0 < chunk < n else 0
    c.report.enabled = False
    t0 = time.perf_counter()
    run = plan_erase(c)
    t_setup = time.perf_counter() - t0
    args = lambda s: run.step_args(run.place_jobs(*run.chunks[0]), s)
    t0 = time.perf_counter()
    compiled = run.step_fn.lower(run.new_state(), *args(0)).compile()
    t_compile = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    state = run.new_state()
    times = []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, *args(s))
        jax.block_until_ready(state["trainable"])
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    total_steps, chunks = run.total_steps, len(run.chunks)
    switch_s = 0.0
    if chunks > 1:
        t0 = time.perf_counter()
        jax.block_until_ready((run.new_state(), run.place_jobs(*run.chunks[1])))
        switch_s = time.perf_counter() - t0
    run_s = (step_s * total_steps + switch_s) * chunks
    per_step = run.chunks[0][1] - run.chunks[0][0]
    return dict(n=n, chunk=per_step, devices=jax.device_count(), platform=jax.devices()[0].platform,
                mesh=dict(run.mesh.shape), setup_s=t_setup, compile_s=t_compile, step_s=step_s, switch_s=switch_s,
                s_per_concept=run_s / n, concepts_per_s=n / run_s,
                flops_per_step=per_step * step_flops(run.encoder.config, run.jobs.prompts_per_job),
                temp_gib=getattr(memory, "temp_size_in_bytes", 0) / 2**30,
                args_gib=getattr(memory, "argument_size_in_bytes", 0) / 2**30,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--devices", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--chunk", type=int, default=0, help="concepts per chunk (0 = all N in one step)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="chip peak for MFU (e.g. 989 for H200 bf16 dense)")
    parser.add_argument("--base")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.base, args.n[0], args.steps, args.epochs, args.dtype, args.chunk)))
        return
    root = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    base = args.base or str(random_encoder_folder(root / "clip_l", TextEncoderConfig.clip_l()))
    rows = []
    for devices in args.devices:
        for n in args.n:
            env = dict(os.environ, HIRM_JAX_CACHE_DIR="off")
            if devices > 1:
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
            out = subprocess.run([sys.executable, __file__, "--child", "--base", base, "--n", str(n),
                                  "--steps", str(args.steps), "--epochs", str(args.epochs), "--dtype", args.dtype,
                                  "--chunk", str(args.chunk)],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                print(f"N={n} devices={devices}: failed: {out.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"Batch erasure, CLIP-L text encoder, HiRM-S, 1 prompt per concept, {args.epochs} epochs, {args.dtype}; "
          f"step time median of {args.steps}")
    print("| N | concepts per step | devices (mesh) | compile s | step s | s per concept | concepts/s | XLA temp GiB "
          "| args GiB | peak RSS GiB |" + (" MFU |" if args.peak_tflops else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.peak_tflops else ""))
    for r in rows:
        mfu = f" {r['flops_per_step'] / r['step_s'] / (args.peak_tflops * 1e12):.1%} |" if args.peak_tflops else ""
        print(f"| {r['n']} | {r['chunk']} | {r['devices']} {r['platform']} {r['mesh']} | {r['compile_s']:.1f} | {r['step_s']:.3f} | "
              f"{r['s_per_concept']:.2f} | {r['concepts_per_s']:.3f} | {r['temp_gib']:.2f} | {r['args_gib']:.2f} | "
              f"{r['peak_rss_gib']:.2f} |" + mfu)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
