"""Forward time of the Flax T5 encoder vs transformers' `T5EncoderModel`, and the HiRM erase step
on T5 vs the same step in PyTorch, on CPU (each under a minute).

    python bench/bench_t5.py                   # small + medium, 1 thread each, median of 5 after 1
    python bench/bench_t5.py --threads 2 --repeats 7 --json
    python bench/bench_t5.py --step            # the erase step (what `erase --config=flux:text_encoder_2` runs)

--step times one HiRM-S step as the trainer runs it (`hirm_jax.erase.step`: block 0's own leaves
trainable, the relative attention bias frozen, hooks last_mlp_out + final_ln as configs/flux.py,
Adam, jitted with the state donated) against PyTorch doing the same: T5EncoderModel with block 0
(minus the bias) requiring grad, forward hooks on the last block's DenseReluDense and the final
output, MSE to frozen targets summed over the two hooks, Adam (torch.optim, foreach).

Two T5 v1.1 (gated-gelu) encoder shapes, random weights (the same for both backends):
  small   t5-v1_1-small's width (d_model 512, 6 heads of 64, d_ff 1024), 4 layers; batch 1 x 128
  medium  t5-v1_1-base's width (d_model 768, 12 heads of 64, d_ff 2048), 6 layers; batch 1 x 256
(fewer layers and a vocabulary cut to 1024 keep the run under a minute; time is linear in the
layers, and the embedding lookup costs nothing either way). Half of each prompt is padding,
masked, as Flux / SD3 pipelines pad T5 prompts.

Each backend runs in its own child process (all shapes in one), pinned to the same `--threads` CPUs with
os.sched_setaffinity before jax/torch are imported: torch.set_num_threads(threads) and
set_num_interop_threads(1); XLA single-threaded (`--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`) when --threads is 1, otherwise limited by the affinity.
Flax is jit-compiled ahead of time (compile time shown apart); torch runs eagerly under
inference_mode with its default (sdpa) attention. Timings: median of --repeats after --warmup.
The CPU model (lscpu's "Model name") is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from bench_encoder import _time  # the same timing loop as the CLIP bench (this folder is on sys.path)

SHAPES = {
    "small": dict(config=dict(vocab_size=1024, d_model=512, d_kv=64, d_ff=1024, num_layers=4, num_heads=6),
                  batch=1, length=128),
    "medium": dict(config=dict(vocab_size=1024, d_model=768, d_kv=64, d_ff=2048, num_layers=6, num_heads=12),
                   batch=1, length=256),
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    for line in out.splitlines():
        if line.strip().startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _pin(threads: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if threads == 1:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    else:
        os.environ.pop("XLA_FLAGS", None)
    os.environ["JAX_PLATFORMS"] = "cpu"


def _inputs(shape: dict):
    import numpy as np
    rng = np.random.default_rng(0)
    batch, length = shape["batch"], shape["length"]
    ids = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    used = length // 2
    ids[:, :used - 1] = rng.integers(2, shape["config"]["vocab_size"], (batch, used - 1))
    ids[:, used - 1] = 1  # EOS, then PAD (0)
    mask[:, :used] = 1
    return ids, mask


def _state(config):
    """A PyTorch-layout state dict drawn with numpy, scaled 1/sqrt(fan_in) (norms 1)."""
    import jax
    import numpy as np
    from hirm_jax.encoder.t5 import T5Encoder
    from hirm_jax.encoder.t5_weights import expand_t5_table

    rng = np.random.default_rng(0)
    leaves = jax.tree_util.tree_flatten_with_path(T5Encoder(config, None).param_shapes())[0]
    shapes = {tuple(k.key for k in path): leaf.shape for path, leaf in leaves}
    state = {}
    for key, path, transform in expand_t5_table(config):
        shape = shapes[path] if transform.name == "identity" else shapes[path][::-1]
        if key.endswith("layer_norm.weight"):
            state[key] = np.ones(shape, np.float32)
        else:
            scale = 1.0 if key == "shared.weight" else shape[-1] ** -0.5
            state[key] = (scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return state


def run_flax(args, name: str) -> dict:
    import jax
    import jax.numpy as jnp
    from hirm_jax.encoder.t5 import T5Encoder, T5EncoderConfig
    from hirm_jax.encoder.t5_weights import t5_hf_to_flax

    shape = SHAPES[name]
    config = T5EncoderConfig(**shape["config"])
    params = jax.tree_util.tree_map(jnp.asarray, t5_hf_to_flax(_state(config), config))
    encoder = T5Encoder(config, params)
    ids, mask = (jnp.asarray(x) for x in _inputs(shape))
    forward = jax.jit(lambda p, i, m: encoder.apply(p, i, m)["last_hidden_state"])
    start = time.perf_counter()
    compiled = forward.lower(params, ids, mask).compile()
    compile_s = time.perf_counter() - start
    times = _time(lambda: compiled(params, ids, mask).block_until_ready(), args.warmup, args.repeats)
    return dict(backend="flax", version=f"jax {jax.__version__}", compile_s=compile_s, times_s=times)


def _torch_model(args, config):
    """transformers' T5EncoderModel holding `_state(config)`, on `args.threads` threads."""
    import torch
    import transformers
    if torch.get_num_threads() != args.threads:
        torch.set_num_threads(args.threads)
    if torch.get_num_interop_threads() != 1:
        torch.set_num_interop_threads(1)
    state = {k: torch.from_numpy(v) for k, v in _state(config).items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    with torch.device("meta"):
        model = transformers.T5EncoderModel(transformers.T5Config(**config.to_hf_dict()))
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def run_torch(args, name: str) -> dict:
    import torch
    import transformers
    from hirm_jax.encoder.t5 import T5EncoderConfig

    shape = SHAPES[name]
    model = _torch_model(args, T5EncoderConfig(**shape["config"]))
    ids, mask = (torch.from_numpy(x).long() for x in _inputs(shape))

    def forward():
        with torch.inference_mode():
            return model(ids, attention_mask=mask).last_hidden_state

    times = _time(forward, args.warmup, args.repeats)
    return dict(backend="torch", version=f"torch {torch.__version__}, transformers {transformers.__version__}",
                compile_s=0.0, times_s=times)


def _step_batch(shape: dict):
    """(ids, anchor ids) of a step: the shape's prompts, and as many anchor prompts for the targets."""
    import numpy as np
    ids, _ = _inputs(shape)
    anchors = np.roll(ids, 3, axis=1)
    return ids, anchors


def run_flax_step(args, name: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from hirm_jax.config_lib import base_config
    from hirm_jax.encoder.architectures import architecture
    from hirm_jax.encoder.t5 import T5Encoder, T5EncoderConfig
    from hirm_jax.encoder.t5_weights import t5_hf_to_flax
    from hirm_jax.erase import masking, objectives, step

    shape, hooks = SHAPES[name], ("last_mlp_out", "final_ln")
    config = T5EncoderConfig(**shape["config"])
    encoder = T5Encoder(config, jax.tree_util.tree_map(jnp.asarray, t5_hf_to_flax(_state(config), config)))
    ids, anchors = _step_batch(shape)
    out = encoder.apply(encoder.params, anchors)
    k, length = ids.shape
    per_job = dict(input_ids=ids[None], attention_mask=np.ones_like(ids)[None],
                   targets={h: np.asarray(objectives.read_hook(out, h))[None] for h in hooks},
                   weights={h: np.ones((1, k, length), np.float32) for h in hooks})
    train_cfg = base_config().train
    train_cfg.learning_rate = 1e-4
    paths = masking.trainable_paths(encoder.params, (0,), train_cfg.trainable_modules, "", architecture("t5"))
    trainable, frozen = masking.split(encoder.params, paths)
    optimizer = step.make_optimizer(train_cfg)
    train_step = jax.jit(step.make_train_step(step.make_loss_fn(encoder, hooks, False, 0.0), optimizer),
                         donate_argnums=0)
    state = step.init_state(trainable, optimizer, 1)
    args_ = (frozen, jax.tree_util.tree_map(jnp.asarray, per_job), {}, jnp.arange(k), jnp.ones(k, jnp.float32))
    start = time.perf_counter()
    compiled = train_step.lower(state, *args_).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def one_step():
        holder[0], metrics = compiled(holder[0], *args_)
        return jax.block_until_ready(metrics["loss"])
    times = _time(one_step, args.warmup, args.repeats)
    return dict(backend="flax", version=f"jax {jax.__version__}", compile_s=compile_s, times_s=times)


def run_torch_step(args, name: str) -> dict:
    import torch
    import transformers
    from hirm_jax.encoder.t5 import T5EncoderConfig

    shape = SHAPES[name]
    model = _torch_model(args, T5EncoderConfig(**shape["config"]))
    captured = {}
    model.encoder.block[-1].layer[-1].DenseReluDense.register_forward_hook(lambda m, i, o: captured.__setitem__("mlp", o))
    ids, anchors = (torch.from_numpy(x).long() for x in _step_batch(shape))
    with torch.no_grad():
        targets = dict(final=model(anchors).last_hidden_state.clone(), mlp=captured["mlp"].clone())
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for n, p in model.encoder.block[0].named_parameters() if "relative_attention_bias" not in n]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=1e-4)

    def one_step():
        opt.zero_grad(set_to_none=True)
        final = model(ids).last_hidden_state
        loss = sum((x - targets[k]).pow(2).sum(-1).mean() for k, x in (("final", final), ("mlp", captured["mlp"])))
        loss.backward()
        opt.step()
        return loss.item()
    times = _time(one_step, args.warmup, args.repeats)
    return dict(backend="torch", version=f"torch {torch.__version__}, transformers {transformers.__version__}",
                compile_s=0.0, times_s=times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["small", "medium"])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--step", action="store_true", help="time the HiRM erase step instead of the forward")
    parser.add_argument("--child", choices=("flax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        _pin(args.threads)
        run = {(False, "flax"): run_flax, (False, "torch"): run_torch,
               (True, "flax"): run_flax_step, (True, "torch"): run_torch_step}[args.step, args.child]
        print(json.dumps({name: run(args, name) for name in args.shapes}))
        return 0

    results: dict[str, dict] = {shape: {} for shape in args.shapes}
    for backend in ("torch", "flax"):
        print(f"running {backend} ...", file=sys.stderr)
        child = subprocess.run([sys.executable, __file__, "--child", backend, "--shapes", *args.shapes,
                                "--threads", str(args.threads), "--warmup", str(args.warmup),
                                "--repeats", str(args.repeats), *(["--step"] if args.step else [])],
                               capture_output=True, text=True, check=False)
        if child.returncode:
            print(child.stderr, file=sys.stderr)
            return child.returncode
        for shape, r in json.loads(child.stdout.strip().splitlines()[-1]).items():
            r["median_s"] = statistics.median(r["times_s"])
            results[shape][backend] = r
    summary = dict(cpu=cpu_model(), what="HiRM erase step" if args.step else "forward", threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                   shapes={s: SHAPES[s] for s in args.shapes}, results=results,
                   flax_over_torch={s: r["flax"]["median_s"] / r["torch"]["median_s"] for s, r in results.items()})
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    print(f"T5 encoder {summary['what']} on {summary['cpu']}, {args.threads} thread(s), median of {args.repeats} after "
          f"{args.warmup} warm-up")
    print(f"{'shape':7} {'batch x len':>11} {'backend':8} {'median ms':>10} {'min ms':>8} {'max ms':>8} "
          f"{'compile s':>10} {'flax/torch':>10}")
    for shape, by_backend in results.items():
        dims = f"{SHAPES[shape]['batch']} x {SHAPES[shape]['length']}"
        for backend, r in by_backend.items():
            ratio = f"{summary['flax_over_torch'][shape]:.2f}x" if backend == "flax" else ""
            print(f"{shape:7} {dims:>11} {backend:8} {1e3 * r['median_s']:10.1f} {1e3 * min(r['times_s']):8.1f} "
                  f"{1e3 * max(r['times_s']):8.1f} {r['compile_s']:10.2f} {ratio:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
