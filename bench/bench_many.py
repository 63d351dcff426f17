"""Erase many concepts end to end, for real: one delta per concept, chunks sized to a memory
budget by XLA's memory analysis (`train.concepts_per_chunk=-1`), the text report of every
concept, and the per-concept delta export. A small random encoder (default 4 layers x 128,
the demo world's size) so that 1,000 concepts run on a CPU; every concept is trained for the
full default epochs (HiRM-S, style: 30). Prints the wall time of each stage.

    python bench/bench_many.py [--n 1000] [--width 128] [--layers 4] [--budget-gib 1.0] [--ordinary 50]

Not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from hirm_jax.encoder.clip import TextEncoderConfig
from hirm_jax.encoder.testing import random_encoder_folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budget-gib", type=float, default=1.0, help="train.memory_budget_gib")
    parser.add_argument("--ordinary", type=int, default=50, help="report.max_ordinary_prompts")
    parser.add_argument("--keep", help="keep the workdir here")
    args = parser.parse_args()

    from hirm_jax.config_lib import base_config
    from hirm_jax.artifacts.export import export_batch_deltas
    from hirm_jax.report.textreport import report_for_run
    from hirm_jax.run import train_and_evaluate

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_many_"))
    base = random_encoder_folder(root / "encoder", TextEncoderConfig(
        hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.width // 64), projection_dim=args.width))
    names = [f"artist number {i}" for i in range(args.n)]
    (root / "concepts.tsv").write_text("".join(f"{name}\tpainting\tstyle\n" for name in names))
    c = base_config()
    c.encoder.path, c.encoder.component = str(base), ""
    c.concepts_file = str(root / "concepts.tsv")
    c.joint = False
    c.train.concepts_per_chunk = -1
    c.train.memory_budget_gib = args.budget_gib
    c.train.log_every = 10
    c.report.enabled = False  # timed on its own below
    c.report.max_ordinary_prompts = args.ordinary

    t0 = time.perf_counter()
    summary = train_and_evaluate(c, root / "run")
    t_erase = time.perf_counter() - t0
    t0 = time.perf_counter()
    report_for_run(root / "run")
    t_report = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_batch_deltas(root / "run", root / "deltas")
    t_export = time.perf_counter() - t0

    timings, chunks = summary["timings_s"], summary["chunks"]
    deltas = len(json.loads((root / "deltas" / "index.json").read_text())["concepts"])
    print(f"{args.n} concepts, encoder {args.layers} layers x {args.width}, HiRM-S, {summary['steps']} steps each, "
          f"memory budget {args.budget_gib} GiB -> {chunks[0][1]} concepts per step, {len(chunks)} chunks")
    print("| stage | s | s per concept |")
    print("|---|---|---|")
    rows = [("erase: load, targets, chunk fit", timings["load"]), ("erase: compile", timings["compile"]),
            ("erase: train", timings["train"]), ("erase: checkpoints", timings["checkpoint"]),
            ("erase: total wall", t_erase), ("text report", t_report), (f"export {deltas} deltas", t_export)]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / args.n:.3f} |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
