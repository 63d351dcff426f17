"""Forward time and memory of the Flax CLIP-L text encoder vs transformers' PyTorch one, on CPU.

    python bench/bench_encoder.py                 # batch 8 x 77, 1 thread each, median of 5
    python bench/bench_encoder.py --threads 2 --repeats 10 --json

Each backend runs in its own child process (so peak RSS is its own), pinned to `--threads`
CPUs with os.sched_setaffinity before jax/torch are imported, and limited to that many
threads: torch.set_num_threads / set_num_interop_threads, and for XLA
`--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1` when --threads is 1
(OMP/MKL/OpenBLAS variables too). Random CLIP-L weights (12 layers, width 768, vocab 49408),
no attention mask (as SD pipelines call it). Flax is jit-compiled ahead of time
(`.lower().compile()`, timed separately) and reports XLA's memory_analysis; PyTorch runs
eagerly under inference_mode. Timings: median of --repeats after --warmup calls.
Numbers go to stdout (a table, or JSON with --json); progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

BATCH, LENGTH = 8, 77


def _pin(threads: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if threads == 1:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["JAX_PLATFORMS"] = "cpu"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _ids():
    import numpy as np
    rng = np.random.default_rng(0)
    ids = np.full((BATCH, LENGTH), 49407, np.int32)
    ids[:, 0] = 49406
    ids[:, 1:20] = rng.integers(0, 49406, (BATCH, 19))
    return ids


def _time(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_flax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from hirm_jax.encoder.clip import TextEncoder, TextEncoderConfig

    config = TextEncoderConfig.clip_l()
    # Random weights drawn on the host, leaf by leaf: a jitted model.init would peak at ~1.8 GiB
    # of RNG temporaries and hide the forward pass's own footprint.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)),
                                    TextEncoder(config, None).param_shapes())
    encoder = TextEncoder(config, jax.block_until_ready(params))
    ids = jnp.asarray(_ids())
    rss_weights = _rss_mib()
    forward = jax.jit(lambda p, x: encoder.apply(p, x)["last_hidden_state"])
    start = time.perf_counter()
    compiled = forward.lower(params, ids).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    times = _time(lambda: compiled(params, ids).block_until_ready(), args.warmup, args.repeats)
    return dict(backend="flax", version=f"jax {jax.__version__}", compile_s=compile_s, times_s=times,
                rss_after_weights_mib=rss_weights, peak_rss_mib=_rss_mib(),
                xla_temp_mib=getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else None)


def run_torch(args) -> dict:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig()).eval()
    ids = torch.tensor(_ids()).long()
    rss_weights = _rss_mib()

    def forward():
        with torch.inference_mode():
            return model(ids).last_hidden_state

    times = _time(forward, args.warmup, args.repeats)
    return dict(backend="torch", version=f"torch {torch.__version__}", compile_s=0.0, times_s=times,
                rss_after_weights_mib=rss_weights, peak_rss_mib=_rss_mib(), xla_temp_mib=None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--child", choices=("flax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        _pin(args.threads)
        result = (run_flax if args.child == "flax" else run_torch)(args)
        print(json.dumps(result))
        return 0

    results = {}
    for backend in ("torch", "flax"):
        print(f"running {backend} ...", file=sys.stderr)
        child = subprocess.run([sys.executable, __file__, "--child", backend, "--threads", str(args.threads),
                                "--warmup", str(args.warmup), "--repeats", str(args.repeats)],
                               capture_output=True, text=True, check=False)
        if child.returncode:
            print(child.stderr, file=sys.stderr)
            return child.returncode
        results[backend] = json.loads(child.stdout.strip().splitlines()[-1])
    for r in results.values():
        r["median_s"] = statistics.median(r["times_s"])
    summary = dict(batch=BATCH, length=LENGTH, threads=args.threads, repeats=args.repeats, machine=platform.processor()
                   or platform.machine(), results=results,
                   flax_over_torch_time=results["flax"]["median_s"] / results["torch"]["median_s"],
                   flax_over_torch_peak_rss=results["flax"]["peak_rss_mib"] / results["torch"]["peak_rss_mib"])
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    print(f"CLIP-L text encoder forward, batch {BATCH} x {LENGTH}, {args.threads} thread(s), "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'backend':8} {'median s':>9} {'min s':>7} {'max s':>7} {'compile s':>10} {'RSS weights MiB':>16} "
          f"{'peak RSS MiB':>13} {'XLA temp MiB':>13}")
    for name, r in results.items():
        temp = f"{r['xla_temp_mib']:.0f}" if r["xla_temp_mib"] is not None else "-"
        print(f"{name:8} {r['median_s']:9.3f} {min(r['times_s']):7.3f} {max(r['times_s']):7.3f} {r['compile_s']:10.2f} "
              f"{r['rss_after_weights_mib']:16.0f} {r['peak_rss_mib']:13.0f} {temp:>13}")
    print(f"flax / torch: time {summary['flax_over_torch_time']:.2f}x, peak RSS {summary['flax_over_torch_peak_rss']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
