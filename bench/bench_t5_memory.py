"""Per-device memory of a T5-XXL HiRM erase step (Flux-dev: 512 tokens) under fsdp = 1, 4, 8,
from XLA's memory analysis of the ahead-of-time compiled step; no weights are loaded or made.

    python bench/bench_t5_memory.py [--fsdp 1 4 8] [--length 512] [--dtype float32] [--json out.json]

8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set before jax is
imported). The step is the one `hirm-jax erase --config=flux:text_encoder_2` runs with
joint=False (one delta per concept, HiRM-S, hooks last_mlp_out + final_ln, 1 prompt per
concept): `build_abstract_step` calls `erase.setup.jit_train_step`, the function plan_erase
jits the step with (loss, optimizer, vmapped step, in/out shardings, donation). plan_erase
itself loads the base weights and computes the targets with them (19 GB for T5-XXL), so the
seam is the jit: the same function is lowered on jax.ShapeDtypeStruct arguments carrying the
shardings plan_erase places (T5Encoder.param_shapes() for the parameters).
tests/test_t5_sharding.py checks, on a tiny T5, that this lowers to exactly the HLO of
plan_erase's step.

Mesh for fsdp = f: concept = 8 / f, data = 1, so every device trains the same number of
concepts; "n per device" jobs means n * (8 / f) concepts in the step. Memory per device is
linear in n (sharding.fit_chunk's model): bytes(n) = fixed + n * per_concept, measured at n = 1
and n = 2 and extrapolated to a 96 GB and a 16 GB device (1 GB = 1e9 bytes, the whole device,
no headroom). Prints a table; writes JSON with the CPU model and the jax version. Not a test.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import math
import platform
import subprocess
import time

import jax
import jax.numpy as jnp

from hirm_jax import config_lib
from hirm_jax.encoder.architectures import architecture
from hirm_jax.encoder.t5 import T5Encoder, T5EncoderConfig
from hirm_jax.erase import masking, setup, sharding
from hirm_jax.erase import step as step_lib
from hirm_jax.fileio import write_json

DEVICE_GB = (96, 16)


def flux_t5_config(length: int = 512, dtype: str = "float32"):
    """configs/flux.py:text_encoder_2 as a batch erasure (one delta per concept)."""
    from hirm_jax.configs.flux import get_config  # noqa: PLC0415  (the shipped configs/ folder)
    c = get_config("text_encoder_2")
    c.encoder.max_length = length
    c.encoder.dtype = dtype
    c.joint = False
    return config_lib.resolve_defaults(c)


def per_job_shapes(config, encoder_config, num_jobs: int, prompts_per_job: int) -> dict:
    """The shapes and dtypes of erase.jobs.build_jobs' per-job arrays (see hirm_jax.erase.jobs)."""
    t, hooks = config.encoder.max_length, tuple(config.objective.hooks)
    length = lambda h: 1 if h == "text_embeds" else t
    dim = lambda h: encoder_config.projection_dim if h == "text_embeds" else encoder_config.hidden_size
    s = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct((num_jobs, prompts_per_job, *shape), dtype)
    return dict(input_ids=s(t, dtype=jnp.int32), attention_mask=s(t, dtype=jnp.int32),
                targets={h: s(length(h), dim(h)) for h in hooks}, weights={h: s(length(h)) for h in hooks})


def build_abstract_step(config, encoder_config: T5EncoderConfig, mesh, num_jobs: int, prompts_per_job: int = 1,
                        params=None):
    """(jitted step, abstract args) as `erase.setup.plan_erase` builds and calls them, on shapes:
    the step is `erase.setup.jit_train_step` itself; the arguments are ShapeDtypeStructs with the
    shardings plan_erase places.

    `params`: the parameter tree (arrays or ShapeDtypeStructs); default T5Encoder.param_shapes()."""
    if config.preservation.weight > 0:
        raise NotImplementedError("the abstract step has no preservation prompts (preservation.weight = 0)")
    arch = architecture("t5")
    config_at_dtype = encoder_config.replace(dtype=config.encoder.dtype)
    params = T5Encoder(config_at_dtype, None).param_shapes() if params is None else params
    encoder = T5Encoder(config_at_dtype, params)
    optimizer = step_lib.make_optimizer(config.train)
    trainable, frozen = masking.split(params, setup.trainable_paths(config, encoder, arch))
    batch_size = config.train.batch_size or prompts_per_job
    step_fn, state_sh, frozen_sh = setup.jit_train_step(encoder, config, mesh, optimizer, (trainable, None), frozen,
                                                        batch_size)
    num_padded = sharding.pad_to_multiple(num_jobs, mesh)
    state = setup.abstract(jax.eval_shape(lambda t: step_lib.init_state(t, optimizer, num_padded), trainable), state_sh)
    per_job = setup.abstract(per_job_shapes(config, encoder_config, num_padded, prompts_per_job), sharding.per_job(mesh))
    frozen = setup.abstract(jax.eval_shape(lambda f: f, frozen), frozen_sh)
    args = (state, frozen, per_job, {}, *step_lib.batch_indices(0, prompts_per_job, batch_size, config.train.seed))
    return step_fn, args


def measure(config, encoder_config, fsdp: int, per_device: int) -> dict:
    mesh_cfg = type("Mesh", (), dict(concept=8 // fsdp, data=1, fsdp=fsdp))
    mesh = sharding.make_mesh(mesh_cfg)
    num_jobs = per_device * mesh.shape["concept"]
    step_fn, args = build_abstract_step(config, encoder_config, mesh, num_jobs)
    t0 = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    shard_bytes = lambda tree: sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape))
                                   for x in jax.tree_util.tree_leaves(tree))
    return dict(fsdp=fsdp, mesh=dict(mesh.shape), concepts_per_device=per_device, concepts_in_step=num_jobs,
                compile_s=round(seconds, 1), arguments=int(m.argument_size_in_bytes),
                outputs=int(m.output_size_in_bytes), aliased=int(m.alias_size_in_bytes),
                temps=int(m.temp_size_in_bytes), total=sharding.step_bytes(compiled),
                frozen_args=shard_bytes(args[1]), state_args=shard_bytes(args[0]))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--dtype", default="float32", help="compute dtype (parameters stay float32)")
    parser.add_argument("--json", default="bench_t5_memory.json")
    args = parser.parse_args()
    assert jax.device_count() == 8, jax.devices()
    config = flux_t5_config(args.length, args.dtype)
    encoder_config = T5EncoderConfig.t5_v1_1_xxl()
    rows = []
    for fsdp in args.fsdp:
        one, two = (measure(config, encoder_config, fsdp, n) for n in (1, 2))
        per_concept = two["total"] - one["total"]
        fixed = one["total"] - per_concept
        fits = {f"{gb}GB": max(int((gb * 1e9 - fixed) // per_concept), 0) for gb in DEVICE_GB}
        rows.append(dict(fsdp=fsdp, one=one, two=two, fixed=fixed, per_concept=per_concept, concepts_per_device=fits))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["one"]["total"] for r in rows if r["fsdp"] == 1), None)
    mb = lambda b: f"{b / 1e6:,.0f}"
    print(f"\nT5-XXL (d_model 4096, 24 layers, d_ff 10240, vocab 32128) HiRM-S erase step, {args.length} tokens, "
          f"compute {args.dtype}, float32 parameters + Adam; per device, XLA memory analysis, MB (1e6 bytes)")
    print("| fsdp | mesh | args | outputs | aliased | temps | total (1 concept/device) | total (2/device) | "
          "ratio to fsdp=1 | per concept | concepts / 96 GB | concepts / 16 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = r["one"]
        ratio = f"{o['total'] / base:.3f}" if base else "-"
        print(f"| {r['fsdp']} | {o['mesh']} | {mb(o['arguments'])} | {mb(o['outputs'])} | {mb(o['aliased'])} | "
              f"{mb(o['temps'])} | {mb(o['total'])} | {mb(r['two']['total'])} | {ratio} | {mb(r['per_concept'])} | "
              f"{r['concepts_per_device']['96GB']} | {r['concepts_per_device']['16GB']} |")
    goal = None
    if base and any(r["fsdp"] == 8 for r in rows):
        ratio8 = next(r["one"]["total"] for r in rows if r["fsdp"] == 8) / base
        goal = dict(ratio_fsdp8=ratio8, at_most_one_sixth=ratio8 <= 1 / 6)
        print(f"\nfsdp=8 / fsdp=1 per-device memory: {ratio8:.3f} (goal <= 1/6 = 0.167: "
              f"{'holds' if goal['at_most_one_sixth'] else 'does NOT hold'})")
    print("concepts per device: linear in n from n = 1 and n = 2 (fixed + n * per concept), the whole device, "
          "1 GB = 1e9 bytes")
    result = dict(cpu=cpu_model(), jax=jax.__version__, devices=jax.device_count(), length=args.length,
                  dtype=args.dtype, encoder=T5EncoderConfig.t5_v1_1_xxl().__dict__, rows=rows, goal=goal)
    write_json(args.json, json.loads(json.dumps(result, default=str)))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
